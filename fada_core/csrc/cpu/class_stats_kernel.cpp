// class_center_stats on the CPU.
//
// One read of the features. The labels are first turned into a plan: pixels
// cut into chunks of kChunk (within one image; chunk i of every image, then
// chunk i + 1, so that all images' planes stream at once), and in each chunk
// the non-ignored pixels listed class by class (a counting sort). Then every
// block of 16 channels is one task: for each chunk, for each class present,
// the class's pixels are summed in registers and added once into the block's
// float64 accumulators (common/stats_math.h: Σx and Σ(x − s)², the latter
// summed over channels). A block is done by one thread in a fixed order and
// the per-block results are combined in block order, so the result does not
// depend on the number of threads.
//
// Compiled once per instruction set (isa/*.cpp). In the x86 builds (SSE2,
// AVX2, AVX-512) float32 takes a vectorised path (class_stats_tile.h); other
// dtypes, other architectures and the last partial block of channels walk the
// same plan with scalar code (stats::accumulate, as the CUDA kernel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/class_stats_checks.h"
#include "common/stats_math.h"

#if defined(FADA_CPU_ISA_SSE2) || defined(FADA_CPU_ISA_AVX2) || defined(FADA_CPU_ISA_AVX512)
#define FADA_CLASS_STATS_SIMD 1
#include <immintrin.h>
// The SIMD helpers pass 64-byte vectors by value between inline functions of
// this file only; GCC's note that such an ABI would differ without AVX-512
// (reported at the end of the file, so no push/pop) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fada_core {
namespace {

constexpr int64_t kBlock = 16;   // channels per task
// Pixels per chunk: a 32 KB float32 tile of 16 channels. Long enough that a
// class has ~25 pixels per chunk at K = 19 (256 measured slower), short
// enough that two tiles stay in L2.
constexpr int64_t kChunk = 512;

struct Run {
  int64_t label;
  int64_t begin, end;  // into the chunk's slice of Plan::order
};

struct Chunk {
  int64_t image, p0, n;       // pixels [p0, p0 + n) of one image
  int64_t order_begin;        // the chunk's slice of Plan::order starts here
  int64_t run_begin, run_end; // its classes: Plan::runs[run_begin, run_end)
};

struct Plan {
  std::vector<int64_t> count;  // per class
  std::vector<int64_t> first;  // per class: its first pixel in plan order (flat b*h*w index), -1 if absent
  std::vector<Chunk> chunks;
  std::vector<Run> runs;
  std::vector<uint16_t> order;  // pixel offsets within their chunk, class by class
};

Plan make_plan(const at::Tensor& labels, int64_t num_classes, int64_t ignore_index) {
  const at::Tensor flat = labels.to(at::kLong).contiguous();
  const int64_t* lab = flat.data_ptr<int64_t>();
  const int64_t batch = labels.size(0);
  const int64_t hw = labels.size(1) * labels.size(2);
  Plan plan;
  plan.count.assign(num_classes, 0);
  plan.first.assign(num_classes, -1);
  plan.order.reserve(flat.numel());
  std::vector<int64_t> in_chunk(num_classes, 0);  // per class, reset after each chunk
  std::vector<int64_t> present;
  for (int64_t p0 = 0; p0 < hw; p0 += kChunk) {
    for (int64_t b = 0; b < batch; ++b) {
      Chunk ch{b, p0, std::min(kChunk, hw - p0), static_cast<int64_t>(plan.order.size()),
               static_cast<int64_t>(plan.runs.size()), 0};
      const int64_t* l = lab + b * hw + p0;
      present.clear();
      for (int64_t i = 0; i < ch.n; ++i) {
        const int64_t k = stats::label_slot(l[i], num_classes, ignore_index);
        TORCH_CHECK(k >= 0, "class_center_stats: labels must be in [0, num_classes=", num_classes,
                    ") or equal ignore_index=", ignore_index, "; found ", l[i]);
        if (k == num_classes) continue;
        if (plan.count[k] == 0) plan.first[k] = b * hw + p0 + i;
        ++plan.count[k];
        if (in_chunk[k]++ == 0) present.push_back(k);
      }
      // Classes in ascending order; each gets a run, then the pixels are placed.
      std::sort(present.begin(), present.end());
      int64_t offset = 0;
      for (const int64_t k : present) {
        plan.runs.push_back({k, offset, offset + in_chunk[k]});
        offset += in_chunk[k];
        in_chunk[k] = plan.runs.back().begin;  // now: next free position of class k
      }
      plan.order.resize(ch.order_begin + offset);
      uint16_t* order = plan.order.data() + ch.order_begin;
      for (int64_t i = 0; i < ch.n; ++i) {
        const int64_t k = stats::label_slot(l[i], num_classes, ignore_index);
        if (k < num_classes) order[in_chunk[k]++] = static_cast<uint16_t>(i);
      }
      for (const int64_t k : present) in_chunk[k] = 0;
      ch.run_end = static_cast<int64_t>(plan.runs.size());
      plan.chunks.push_back(ch);
    }
  }
  return plan;
}

// Any dtype, any number of channels (`width` <= kBlock): the plan's pixels
// read straight from the planes. Same accumulator layout as block16.
template <typename scalar_t>
void block_scalar(const scalar_t* x, int64_t channels, int64_t hw, int64_t c0, int64_t width,
                  const Plan& plan, const double* shift, double* sum, double* sq) {
  for (const Chunk& ch : plan.chunks) {
    const uint16_t* order = plan.order.data() + ch.order_begin;
    for (int64_t r = ch.run_begin; r < ch.run_end; ++r) {
      const Run& run = plan.runs[r];
      for (int64_t j = 0; j < width; ++j) {
        const scalar_t* plane = x + (ch.image * channels + c0 + j) * hw + ch.p0;
        const double s = shift[run.label * kBlock + j];
        double a = 0.0, q = 0.0;
        for (int64_t i = run.begin; i < run.end; ++i) stats::accumulate(static_cast<double>(plane[order[i]]), s, a, q);
        sum[run.label * kBlock + j] += a;
        sq[run.label * 8 + j % 8] += q;
      }
    }
  }
}

#ifdef FADA_CLASS_STATS_SIMD
#ifdef FADA_CPU_ISA_AVX512
constexpr int kRegisterSets = 2;  // 32 zmm registers: two sets hide the add latency
#else
constexpr int kRegisterSets = 1;  // 16 ymm (xmm) registers: room for one set of sums
#endif
#include "cpu/class_stats_tile.h"
#endif

template <typename scalar_t>
void class_stats_impl(const at::Tensor& features, const Plan& plan, int64_t num_classes, at::Tensor& counts,
                      at::Tensor& means, at::Tensor& m2) {
  const int64_t channels = features.size(1);
  const int64_t hw = features.size(2) * features.size(3);
  const scalar_t* x = features.data_ptr<scalar_t>();
  const int64_t blocks = (channels + kBlock - 1) / kBlock;

  // Σx per (class, channel) goes straight into `means` (divided by the count
  // at the end), written by the owner of each channel; Σ(x − s)² per (block,
  // class), combined in block order below.
  double* sums = means.data_ptr<double>();
  std::vector<double> sq_blocks(blocks * num_classes, 0.0);
  // The shift of every (class, channel), kept by the channel's block for the
  // finish below: read again there, each would be a cache miss in one thread.
  std::vector<double> shifts(num_classes * channels);
  auto shift_of = [&](int64_t k, int64_t c) -> double {
    const int64_t i = plan.first[k];
    if (i < 0) return 0.0;
    return static_cast<double>(x[((i / hw) * channels + c) * hw + i % hw]);
  };

  // Blocks are handed out one at a time (not in fixed ranges): a thread that
  // is slowed down (a busy core, a preempted vCPU) does fewer of them instead
  // of holding up the rest. Each block's result does not depend on who does it.
  std::atomic<int64_t> next_block{0};
  const int64_t workers = std::min<int64_t>(blocks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<double> shift(num_classes * kBlock), sum(num_classes * kBlock), sq(num_classes * 8);
    // Each thread claims its next block one block early, so that the next
    // block's first chunks can be prefetched at the end of this one.
    for (int64_t blk = next_block++, following = next_block++; blk < blocks; blk = following, following = next_block++) {
      const int64_t c0 = blk * kBlock;
      const int64_t next_c0 = following < blocks && (following + 1) * kBlock <= channels ? following * kBlock : -1;
      const int64_t width = std::min(kBlock, channels - c0);
      for (int64_t k = 0; k < num_classes; ++k) {
        for (int64_t j = 0; j < kBlock; ++j) shift[k * kBlock + j] = j < width ? shift_of(k, c0 + j) : 0.0;
        std::copy(shift.begin() + k * kBlock, shift.begin() + k * kBlock + width, shifts.begin() + k * channels + c0);
      }
      std::fill(sum.begin(), sum.end(), 0.0);
      std::fill(sq.begin(), sq.end(), 0.0);
      bool done = false;
#ifdef FADA_CLASS_STATS_SIMD
      if (std::is_same<scalar_t, float>::value && width == kBlock) {
        run(reinterpret_cast<const float*>(x), channels, hw, c0, next_c0, plan, shift.data(), sum.data(), sq.data());
        done = true;
      }
#endif
      if (!done) block_scalar(x, channels, hw, c0, width, plan, shift.data(), sum.data(), sq.data());
      for (int64_t k = 0; k < num_classes; ++k) {
        for (int64_t j = 0; j < width; ++j) sums[k * channels + c0 + j] = sum[k * kBlock + j];
        double q = 0.0;
        for (int64_t lane = 0; lane < 8; ++lane) q += sq[k * 8 + lane];
        sq_blocks[blk * num_classes + k] = q;
      }
    }
  });

