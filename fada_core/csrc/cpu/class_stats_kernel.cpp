// class_center_stats on the CPU.
//
// One read of the features, channel-major: for a block of 16 channels, walk
// the pixels of every (b, channel) plane in order and add into that block's
// per-class accumulators (float64, shifted by each class's first pixel; see
// common/stats_math.h). Blocks of channels are independent and each is done by
// one thread in a fixed pixel order, so the result does not depend on the
// number of threads. The labels (a compact int32 copy, a few hundred KB) are
// re-read for every block from cache. float32 on x86 with AVX2 takes a
// vectorised path (8x8 register transposes, 4-wide float64 accumulators);
// other dtypes and the last partial block of channels use the scalar loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <limits>
#include <tuple>
#include <vector>

#include "common/class_stats_checks.h"
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// Compiled for AVX2+FMA whatever the build flags (also in AOT builds without
// -march=native), used only when the CPU has them.
#define FADA_CLASS_STATS_AVX2 1
#define FADA_AVX2 __attribute__((target("avx2,fma")))

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// float32, 16 channels at a time: 8 pixels of 8 channels are loaded as rows
// and transposed in registers, so each pixel then adds 16 channels with four
// 4-wide float64 vectors. Even and odd pixels go to two accumulator banks so
// runs of one class do not serialise on the same memory. Output layout as
// accumulate_block: [(K + 1)][16] per bank, `bank_stride` apart.
FADA_AVX2 inline void transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Adds 4 channels (as floats) of one pixel into slot `base` of s1/s2.
FADA_AVX2 inline void add4(__m128 v, const double* shift, double* s1, double* s2) {
  __m256d a = _mm256_loadu_pd(s1), q = _mm256_loadu_pd(s2);
  stats::accumulate(_mm256_cvtps_pd(v), _mm256_loadu_pd(shift), a, q);
  _mm256_storeu_pd(s1, a);
  _mm256_storeu_pd(s2, q);
}

FADA_AVX2 void accumulate_block16_avx2(const float* x, int64_t batch, int64_t channels, int64_t hw, int64_t c0,
                             const int32_t* slot, const double* shift, double* s1, double* s2,
                             int64_t bank_stride) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* plane = x + (b * channels + c0) * hw;
    const int32_t* lab = slot + b * hw;
    int64_t p = 0;
    for (; p + 8 <= hw; p += 8) {
      __m256 lo[8], hi[8];
      for (int64_t j = 0; j < 8; ++j) {
        lo[j] = _mm256_loadu_ps(plane + j * hw + p);
        hi[j] = _mm256_loadu_ps(plane + (j + 8) * hw + p);
      }
      transpose8x8(lo);
      transpose8x8(hi);
      for (int64_t t = 0; t < 8; ++t) {
        const int64_t base = static_cast<int64_t>(lab[p + t]) * kBlock + (t & 1) * bank_stride;
        const double* sh = shift + static_cast<int64_t>(lab[p + t]) * kBlock;
        add4(_mm256_castps256_ps128(lo[t]), sh, s1 + base, s2 + base);
        add4(_mm256_extractf128_ps(lo[t], 1), sh + 4, s1 + base + 4, s2 + base + 4);
        add4(_mm256_castps256_ps128(hi[t]), sh + 8, s1 + base + 8, s2 + base + 8);
        add4(_mm256_extractf128_ps(hi[t], 1), sh + 12, s1 + base + 12, s2 + base + 12);
      }
    }
    for (; p < hw; ++p) {
      const int64_t base = static_cast<int64_t>(lab[p]) * kBlock;
      for (int64_t j = 0; j < kBlock; ++j)
        stats::accumulate(static_cast<double>(plane[j * hw + p]), shift[base + j], s1[base + j], s2[base + j]);
    }
  }
}
#endif


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
    // two banks of accumulators (the second only used by the AVX2 path)
    std::vector<double> shift(slots * kBlock), s1(2 * slots * kBlock), s2(2 * slots * kBlock);
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
#ifdef FADA_CLASS_STATS_AVX2
        if (std::is_same<scalar_t, float>::value && width == kBlock && cpu_has_avx2()) {
          const int64_t bank = slots * kBlock;
          accumulate_block16_avx2(reinterpret_cast<const float*>(x), batch, channels, hw, c0 + t,
                                  scan.slot.data(), shift.data(), s1.data(), s2.data(), bank);
          for (int64_t i = 0; i < bank; ++i) {  // fold bank 1 into bank 0, fixed order
            s1[i] += s1[bank + i];
            s2[i] += s2[bank + i];
          }
        } else
#endif
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
  stats::check_class_stats_args(features, labels);
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
                                  [&] { class_stats_impl<scalar_t>(x, scan, num_classes, counts, means, m2); });
  return {counts, means, m2};
}

}  // namespace

TORCH_LIBRARY_IMPL(fada_core, CPU, m) {
  m.impl("class_center_stats", &class_center_stats_cpu);
}

}  // namespace fada_core
