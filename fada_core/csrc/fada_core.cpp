// Every fada_core operator schema (common/op_schemas.h), declared once. Backends add kernels with
// TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/*.cu; autograd and fake (meta)
// kernels are registered from Python (fada_core/ops.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/kernel_limits.h"
#include "common/op_schemas.h"

// An empty module so the shared object can be imported as a Python extension
// (AOT builds) just to run the static registrars below. No pybind.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fada_core, m) {
  m.def(fada::schema::kFadaLoss);
  m.def(fada::schema::kFadaLossBackward);
  m.def(fada::schema::kFadaLossWithGrad);
  m.def(fada::schema::kUpsampledCrossEntropy);
  m.def(fada::schema::kUpsampledCrossEntropyBackward);
  m.def(fada::schema::kUpsampledCrossEntropyWithGrad);
  m.def(fada::schema::kClassCenterStats);
  // Capability limits (common/kernel_limits.h), for Python's backend choice.
  m.def("cuda_backward_max_channels(int acc_bytes, int shared_bytes) -> int",
        [](int64_t acc_bytes, int64_t shared_bytes) {
          return fada::limits::cuda_backward_max_channels(acc_bytes, shared_bytes);
        });
  // The most classes the staged (fast-path) CUDA kernel of `op` ("fada_loss"
  // or "upsampled_cross_entropy") takes; more run the general kernels.
  m.def("cuda_staged_max_classes(str op, int acc_bytes, int shared_bytes) -> int",
        [](const std::string& op, int64_t acc_bytes, int64_t shared_bytes) {
          TORCH_CHECK(op == "fada_loss" || op == "upsampled_cross_entropy",
                      "cuda_staged_max_classes: op must be 'fada_loss' or 'upsampled_cross_entropy', got '", op, "'");
          const auto footprint =
              op == "fada_loss" ? fada::limits::fada_staged_footprint() : fada::limits::ce_staged_footprint();
          return fada::limits::cuda_staged_max_classes(footprint, acc_bytes, shared_bytes);
        });
}
