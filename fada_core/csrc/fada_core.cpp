// Every fada_core operator schema, declared once. Backends add kernels with
// TORCH_LIBRARY_IMPL in cpu/*.cpp and cuda/*.cu; autograd and fake (meta)
// kernels are registered from Python (fada_core/ops.py).
#include <Python.h>
#include <torch/library.h>

#include "common/kernel_limits.h"

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
  // reduction follows torch's enum: 0 = none, 1 = mean, 2 = sum.
  // domain: 0 = source (soft label in the first K channels), 1 = target.
  m.def(
      "fada_loss(Tensor disc_logits, Tensor seg_logits, int domain, "
      "float temperature, float cap, int out_h, int out_w, Tensor? weight, "
      "int reduction) -> Tensor");
  m.def(
      "fada_loss_backward(Tensor grad, Tensor disc_logits, Tensor seg_logits, "
      "int domain, float temperature, float cap, int out_h, int out_w, "
      "Tensor? weight, int reduction) -> Tensor");
  // The loss and its gradient for an upstream gradient of 1 (reduction mean
  // or sum): the autograd backward is grad_out * grad_disc, so training
  // computes both in one pass (one launch on the CUDA fast path).
  m.def(
      "fada_loss_with_grad(Tensor disc_logits, Tensor seg_logits, int domain, "
      "float temperature, float cap, int out_h, int out_w, Tensor? weight, "
      "int reduction) -> (Tensor loss, Tensor grad_disc)");
  m.def(
      "upsampled_cross_entropy(Tensor logits, Tensor labels, float temperature, "
      "int ignore_index, int reduction) -> Tensor");
  m.def(
      "upsampled_cross_entropy_backward(Tensor grad, Tensor logits, "
      "Tensor labels, float temperature, int ignore_index, int reduction) "
      "-> Tensor");
  // As fada_loss_with_grad: the loss and its gradient for an upstream
  // gradient of 1 (reduction mean or sum); one pass over the pixels on the
  // CPU, one launch on the CUDA fast path.
  m.def(
      "upsampled_cross_entropy_with_grad(Tensor logits, Tensor labels, "
      "float temperature, int ignore_index, int reduction) "
      "-> (Tensor loss, Tensor grad_logits)");
  m.def(
      "class_center_stats(Tensor features, Tensor labels, int num_classes, "
      "int ignore_index) -> (Tensor, Tensor, Tensor)");
  // Capability limits (common/kernel_limits.h), for Python's backend choice.
  m.def("cuda_backward_max_channels(int acc_bytes, int shared_bytes) -> int",
        [](int64_t acc_bytes, int64_t shared_bytes) {
          return fada::limits::cuda_backward_max_channels(acc_bytes, shared_bytes);
        });
}
