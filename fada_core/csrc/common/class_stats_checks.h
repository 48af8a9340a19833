// Argument checks of class_center_stats, shared by the CPU and CUDA kernels
// (host code only) so both backends reject the same inputs with the same words.
#pragma once

#include <ATen/ATen.h>

namespace fada_core {
namespace stats {

inline void check_class_stats_args(const at::Tensor& features, const at::Tensor& labels) {
  TORCH_CHECK(features.dim() == 4, "class_center_stats: features must be (B, C, h, w), got ",
              features.sizes());
  TORCH_CHECK(labels.dim() == 3, "class_center_stats: labels must be (B, h, w), got ",
              labels.sizes());
  TORCH_CHECK(features.size(0) == labels.size(0) && features.size(2) == labels.size(1) &&
                  features.size(3) == labels.size(2),
              "class_center_stats: labels ", labels.sizes(), " do not match features ",
              features.sizes());
  TORCH_CHECK(features.device() == labels.device(),
              "class_center_stats: features and labels must be on the same device, got ",
              features.device(), " and ", labels.device());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()),
              "class_center_stats: features must be floating point, got ", features.scalar_type());
  TORCH_CHECK(!at::isFloatingType(labels.scalar_type()) && !at::isComplexType(labels.scalar_type()),
              "class_center_stats: labels must be an integer tensor, got ", labels.scalar_type());
}

}  // namespace stats
}  // namespace fada_core
