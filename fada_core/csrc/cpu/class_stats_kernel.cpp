// class_center_stats on the CPU.
//
// One read of the features, channel-major: for a block of channels, walk the
// pixels of every (b, channel) plane in order and add into that block's
// per-class accumulators (float64, shifted by each class's first pixel; see
// common/stats_math.h). Blocks of channels are independent and each is done by
// one thread in a fixed pixel order, so the result does not depend on the
// number of threads. The labels (a compact int32 copy, a few hundred KB) are
// re-read for every block from cache.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <vector>

#include "common/stats_math.h"

namespace fada_core {
namespace {

// Channels per block: a pixel's label is loaded once per block, and the block's
// accumulators for one class are contiguous (vectorisable). 16 also keeps a
// run of same-class pixels from serialising on one accumulator.
constexpr int64_t kBlock = 16;

struct LabelScan {
  std::vector<int32_t> slot;    // per pixel: class, or num_classes for ignored pixels
  std::vector<int64_t> count;   // per class
  std::vector<int64_t> first;   // per class: first pixel (flat b*h*w index), -1 if absent
};

LabelScan scan_labels(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  const at::Tensor flat = labels.to(at::kLong).contiguous();
  const int64_t* lab = flat.data_ptr<int64_t>();
  const int64_t n = flat.numel();
  LabelScan scan;
  scan.slot.resize(n);
  scan.count.assign(num_classes, 0);
  scan.first.assign(num_classes, -1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = stats::label_slot(lab[i], num_classes, ignore_index);
    TORCH_CHECK(k >= 0, "class_center_stats: labels must be in [0, num_classes=", num_classes,
                ") or equal ignore_index=", ignore_index, "; found ", lab[i]);
    scan.slot[i] = static_cast<int32_t>(k);
    if (k < num_classes) {
      if (scan.count[k] == 0) scan.first[k] = i;
      ++scan.count[k];
    }
  }
  return scan;
}

// Accumulates channels [c0, c0 + CB) of every image into s1/s2, laid out
// [(num_classes + 1) slots][CB]; shift has the same layout (0 for the dump slot).
template <typename scalar_t, int64_t CB>
void accumulate_block(const scalar_t* x, int64_t batch, int64_t channels, int64_t hw, int64_t c0,
                      const int32_t* slot, const double* shift, double* s1, double* s2) {
  for (int64_t b = 0; b < batch; ++b) {
    const scalar_t* plane[CB];
    for (int64_t j = 0; j < CB; ++j) plane[j] = x + (b * channels + c0 + j) * hw;
    const int32_t* lab = slot + b * hw;
    for (int64_t p = 0; p < hw; ++p) {
      const int64_t base = static_cast<int64_t>(lab[p]) * CB;
      for (int64_t j = 0; j < CB; ++j) {
        stats::accumulate(static_cast<double>(plane[j][p]), shift[base + j], s1[base + j],
                          s2[base + j]);
      }
    }
  }
}

// Pixels of each image grouped by class (counting sort, increasing pixel index
// within a class): list[b] holds the plane offsets, start[b * (K + 1) + k] where
// class k's run begins.
struct ClassLists {
  std::vector<int32_t> pixel;
  std::vector<int64_t> start;
};

ClassLists group_by_class(const LabelScan& scan, int64_t batch, int64_t hw, int64_t num_classes) {
  ClassLists lists;
  lists.pixel.resize(batch * hw);
  lists.start.assign(batch * (num_classes + 1), 0);
  std::vector<int64_t> fill(num_classes + 1);
  int64_t out = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t* lab = scan.slot.data() + b * hw;
    std::fill(fill.begin(), fill.end(), 0);
    for (int64_t p = 0; p < hw; ++p) ++fill[lab[p]];
    int64_t* start = lists.start.data() + b * (num_classes + 1);
    for (int64_t k = 0; k < num_classes; ++k) {
      start[k] = out;
      out += fill[k];
      fill[k] = start[k];
    }
    start[num_classes] = out;  // end of the valid pixels (ignored ones are not listed)
    for (int64_t p = 0; p < hw; ++p) {
      const int32_t k = lab[p];
      if (k < num_classes) lists.pixel[fill[k]++] = static_cast<int32_t>(p);
    }
  }
  return lists;
}

// Σ(x − shift) and Σ(x − shift)² over the listed pixels of one plane, in a
// fixed order (four interleaved partial sums, then combined).
template <typename scalar_t>
inline void sum_listed(const scalar_t* plane, const int32_t* idx, int64_t n, double shift, double& s1,
                       double& s2) {
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    stats::accumulate(static_cast<double>(plane[idx[i]]), shift, a0, q0);
    stats::accumulate(static_cast<double>(plane[idx[i + 1]]), shift, a1, q1);
    stats::accumulate(static_cast<double>(plane[idx[i + 2]]), shift, a2, q2);
    stats::accumulate(static_cast<double>(plane[idx[i + 3]]), shift, a3, q3);
  }
  for (; i < n; ++i) stats::accumulate(static_cast<double>(plane[idx[i]]), shift, a0, q0);
  s1 += (a0 + a1) + (a2 + a3);
  s2 += (q0 + q1) + (q2 + q3);
}

