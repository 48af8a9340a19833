// The host layer of fada_loss, fada_loss_backward and the fused
// fada_loss_with_grad, shared by the CPU (cpu/fada_loss_kernel.cpp) and CUDA
// (cuda/fada_loss_kernel.cu) backends: argument checks (both backends reject
// the same inputs with the same words), contiguity, the weight and upstream
// gradient in the accumulation type, output and gradient allocation, empty
// batches, the copy back into a non-contiguous gradient. What the
// cross-entropy does alike (loss tensor, upstream-gradient checks, the fused
// ops' reduction check, the copy back) lives in host_util.h. Each backend
// passes only its device check and a launch function. Host code only,
// ISA-neutral.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

#include "host_util.h"

namespace fada {
namespace host {

// The scalar arguments of the three ops, in schema order (a new one is one
// more field, not one more parameter of every function below).
struct FadaLossArgs {
  int64_t domain;       // 0: soft label in the first K disc channels, 1: the last K
  double temperature;
  double cap;
  int64_t out_h, out_w;
  int64_t reduction;    // 0 none, 1 mean, 2 sum
  bool align_corners;   // of the bilinear upsampling (common/fada_math.h axis_map)
};

// `backend` names the kernel in messages ("CPU kernel", "CUDA kernel");
// `on_device`: whether the backend takes tensors on disc_logits' device.
inline void check_fada_inputs(const at::Tensor& disc, const at::Tensor& seg, const c10::optional<at::Tensor>& weight,
                              const FadaLossArgs& a, const char* backend, bool on_device) {
  TORCH_CHECK(disc.dim() == 4, "fada_loss: disc_logits must be (B, 2K, h, w), got ", disc.sizes());
  TORCH_CHECK(seg.dim() == 4, "fada_loss: seg_logits must be (B, K, h, w), got ", seg.sizes());
  TORCH_CHECK(disc.device() == seg.device(), "fada_loss: disc_logits and seg_logits must be on the same device, got ",
              disc.device(), " and ", seg.device());
  TORCH_CHECK(on_device, "fada_loss (", backend, "): tensors on ", disc.device(), " are not its device");
  TORCH_CHECK(disc.scalar_type() == seg.scalar_type(), "fada_loss: disc_logits and seg_logits must have the same dtype, got ",
              disc.scalar_type(), " and ", seg.scalar_type());
  TORCH_CHECK(at::isFloatingType(disc.scalar_type()), "fada_loss: expected floating point logits, got ",
              disc.scalar_type());
  TORCH_CHECK(disc.size(0) == seg.size(0), "fada_loss: batch sizes differ: ", disc.size(0), " vs ", seg.size(0));
  TORCH_CHECK(seg.size(1) > 0, "fada_loss: seg_logits needs at least one class");
  TORCH_CHECK(disc.size(1) == 2 * seg.size(1), "fada_loss: disc_logits needs 2K = ", 2 * seg.size(1),
              " channels, got ", disc.size(1));
  TORCH_CHECK(disc.size(2) > 0 && disc.size(3) > 0 && seg.size(2) > 0 && seg.size(3) > 0,
              "fada_loss: empty spatial size");
  TORCH_CHECK(a.out_h > 0 && a.out_w > 0, "fada_loss: output size must be positive, got ", a.out_h, "x", a.out_w);
  TORCH_CHECK(a.domain == 0 || a.domain == 1, "fada_loss: domain must be 0 (source) or 1 (target), got ", a.domain);
  TORCH_CHECK(a.reduction >= 0 && a.reduction <= 2, "fada_loss: reduction must be 0, 1 or 2, got ", a.reduction);
  TORCH_CHECK(a.temperature > 0, "fada_loss: temperature must be positive, got ", a.temperature);
  if (weight.has_value()) {
    const at::Tensor& wt = *weight;
    TORCH_CHECK(wt.device() == disc.device(), "fada_loss: weight must be on ", disc.device(), ", got ", wt.device());
    TORCH_CHECK(at::isFloatingType(wt.scalar_type()), "fada_loss: weight must be floating point, got ",
                wt.scalar_type());
    TORCH_CHECK(wt.dim() == 3 && wt.size(0) == disc.size(0) && wt.size(1) == a.out_h && wt.size(2) == a.out_w,
                "fada_loss: weight must be (B, H, W) = (", disc.size(0), ", ", a.out_h, ", ", a.out_w, "), got ",
                wt.sizes());
  }
}

// The accumulation type of logits of type `t` (float for half inputs): the
// kernels' weight, upstream gradient and loss.
inline at::ScalarType acc_type(const at::Tensor& t) { return at::toOpMathType(t.scalar_type()); }

// The weight as the kernels read it: contiguous, in the accumulation type
// (undefined when there is none).
inline at::Tensor acc_weight(const c10::optional<at::Tensor>& weight, const at::Tensor& disc) {
  return weight.has_value() ? weight->to(acc_type(disc)).contiguous() : at::Tensor();
}

// The loss (loss_tensor) in the accumulation type (float32 for half inputs,
// as torch's losses under autocast).
inline at::Tensor loss_output(const at::Tensor& disc, const FadaLossArgs& a) {
  return loss_tensor(disc.options().dtype(acc_type(disc)), disc.size(0), a.out_h, a.out_w, a.reduction);
}

// Forward: `launch(disc, seg, weight, out)` with contiguous logits, B > 0,
// the weight as acc_weight gives it and `out` from loss_output.
template <typename Launch>
at::Tensor fada_loss_forward(const at::Tensor& disc_in, const at::Tensor& seg_in,
                             const c10::optional<at::Tensor>& weight, const FadaLossArgs& a, const char* backend,
                             bool on_device, Launch launch) {
  check_fada_inputs(disc_in, seg_in, weight, a, backend, on_device);
  at::Tensor out = loss_output(disc_in, a);
  if (disc_in.size(0) == 0) return out;
  launch(disc_in.contiguous(), seg_in.contiguous(), acc_weight(weight, disc_in), out);
  return out;
}

// Backward: `launch(grad, disc, seg, weight, grad_disc)` with the upstream
// gradient checked against the reduction, contiguous and in the accumulation
// type, contiguous logits, B > 0, and grad_disc contiguous in the logits'
// dtype (copied into the result when the logits were not contiguous).
template <typename Launch>
at::Tensor fada_loss_backward(const at::Tensor& grad, const at::Tensor& disc_in, const at::Tensor& seg_in,
                              const c10::optional<at::Tensor>& weight, const FadaLossArgs& a, const char* backend,
                              bool on_device, Launch launch) {
  check_fada_inputs(disc_in, seg_in, weight, a, backend, on_device);
  check_upstream_grad(grad, disc_in.device(), disc_in.size(0), a.out_h, a.out_w, a.reduction, "fada_loss_backward");
  return gradient_like(disc_in, [&](const at::Tensor& disc, at::Tensor& grad_disc) {
    launch(grad.to(acc_type(disc)).contiguous(), disc, seg_in.contiguous(), acc_weight(weight, disc), grad_disc);
  });
}

// Forward and backward together, for an upstream gradient of 1 (reduction
// mean or sum): `launch(disc, seg, weight, out, grad_disc)` with the forward's
// arguments and the backward's grad_disc.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor> fada_loss_with_grad(const at::Tensor& disc_in, const at::Tensor& seg_in,
                                                       const c10::optional<at::Tensor>& weight, const FadaLossArgs& a,
                                                       const char* backend, bool on_device, Launch launch) {
  check_fada_inputs(disc_in, seg_in, weight, a, backend, on_device);
  check_fused_reduction(a.reduction, "fada_loss_with_grad");
  at::Tensor out = loss_output(disc_in, a);
  at::Tensor grad_disc = gradient_like(disc_in, [&](const at::Tensor& disc, at::Tensor& grad) {
    launch(disc, seg_in.contiguous(), acc_weight(weight, disc), out, grad);
  });
  return {out, grad_disc};
}

}  // namespace host
}  // namespace fada
