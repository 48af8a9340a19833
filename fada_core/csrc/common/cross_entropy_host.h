// The host layer of upsampled_cross_entropy, its backward and the fused
// upsampled_cross_entropy_with_grad, shared by the
// CPU (cpu/cross_entropy_kernel.cpp) and CUDA (cuda/cross_entropy_kernel.cu)
// backends: argument checks, contiguity, output and gradient allocation, empty
// batches, the copy back into a non-contiguous gradient. Each backend passes
// only its device check and a launch function. Host code only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>
#include <tuple>

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

// The loss's options: the accumulation type of the logits (float32 for half
// logits, as torch's losses under autocast).
inline at::TensorOptions ce_loss_options(const at::Tensor& logits) {
  return logits.options().dtype(at::toOpMathType(logits.scalar_type()));
}

// Forward: `launch(logits, labels, out)` with contiguous inputs, B > 0, and
// `out` allocated ((B, H, W) for reduction none, else a scalar; ce_loss_options).
template <typename Launch>
at::Tensor upsampled_cross_entropy_forward(const at::Tensor& logits_in, const at::Tensor& labels_in, double temperature,
                                           int64_t reduction, const char* backend, bool on_device, Launch launch) {
  check_ce_inputs(logits_in, labels_in, temperature, reduction, backend, on_device);
  const int64_t B = labels_in.size(0), H = labels_in.size(1), W = labels_in.size(2);
  const at::TensorOptions opts = ce_loss_options(logits_in);
  at::Tensor out = reduction == 0 ? at::empty({B, H, W}, opts) : at::empty({}, opts);
  if (B == 0) {  // mean over no pixel: NaN, like torch
    if (reduction != 0) out.fill_(reduction == 1 ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    return out;
  }
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
  TORCH_CHECK(grad.device() == logits_in.device(), "upsampled_cross_entropy_backward: grad must be on ",
              logits_in.device());
  const int64_t B = labels_in.size(0), H = labels_in.size(1), W = labels_in.size(2);
  if (reduction == 0) {
    TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == H && grad.size(2) == W,
                "upsampled_cross_entropy_backward: grad must be (B, H, W) for reduction none, got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, "upsampled_cross_entropy_backward: grad must be a scalar, got ", grad.sizes());
  }
  at::Tensor result = at::empty_like(logits_in);
  if (B == 0) return result;
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor grad_logits = logits_in.is_contiguous() ? result : at::empty_like(logits);
  launch(grad, logits, labels_in.contiguous(), grad_logits);
  if (!grad_logits.is_same(result)) result.copy_(grad_logits);
  return result;
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
  TORCH_CHECK(reduction != 0, "upsampled_cross_entropy_with_grad: reduction must be mean (1) or sum (2), got none (0)");
  at::Tensor out = at::empty({}, ce_loss_options(logits_in));
  at::Tensor result = at::empty_like(logits_in);
  if (labels_in.size(0) == 0) {  // mean over no pixel: NaN, like torch
    out.fill_(reduction == 1 ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    return {out, result};
  }
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor grad_logits = logits_in.is_contiguous() ? result : at::empty_like(logits);
  launch(logits, labels_in.contiguous(), out, grad_logits);
  if (!grad_logits.is_same(result)) result.copy_(grad_logits);
  return {out, result};
}

}  // namespace host
}  // namespace fada