template <typename scalar_t>
void class_stats_sorted(const at::Tensor& features, const LabelScan& scan, int64_t num_classes,
                        at::Tensor& counts, at::Tensor& means, at::Tensor& m2) {
  const int64_t batch = features.size(0);
  const int64_t channels = features.size(1);
  const int64_t hw = features.size(2) * features.size(3);
  const scalar_t* x = features.data_ptr<scalar_t>();
  const ClassLists lists = group_by_class(scan, batch, hw, num_classes);
  std::vector<double> sum1(num_classes * channels, 0.0), sum2(num_classes * channels, 0.0);
  auto shift_of = [&](int64_t k, int64_t c) -> double {
    const int64_t i = scan.first[k];
    if (i < 0) return 0.0;
    const int64_t b = i / hw, p = i % hw;
    return static_cast<double>(x[(b * channels + c) * hw + p]);
  };
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> shift(num_classes), s1(num_classes), s2(num_classes);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < num_classes; ++k) {
        shift[k] = shift_of(k, c);
        s1[k] = 0.0;
        s2[k] = 0.0;
      }
      for (int64_t b = 0; b < batch; ++b) {
        const scalar_t* plane = x + (b * channels + c) * hw;
        const int64_t* start = lists.start.data() + b * (num_classes + 1);
        for (int64_t k = 0; k < num_classes; ++k) {
          sum_listed(plane, lists.pixel.data() + start[k], start[k + 1] - start[k], shift[k], s1[k], s2[k]);
        }
      }
      for (int64_t k = 0; k < num_classes; ++k) {
        sum1[k * channels + c] = s1[k];
        sum2[k * channels + c] = s2[k];
      }
    }
  });
  double* counts_p = counts.data_ptr<double>();
  double* means_p = means.data_ptr<double>();
  double* m2_p = m2.data_ptr<double>();
  for (int64_t k = 0; k < num_classes; ++k) {
    const double n = static_cast<double>(scan.count[k]);
    counts_p[k] = n;
    double acc = 0.0;
    for (int64_t c = 0; c < channels; ++c) {
      const double a = sum1[k * channels + c], q = sum2[k * channels + c];
      means_p[k * channels + c] = stats::finish_mean(n > 0 ? shift_of(k, c) : 0.0, a, n);
      acc += stats::finish_m2(a, q, n);
    }
    m2_p[k] = acc;
  }
}

