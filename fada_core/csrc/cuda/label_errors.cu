// fada_core::check_label_errors(): raises for a bad label that a CUDA kernel
// recorded (cuda/label_errors.cuh); the caller synchronises first. Defined
// only where the CUDA sources are built.
#include <torch/library.h>

#include "cuda/label_errors.cuh"

TORCH_LIBRARY_FRAGMENT(fada_core, m) {
  m.def("check_label_errors() -> ()", &fada::cuda::raise_pending_label_errors);
}
