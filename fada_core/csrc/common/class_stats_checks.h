// The host layer of class_center_stats, shared by the CPU and CUDA kernels
// (host code only): argument checks (both backends reject the same inputs with
// the same words), the float64 outputs, empty inputs. Each backend passes only
// its device check and a launch function.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

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

// Checks, allocates (counts, means, m2) as float64 zeros and, unless there are
// no pixels, calls `launch(counts, means, m2)` to fill them. `backend` names
// the kernel in messages; `on_device`: whether it takes features' device.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> class_center_stats_host(const at::Tensor& features,
                                                                       const at::Tensor& labels, int64_t num_classes,
                                                                       const char* backend, bool on_device,
                                                                       Launch launch) {
  check_class_stats_args(features, labels);
  TORCH_CHECK(on_device, "class_center_stats (", backend, "): tensors on ", features.device(), " are not its device");
  // int32 class slots in both kernels
  TORCH_CHECK(num_classes > 0 && num_classes < (int64_t{1} << 30),
              "class_center_stats: num_classes must be in [1, 2^30), got ", num_classes);
  const auto opts = features.options().dtype(at::kDouble);
  at::Tensor counts = at::zeros({num_classes}, opts);
  at::Tensor means = at::zeros({num_classes, features.size(1)}, opts);
  at::Tensor m2 = at::zeros({num_classes}, opts);
  if (labels.numel() > 0) launch(counts, means, m2);
  return {counts, means, m2};
}

}  // namespace stats
}  // namespace fada_core