template <typename scalar_t>
void class_stats_impl(const at::Tensor& features, const LabelScan& scan, int64_t num_classes,
                      at::Tensor& counts, at::Tensor& means, at::Tensor& m2) {
  const int64_t batch = features.size(0);
  const int64_t channels = features.size(1);
  const int64_t hw = features.size(2) * features.size(3);
  const scalar_t* x = features.data_ptr<scalar_t>();
  const int64_t slots = num_classes + 1;

  // Shifted sums per (class, channel), written by the owner of each channel.
  std::vector<double> sum1(num_classes * channels, 0.0), sum2(num_classes * channels, 0.0);
  auto shift_of = [&](int64_t k, int64_t c) -> double {
    const int64_t i = scan.first[k];
    if (i < 0) return 0.0;
    const int64_t b = i / hw, p = i % hw;
    return static_cast<double>(x[(b * channels + c) * hw + p]);
  };

  const int64_t blocks = (channels + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> shift(slots * kBlock), s1(slots * kBlock), s2(slots * kBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kBlock;
      const int64_t cb = std::min(kBlock, channels - c0);
      // Full blocks use the CB=16 kernel; a tail block goes channel by channel.
      for (int64_t t = 0; t < cb; t += (cb == kBlock ? kBlock : 1)) {
        const int64_t width = cb == kBlock ? kBlock : 1;
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        for (int64_t k = 0; k < slots; ++k)
          for (int64_t j = 0; j < width; ++j)
            shift[k * width + j] = k < num_classes ? shift_of(k, c0 + t + j) : 0.0;
        if (width == kBlock) {
          accumulate_block<scalar_t, kBlock>(x, batch, channels, hw, c0 + t, scan.slot.data(),
                                             shift.data(), s1.data(), s2.data());
        } else {
          accumulate_block<scalar_t, 1>(x, batch, channels, hw, c0 + t, scan.slot.data(),
                                        shift.data(), s1.data(), s2.data());
        }
        for (int64_t k = 0; k < num_classes; ++k)
          for (int64_t j = 0; j < width; ++j) {
            sum1[k * channels + c0 + t + j] = s1[k * width + j];
            sum2[k * channels + c0 + t + j] = s2[k * width + j];
          }
      }
    }
  });

  double* counts_p = counts.data_ptr<double>();
  double* means_p = means.data_ptr<double>();
  double* m2_p = m2.data_ptr<double>();
  for (int64_t k = 0; k < num_classes; ++k) {
    const double n = static_cast<double>(scan.count[k]);
    counts_p[k] = n;
    double acc = 0.0;
    for (int64_t c = 0; c < channels; ++c) {
      const double a = sum1[k * channels + c], q = sum2[k * channels + c];
      means_p[k * channels + c] = stats::finish_mean(n > 0 ? shift_of(k, c) : 0.0, a, n);
      acc += stats::finish_m2(a, q, n);
    }
    m2_p[k] = acc;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_center_stats_cpu(const at::Tensor& features,
                                                                      const at::Tensor& labels,
                                                                      int64_t num_classes,
                                                                      int64_t ignore_index) {
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
  TORCH_CHECK(num_classes > 0 && num_classes < std::numeric_limits<int32_t>::max(),
              "class_center_stats: num_classes must be positive, got ", num_classes);

  const int64_t channels = features.size(1);
  const auto opts = features.options().dtype(at::kDouble);
  at::Tensor counts = at::zeros({num_classes}, opts);
  at::Tensor means = at::zeros({num_classes, channels}, opts);
  at::Tensor m2 = at::zeros({num_classes}, opts);
  if (labels.numel() == 0) return {counts, means, m2};

  const LabelScan scan = scan_labels(labels, num_classes, ignore_index);
  if (channels == 0) {
    for (int64_t k = 0; k < num_classes; ++k)
      counts.data_ptr<double>()[k] = static_cast<double>(scan.count[k]);
    return {counts, means, m2};
  }
  // Channel planes must be contiguous (NCHW); channels_last and strided inputs are copied.
  const at::Tensor x = features.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_center_stats_cpu",
                                  [&] {
                                    if (std::getenv("FADA_SORTED"))
                                      class_stats_sorted<scalar_t>(x, scan, num_classes, counts, means, m2);
                                    else
                                      class_stats_impl<scalar_t>(x, scan, num_classes, counts, means, m2);
                                  });
  return {counts, means, m2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fada_core, CPU, m) {
  m.impl("class_center_stats", &class_center_stats_cpu);
}

}  // namespace fada_core
