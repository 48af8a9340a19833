// fada_core's CUDA ops (loss, cross-entropy, class statistics), host wrappers and kernels,
// compiled as host code against cuda_emulation.h and registered for CPU
// tensors as fada_core_emulated::* (see tests/test_cuda_emulation.py).
#define FADA_CUDA_EMULATION 1

#include <torch/library.h>

#include "common/op_schemas.h"
#include "cuda/class_stats_kernel.cu"
#include "cuda/cross_entropy_kernel.cu"
#include "cuda/fada_loss_kernel.cu"

TORCH_LIBRARY(fada_core_emulated, m) {
  m.def(fada::schema::kFadaLoss, &fada::cuda::fada_loss_cuda);
  m.def(fada::schema::kFadaLossBackward, &fada::cuda::fada_loss_backward_cuda);
  m.def(fada::schema::kFadaLossWithGrad, &fada::cuda::fada_loss_with_grad_cuda);
  m.def(fada::schema::kUpsampledCrossEntropy, &fada::cuda::upsampled_cross_entropy_cuda);
  m.def(fada::schema::kUpsampledCrossEntropyBackward, &fada::cuda::upsampled_cross_entropy_backward_cuda);
  m.def(fada::schema::kUpsampledCrossEntropyWithGrad, &fada::cuda::upsampled_cross_entropy_with_grad_cuda);
  m.def(fada::schema::kClassCenterStats, &fada_core::class_center_stats_cuda);
  m.def("check_label_errors", &fada::cuda::raise_pending_label_errors);
}
