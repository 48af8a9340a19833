// What the host layers of the two losses (fada_loss_host.h,
// cross_entropy_host.h) do alike around their kernels: the loss tensor and
// its value for an empty batch, the upstream gradient's checks, and the
// gradient w.r.t. logits that may not be contiguous while the kernels write
// contiguous ones. Host code only, ISA-neutral.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

namespace fada {
namespace host {

// The loss: (B, H, W) for reduction none (0), else a scalar, with `opts`; for
// an empty batch already final (mean over no pixel: NaN, like torch; sum: 0).
inline at::Tensor loss_tensor(const at::TensorOptions& opts, int64_t B, int64_t H, int64_t W, int64_t reduction) {
  at::Tensor out = reduction == 0 ? at::empty({B, H, W}, opts) : at::empty({}, opts);
  if (B == 0 && reduction != 0) out.fill_(reduction == 1 ? std::numeric_limits<double>::quiet_NaN() : 0.0);
  return out;
}

// The upstream gradient of `op` (its name in messages, "..._backward"): on
// `device`, (B, H, W) for reduction none, else one element.
inline void check_upstream_grad(const at::Tensor& grad, const at::Device& device, int64_t B, int64_t H, int64_t W,
                                int64_t reduction, const char* op) {
  TORCH_CHECK(grad.device() == device, op, ": grad must be on ", device, ", got ", grad.device());
  if (reduction == 0) {
    TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == H && grad.size(2) == W, op,
                ": grad must be (B, H, W) for reduction none, got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, op, ": grad must be a scalar, got ", grad.sizes());
  }
}

// The fused loss-and-gradient ops (`op`, "..._with_grad") assume an upstream
// gradient of 1 on a scalar loss: reduction mean (1) or sum (2).
inline void check_fused_reduction(int64_t reduction, const char* op) {
  TORCH_CHECK(reduction != 0, op, ": reduction must be mean (1) or sum (2), got none (0)");
}

// The gradient w.r.t. `input` (B, ...), strided like it (empty_like), from
// `launch(x, grad)`, which writes the gradient of the contiguous x into the
// contiguous `grad`: the result itself when input is contiguous, else a
// buffer copied into it afterwards. An empty batch launches nothing.
template <typename Launch>
at::Tensor gradient_like(const at::Tensor& input, Launch launch) {
  at::Tensor result = at::empty_like(input);
  if (input.size(0) == 0) return result;
  const at::Tensor x = input.contiguous();
  at::Tensor grad = input.is_contiguous() ? result : at::empty_like(x);
  launch(x, grad);
  if (!grad.is_same(result)) result.copy_(grad);
  return result;
}

}  // namespace host
}  // namespace fada
