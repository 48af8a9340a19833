// The host layer of upsampled_cross_entropy, its backward and the fused
// upsampled_cross_entropy_with_grad, shared by the
// CPU (cpu/cross_entropy_kernel.cpp) and CUDA (cuda/cross_entropy_kernel.cu)
// backends: argument checks, contiguity, output and gradient allocation, empty
// batches, the copy back into a non-contiguous gradient (the last three with
// the FADA loss's, host_util.h). Each backend passes only its device check
// and a launch function. Host code only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <tuple>

#include "host_util.h"

namespace fada {
namespace host {

// `backend` names the kernel in messages ("CPU kernel", "CUDA kernel");
// `on_device`: whether the backend takes tensors on logits' device.
inline void check_ce_inputs(const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t reduction,
                            const char* backend, bool on_device) {
  TORCH_CHECK(logits.dim() == 4, "upsampled_cross_entropy: logits must be (B, K, h, w), got ", logits.sizes());
  TORCH_CHECK(labels.dim() == 3, "upsampled_cross_entropy: labels must be (B, H, W), got ", labels.sizes());
  TORCH_CHECK(logits.device() == labels.device(), "upsampled_cross_entropy: logits and labels must be on the same device, got ",
              logits.device(), " and ", labels.device());
  TORCH_CHECK(on_device, "upsampled_cross_entropy (", backend, "): tensors on ", logits.device(), " are not its device");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "upsampled_cross_entropy: expected floating point logits, got ",
              logits.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "upsampled_cross_entropy: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(logits.size(0) == labels.size(0), "upsampled_cross_entropy: batch sizes differ: ", logits.size(0), " vs ",
              labels.size(0));
  TORCH_CHECK(logits.size(1) > 0, "upsampled_cross_entropy: logits need at least one class");
  TORCH_CHECK(logits.size(2) > 0 && logits.size(3) > 0, "upsampled_cross_entropy: empty logits spatial size");
  TORCH_CHECK(labels.size(1) > 0 && labels.size(2) > 0, "upsampled_cross_entropy: empty labels spatial size");
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "upsampled_cross_entropy: reduction must be 0, 1 or 2, got ", reduction);
  TORCH_CHECK(temperature > 0, "upsampled_cross_entropy: temperature must be positive, got ", temperature);
}

// The loss (loss_tensor, H x W: the labels') in the accumulation type of the
// logits (float32 for half logits, as torch's losses under autocast).
inline at::Tensor ce_loss_output(const at::Tensor& logits, const at::Tensor& labels, int64_t reduction) {
  return loss_tensor(logits.options().dtype(at::toOpMathType(logits.scalar_type())), labels.size(0), labels.size(1),
                     labels.size(2), reduction);
}

// Forward: `launch(logits, labels, out)` with contiguous inputs, B > 0, and
// `out` from ce_loss_output.
template <typename Launch>
at::Tensor upsampled_cross_entropy_forward(const at::Tensor& logits_in, const at::Tensor& labels_in, double temperature,
                                           int64_t reduction, const char* backend, bool on_device, Launch launch) {
  check_ce_inputs(logits_in, labels_in, temperature, reduction, backend, on_device);
  at::Tensor out = ce_loss_output(logits_in, labels_in, reduction);
  if (labels_in.size(0) == 0) return out;
  launch(logits_in.contiguous(), labels_in.contiguous(), out);
  return out;
}

// Backward: `launch(grad, logits, labels, grad_logits)` with contiguous
// logits and labels, B > 0, grad checked against the reduction, and
// grad_logits contiguous (copied into the result when logits were not).
template <typename Launch>
at::Tensor upsampled_cross_entropy_backward(const at::Tensor& grad, const at::Tensor& logits_in,
                                            const at::Tensor& labels_in, double temperature, int64_t reduction,
                                            const char* backend, bool on_device, Launch launch) {
  check_ce_inputs(logits_in, labels_in, temperature, reduction, backend, on_device);
  check_upstream_grad(grad, logits_in.device(), labels_in.size(0), labels_in.size(1), labels_in.size(2), reduction,
                      "upsampled_cross_entropy_backward");
  return gradient_like(logits_in, [&](const at::Tensor& logits, at::Tensor& grad_logits) {
    launch(grad, logits, labels_in.contiguous(), grad_logits);
  });
}

// Forward and backward together, for an upstream gradient of 1 (reduction
// mean or sum): `launch(logits, labels, out, grad_logits)` with contiguous
// inputs, B > 0, the scalar `out` and a contiguous grad_logits (copied into
// the result when logits were not).
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> upsampled_cross_entropy_with_grad(const at::Tensor& logits_in,
                                                                     const at::Tensor& labels_in, double temperature,
                                                                     int64_t reduction, const char* backend,
                                                                     bool on_device, Launch launch) {
  check_ce_inputs(logits_in, labels_in, temperature, reduction, backend, on_device);
  check_fused_reduction(reduction, "upsampled_cross_entropy_with_grad");
  at::Tensor out = ce_loss_output(logits_in, labels_in, reduction);
  at::Tensor grad_logits = gradient_like(logits_in, [&](const at::Tensor& logits, at::Tensor& grad) {
    launch(logits, labels_in.contiguous(), out, grad);
  });
  return {out, grad_logits};
}

}  // namespace host
}  // namespace fada