  double* counts_p = counts.data_ptr<double>();
  double* m2_p = m2.data_ptr<double>();
  for (int64_t k = 0; k < num_classes; ++k) {
    const double n = static_cast<double>(plan.count[k]);
    counts_p[k] = n;
    double sq = 0.0, excess = 0.0;
    for (int64_t blk = 0; blk < blocks; ++blk) sq += sq_blocks[blk * num_classes + k];
    for (int64_t c = 0; c < channels; ++c) {
      const double s = sums[k * channels + c];
      excess += stats::shift_excess(s, shifts[k * channels + c], n);
      sums[k * channels + c] = stats::finish_mean(s, n);
    }
    m2_p[k] = stats::finish_m2(sq, excess);
  }
}

// The CPU launch; checks and outputs: common/class_stats_checks.h.
std::tuple<at::Tensor, at::Tensor, at::Tensor> class_center_stats_cpu(const at::Tensor& features,
                                                                      const at::Tensor& labels,
                                                                      int64_t num_classes,
                                                                      int64_t ignore_index) {
  return stats::class_center_stats_host(
      features, labels, num_classes, "CPU kernel", features.device().is_cpu(),
      [&](at::Tensor& counts, at::Tensor& means, at::Tensor& m2) {
        const Plan plan = make_plan(labels, num_classes, ignore_index);
        if (features.size(1) == 0) {
          for (int64_t k = 0; k < num_classes; ++k) counts.data_ptr<double>()[k] = static_cast<double>(plan.count[k]);
          return;
        }
        // Channel planes must be contiguous (NCHW); channels_last and strided inputs are copied.
        const at::Tensor x = features.contiguous();
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_center_stats_cpu",
                                        [&] { class_stats_impl<scalar_t>(x, plan, num_classes, counts, means, m2); });
      });
}

}  // namespace

}  // namespace fada_core
