// The schemas of fada_core's operators, written once: fada_core.cpp declares
// them in the fada_core namespace, and the CUDA emulation test
// (tests/cuda_emulation/emulated_ops.cpp) in its own, so both have the same
// arguments and defaults.
//
// reduction follows torch's enum: 0 = none, 1 = mean, 2 = sum.
// domain: 0 = source (soft label in the first K channels), 1 = target.
// align_corners: the corner convention of the bilinear upsampling (True: FADA's).
#pragma once

namespace fada {
namespace schema {

constexpr const char* kFadaLoss =
    "fada_loss(Tensor disc_logits, Tensor seg_logits, int domain, "
    "float temperature, float cap, int out_h, int out_w, Tensor? weight, "
    "int reduction, bool align_corners=True) -> Tensor";
constexpr const char* kFadaLossBackward =
    "fada_loss_backward(Tensor grad, Tensor disc_logits, Tensor seg_logits, "
    "int domain, float temperature, float cap, int out_h, int out_w, "
    "Tensor? weight, int reduction, bool align_corners=True) -> Tensor";
// The loss and its gradient for an upstream gradient of 1 (reduction mean or
// sum): the autograd backward is grad_out * grad_disc, so training computes
// both in one pass (one launch on the CUDA fast path).
constexpr const char* kFadaLossWithGrad =
    "fada_loss_with_grad(Tensor disc_logits, Tensor seg_logits, int domain, "
    "float temperature, float cap, int out_h, int out_w, Tensor? weight, "
    "int reduction, bool align_corners=True) -> (Tensor loss, Tensor grad_disc)";
constexpr const char* kUpsampledCrossEntropy =
    "upsampled_cross_entropy(Tensor logits, Tensor labels, float temperature, "
    "int ignore_index, int reduction, bool align_corners=True) -> Tensor";
constexpr const char* kUpsampledCrossEntropyBackward =
    "upsampled_cross_entropy_backward(Tensor grad, Tensor logits, "
    "Tensor labels, float temperature, int ignore_index, int reduction, "
    "bool align_corners=True) -> Tensor";
// As fada_loss_with_grad: the loss and its gradient for an upstream gradient
// of 1 (reduction mean or sum); one launch on the CUDA fast path.
constexpr const char* kUpsampledCrossEntropyWithGrad =
    "upsampled_cross_entropy_with_grad(Tensor logits, Tensor labels, "
    "float temperature, int ignore_index, int reduction, "
    "bool align_corners=True) -> (Tensor loss, Tensor grad_logits)";
constexpr const char* kClassCenterStats =
    "class_center_stats(Tensor features, Tensor labels, int num_classes, "
    "int ignore_index) -> (Tensor, Tensor, Tensor)";

}  // namespace schema
}  // namespace fada
