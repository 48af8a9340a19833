// class_center_stats on CUDA. Deterministic: no floating-point atomics, and no
// host synchronisation (bad labels: cuda/label_errors.cuh).
//
//  1. scan_labels: validate labels, turn them into int32 slots (class, or K
//     for ignored), per-class pixel counts and first pixel (integer atomics,
//     whose results do not depend on order).
//  2. class_shifts: per (class, channel), the feature of the class's first
//     pixel (the shift s of common/stats_math.h).
//  3. partial_stats: lane = channel. A warp owns 32 consecutive channels and a
//     split (a fixed run of pixels of one image, a function of the sizes only).
//     It walks the split 32 pixels at a time: lane j reads the slot of pixel j
//     (one coalesced load), a ballot marks where the class changes; each lane
//     then takes the 32 pixels of its own channel in order, accumulating
//     Σx and Σ(x − s)² in float64 registers and adding them into the warp's
//     per-class accumulators only when the class changes (uniform across the
//     warp: no divergence, no shuffles per pixel). Feature loads are coalesced
//     in both layouts: channels_last reads 32 consecutive channels of a pixel
//     straight into the lanes; NCHW reads runs of a channel's consecutive
//     pixels (a row's 32 in 16-byte vectors when planes are 16-byte aligned,
//     else runs of 16 pixels of two rows per instruction: TileLoads) into a
//     shared-memory tile, which each lane then reads along its channel. No
//     64-bit division and no 64-bit pixel counter in the loop.
//  4. reduce_splits: per (class, channel), sums the splits in order and
//     finishes the mean and the channel's share of the centred sum of squares.
//  5. finish_classes: per class, a fixed-order block reduction over channels.
//
// Static cost (sm_90, float32, SASS instructions per element on the 32-pixel
// step without a class change): benchmarks/sass_report.py prints it per
// layout; benchmarks/RESULTS.md records it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#include "common/class_stats_checks.h"
#include "common/stats_math.h"
#include "cuda/device_support.cuh"
#include "cuda/label_errors.cuh"

namespace fada_core {
namespace {

constexpr int kLanes = 32;
constexpr int kTileStride = kLanes + 1;  // NCHW tile row, padded against bank conflicts
constexpr int kMaxWarpsPerBlock = 4;
constexpr int64_t kDefaultSharedBytes = 48 * 1024;
constexpr int kReduceThreads = 256;
constexpr int64_t kMinSplit = 1024;  // pixels per (channel group, split) unit, at least
constexpr int64_t kMaxSplits = 64;   // bounds the partials to ~64 * K * C * 2 doubles (but see kMaxSplit)
constexpr int64_t kMaxSplit = int64_t{1} << 30;  // pixels per split, at most: the walk counts them in an int
constexpr unsigned kFullMask = 0xffffffffu;

using u64 = unsigned long long;

__global__ void scan_labels_kernel(const int64_t* __restrict__ labels, int64_t n, int64_t num_classes,
                                   int64_t ignore_index, int32_t* __restrict__ slot, u64* count, u64* first,
                                   int32_t* bad, fada::cuda::LabelErrorRecord* error) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t k = stats::label_slot(labels[i], num_classes, ignore_index);
    if (k < 0) {
      *bad = 1;  // every writer stores the same value
      fada::cuda::record_bad_label(error, labels[i], num_classes, ignore_index);
      k = num_classes;
    }
    slot[i] = static_cast<int32_t>(k);
    if (k < num_classes) {
      atomicAdd(count + k, 1ull);
      atomicMin(first + k, static_cast<u64>(i));
    }
  }
}

// Features as (B, C, hw) with pixels of one image and channel `stride_p` apart
// (1: NCHW, C: channels_last) and channels `stride_c` apart.
struct Geometry {
  int64_t batch, channels, hw;
  int64_t stride_b, stride_c, stride_p;
  int64_t split_len, splits_per_image;  // split_len: a multiple of 32
};

template <typename scalar_t>
__device__ __forceinline__ double to_double(scalar_t v) {
#if defined(__CUDA_ARCH__)
  // Half and bfloat16 straight to double: one conversion instruction (exact, as
  // through float; nvcc converts twice otherwise). cvt.f64.bf16 needs sm_90.
  constexpr bool kHalf = std::is_same<scalar_t, at::Half>::value;
#if __CUDA_ARCH__ >= 900
  constexpr bool kBFloat16 = std::is_same<scalar_t, at::BFloat16>::value;
#else
  constexpr bool kBFloat16 = false;
#endif
  if constexpr (kHalf || kBFloat16) {
    double d;
    if constexpr (kHalf) {
      asm("cvt.f64.f16 %0, %1;" : "=d"(d) : "h"(v.x));
    } else {
      asm("cvt.f64.bf16 %0, %1;" : "=d"(d) : "h"(v.x));
    }
    return d;
  }
#endif
  return static_cast<double>(static_cast<at::opmath_type<scalar_t>>(v));
}

template <typename scalar_t>
__global__ void class_shifts_kernel(const scalar_t* __restrict__ x, Geometry g, const u64* __restrict__ first,
                                    int64_t num_classes, double* __restrict__ shifts) {
  const int64_t total = num_classes * g.channels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += stride) {
    const int64_t k = j / g.channels;
    const int64_t c = j - k * g.channels;
    const u64 i = first[k];
    double s = 0.0;
    if (i != ~0ull) {
      const int64_t b = static_cast<int64_t>(i) / g.hw;
      const int64_t p = static_cast<int64_t>(i) - b * g.hw;
      s = to_double(x[b * g.stride_b + c * g.stride_c + p * g.stride_p]);
    }
    shifts[j] = s;
  }
}

// One warp's running class: its float64 register sums and where they go.
struct ClassRun {
  int k;         // current class (num_classes: ignored pixels, never stored)
  double shift;  // s of (k, this lane's channel)
  double sum, sq;
};

// The warp's per-class accumulators: `sum[k * stride]`, `sq[k * stride]`
// (this lane's column; shared memory, or the unit's slice of the partials).
struct Accumulators {
  double* sum;
  double* sq;
  int64_t stride;
};

// Adds the run's sums into its class, then starts class `k` (warp-uniform).
__device__ __forceinline__ void flush_run(ClassRun& run, const Accumulators& acc, bool active, int k,
                                          int num_classes, const double* shifts_c, int64_t channels) {
  if (run.k < num_classes && active) {
    acc.sum[run.k * acc.stride] += run.sum;
    acc.sq[run.k * acc.stride] += run.sq;
  }
  run.k = k;
  run.sum = 0.0;
  run.sq = 0.0;
  run.shift = (k < num_classes && active) ? shifts_c[k * channels] : 0.0;
}

// Pixels [0, 32) of the step: value(j) gives this lane's channel at pixel j;
// `change` has bit j set where pixel j's class differs from pixel j - 1's.
template <typename Value>
__device__ __forceinline__ void accumulate_step(ClassRun& run, unsigned change, int slot, const Accumulators& acc,
                                                bool active, int num_classes, const double* shifts_c,
                                                int64_t channels, Value value) {
  if (change == 0) {  // one class over the whole step (the common case): no test per pixel
#pragma unroll
    for (int j = 0; j < kLanes; ++j) stats::accumulate(value(j), run.shift, run.sum, run.sq);
    return;
  }
#pragma unroll
  for (int j = 0; j < kLanes; ++j) {
    if (change & (1u << j))
      flush_run(run, acc, active, __shfl_sync(kFullMask, slot, j), num_classes, shifts_c, channels);
    stats::accumulate(value(j), run.shift, run.sum, run.sq);
  }
}

// How partial_stats reads the features.
enum class Layout : int {
  kChannelsLast,  // lane = channel: a pixel's 32 channels are one coalesced load, straight into the lanes
  kPlanes,        // NCHW: lane = pixel for the load (a channel's 32 pixels), a shared tile turns it around
  kPlanesVec16,   // NCHW, planes 16-byte aligned: the tile filled with 16-byte loads
};

// How a warp fills the NCHW tile, 32 channel rows x 32 pixels. A load takes
// kRows rows, each a run of kRun lanes x kVec pixels. 16-byte loads
// (kPlanesVec16): a run is a row's 32 pixels. Element loads (rows not 16-byte
// aligned): two rows per load, runs of 16 pixels (64 bytes in float32), so
// that one 64-bit row address serves two loads at immediate offsets (such an
// address costs two instructions: with lane = pixel, one per load). Lane
// group g's row in pass `it`: g * kGroupStride + it * kPassStride, chosen so
// that the tile stores of one load land in distinct banks (row stride 33).
template <typename scalar_t, Layout kLayout>
struct TileLoads {
  static constexpr int kVec = kLayout == Layout::kPlanesVec16 ? 16 / sizeof(scalar_t) : 1;
  static constexpr int kRun = kVec > 1 ? kLanes / kVec : kLanes / 2;
  static constexpr int kRows = kLanes / kRun;
  static constexpr int kRunPixels = kRun * kVec;
  static constexpr int kGroupStride = kVec > 1 ? 1 : kRun;
  static constexpr int kPassStride = kVec > 1 ? kRows : 1;
  // The lane's row in pass 0 and its first pixel of a run.
  static __device__ __forceinline__ int row(int lane) { return lane / kRun * kGroupStride; }
  static __device__ __forceinline__ int pixel(int lane) { return lane % kRun * kVec; }
};

// NCHW: channels [c0, c0 + 32) x pixels [base, base + 32) of an image into
// tile[channel][pixel]; `src`: the lane's first element (channel
// c0 + row(lane), pixel base + pixel(lane)). Zeros past n pixels or past the
// last channel. `full`: 32 pixels and 32 channels (no test per load).
// `pass_stride`: kPassStride * the channel stride.
template <typename scalar_t, Layout kLayout>
__device__ __forceinline__ void fill_tile(scalar_t* tile, const scalar_t* src, int64_t pass_stride, int n,
                                          int channels_left, bool full, int lane) {
  using L = TileLoads<scalar_t, kLayout>;
  scalar_t* dst = tile + L::row(lane) * kTileStride + L::pixel(lane);
  auto load = [&](int it, int h, bool guard) {  // pass it, run h: pixels [h, h + 1) * kRunPixels
    const int r = L::row(lane) + it * L::kPassStride;
    const int p = h * L::kRunPixels + L::pixel(lane);  // n: a multiple of kVec (host: hw % kVec == 0)
    scalar_t* to = dst + it * L::kPassStride * kTileStride + h * L::kRunPixels;
    const bool in = !guard || (p < n && r < channels_left);
    if (L::kVec > 1) {
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (in) raw = *reinterpret_cast<const uint4*>(src + h * L::kRunPixels);
      scalar_t vals[L::kVec];
      memcpy(vals, &raw, sizeof(raw));
#pragma unroll
      for (int i = 0; i < L::kVec; ++i) to[i] = vals[i];
    } else {
      *to = in ? src[h * L::kRunPixels] : scalar_t(0);
    }
  };
  if (full) {
#pragma unroll
    for (int it = 0; it < kLanes / L::kRows; ++it) {
      if (it > 0) src += pass_stride;
#pragma unroll
      for (int h = 0; h < kLanes / L::kRunPixels; ++h) load(it, h, false);
    }
    return;
  }
#pragma unroll
  for (int it = 0; it < kLanes / L::kRows; ++it) {
    if (it > 0) src += pass_stride;
#pragma unroll
    for (int h = 0; h < kLanes / L::kRunPixels; ++h) load(it, h, true);
  }
}

// Shared memory per warp: the NCHW tile [32][33] scalar_t (channels_last: none),
// then, when they fit, the accumulators sum[K][32], sq[K][32].
template <typename scalar_t, Layout kLayout>
__global__ void partial_stats_kernel(const scalar_t* __restrict__ x, Geometry g, const int32_t* __restrict__ slot,
                                     const double* __restrict__ shifts, int num_classes, bool shared_acc,
                                     int64_t warp_smem_bytes, double* __restrict__ part1,
                                     double* __restrict__ part2) {
  FADA_DYNAMIC_SHARED(double, smem);
  const int warp = threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t groups = (g.channels + kLanes - 1) / kLanes;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kLanes) + warp;
  const int64_t splits = g.batch * g.splits_per_image;
  if (unit >= groups * splits) return;  // whole warp leaves together
  // Neighbouring warps: neighbouring channel groups of the same pixels.
  const int64_t split = unit / groups;
  const int64_t c0 = (unit - split * groups) * kLanes;
  const int64_t b = split / g.splits_per_image;
  const int64_t p_begin = (split - b * g.splits_per_image) * g.split_len;
  const int64_t p_end = p_begin + g.split_len < g.hw ? p_begin + g.split_len : g.hw;
  const int64_t c = c0 + lane;
  const bool active = c < g.channels;

  unsigned char* warp_smem = reinterpret_cast<unsigned char*>(smem) + warp * warp_smem_bytes;
  scalar_t* tile = reinterpret_cast<scalar_t*>(warp_smem);
  const int64_t slice = (split * num_classes) * g.channels;  // the unit's partials: [K][C] at column c
  Accumulators acc;
  if (shared_acc) {
    const int64_t tile_bytes =
        kLayout == Layout::kChannelsLast ? 0 : kLanes * kTileStride * static_cast<int64_t>(sizeof(scalar_t));
    acc.sum = reinterpret_cast<double*>(warp_smem + ((tile_bytes + 7) / 8) * 8) + lane;
    acc.sq = acc.sum + static_cast<int64_t>(num_classes) * kLanes;
    acc.stride = kLanes;
  } else {
    acc.sum = part1 + slice + c;
    acc.sq = part2 + slice + c;
    acc.stride = g.channels;
  }
  if (shared_acc || active) {
    for (int k = 0; k < num_classes; ++k) {
      acc.sum[k * acc.stride] = 0.0;
      acc.sq[k * acc.stride] = 0.0;
    }
  }
  const double* shifts_c = shifts + c;
  const scalar_t* x_b = x + b * g.stride_b;
  // channels_last: lanes past the last channel read the last one (never stored)
  const scalar_t* x_lane = x_b + (active ? c : g.channels - 1) * g.stride_c;
  const int channels_left = g.channels - c0 < kLanes ? static_cast<int>(g.channels - c0) : kLanes;
  // The walk: pointers advance a step at a time and the pixel count is 32-bit
  // (split_length keeps a split below 2^31 pixels): little bookkeeping per step.
  // x_step: channels_last, this lane's channel; NCHW, the lane's first tile element.
  using Loads = TileLoads<scalar_t, kLayout>;
  const int32_t* slot_step = slot + b * g.hw + p_begin + lane;
  const scalar_t* x_step = kLayout == Layout::kChannelsLast
                               ? x_lane + p_begin * g.stride_p
                               : x_b + (c0 + Loads::row(lane)) * g.stride_c + p_begin + Loads::pixel(lane);
  const int64_t x_advance = kLayout == Layout::kChannelsLast ? kLanes * g.stride_p : kLanes;  // NCHW: stride_p 1
  const int64_t pass_stride = Loads::kPassStride * g.stride_c;
  ClassRun run{num_classes, 0.0, 0.0, 0.0};

  for (int left = static_cast<int>(p_end - p_begin); left > 0; left -= kLanes) {  // the step takes min(left, 32)
    const int k = lane < left ? *slot_step : num_classes;
    int before = __shfl_up_sync(kFullMask, k, 1);
    if (lane == 0) before = run.k;
    const unsigned change = __ballot_sync(kFullMask, k != before);
    if (kLayout == Layout::kChannelsLast) {
      scalar_t v[kLanes];
      const scalar_t* src = x_step;
      if (left >= kLanes) {  // a whole step: no test per pixel
#pragma unroll
        for (int j = 0; j < kLanes; ++j) {
          v[j] = *src;
          src += g.stride_p;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kLanes; ++j) {
          v[j] = j < left ? *src : scalar_t(0);
          src += g.stride_p;
        }
      }
      accumulate_step(run, change, k, acc, active, num_classes, shifts_c, g.channels,
                      [&](int j) { return to_double(v[j]); });
    } else {
      fill_tile<scalar_t, kLayout>(tile, x_step, pass_stride, left, channels_left,
                                   left >= kLanes && channels_left == kLanes, lane);
      __syncwarp();
      const scalar_t* row = tile + lane * kTileStride;
      accumulate_step(run, change, k, acc, active, num_classes, shifts_c, g.channels,
                      [&](int j) { return to_double(row[j]); });
      __syncwarp();  // the tile is rewritten next step
    }
    slot_step += kLanes;
    x_step += x_advance;
  }
  flush_run(run, acc, active, num_classes, num_classes, shifts_c, g.channels);
  if (shared_acc && active) {
    for (int k = 0; k < num_classes; ++k) {
      part1[slice + k * g.channels + c] = acc.sum[k * kLanes];
      part2[slice + k * g.channels + c] = acc.sq[k * kLanes];
    }
  }
}

__global__ void reduce_splits_kernel(Geometry g, const u64* __restrict__ count, const double* __restrict__ shifts,
                                     const int32_t* __restrict__ bad, int64_t num_classes, int64_t splits,
                                     const double* __restrict__ part1, const double* __restrict__ part2,
                                     double* __restrict__ means, double* __restrict__ m2_channel) {
  const int64_t total = num_classes * g.channels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const bool poisoned = *bad != 0;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += stride) {
    const int64_t k = j / g.channels;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t s = 0; s < splits; ++s) {
      s1 += part1[s * total + j];
      s2 += part2[s * total + j];
    }
    const double n = static_cast<double>(count[k]);
    means[j] = poisoned ? std::numeric_limits<double>::quiet_NaN() : stats::finish_mean(s1, n);
    m2_channel[j] = s2 - stats::shift_excess(s1, shifts[j], n);
  }
}

__global__ void finish_classes_kernel(const double* __restrict__ m2_channel, const u64* __restrict__ count,
                                      const int32_t* __restrict__ bad, int64_t channels,
                                      double* __restrict__ counts_out, double* __restrict__ m2_out) {
  __shared__ double partial[kReduceThreads];
  const int64_t k = blockIdx.x;
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < channels; c += kReduceThreads) acc += m2_channel[k * channels + c];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const bool poisoned = *bad != 0;
    m2_out[k] = poisoned ? nan : stats::finish_m2(partial[0], 0.0);
    counts_out[k] = poisoned ? nan : static_cast<double>(count[k]);
  }
}

int64_t blocks_for(int64_t work, int64_t threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535;
}

// Pixels of one image per split: at least kMinSplit, at most kMaxSplit, a
// multiple of 32, and about kMaxSplits splits over the batch. A function of
// the sizes only.
int64_t split_length(int64_t batch, int64_t hw) {
  int64_t len = (batch * hw + kMaxSplits - 1) / kMaxSplits;
  len = len < kMinSplit ? kMinSplit : (len > kMaxSplit ? kMaxSplit : len);
  return (len + kLanes - 1) / kLanes * kLanes;
}

// The launch of partial_stats for one dtype and layout.
template <typename scalar_t, Layout kLayout>
void launch_partial_stats(const scalar_t* x, const Geometry& g, const at::Tensor& slot, const at::Tensor& shifts,
                          int64_t num_classes, at::Tensor& part1, at::Tensor& part2, cudaStream_t stream) {
  const int64_t units = (g.channels + kLanes - 1) / kLanes * g.batch * g.splits_per_image;
  const int64_t tile_bytes = kLayout == Layout::kChannelsLast ? 0 : (kLanes * kTileStride * static_cast<int64_t>(sizeof(scalar_t)) + 7) / 8 * 8;
  const int64_t acc_bytes = 2 * num_classes * kLanes * static_cast<int64_t>(sizeof(double));
  // Accumulators in shared memory when one warp's fit in the default 48 KB of a
  // block (K <= 85 with an fp32 NCHW tile; K = 19: 3 warps per block); beyond,
  // in the partials themselves (global read-modify-write at each class change,
  // still one owner per slot).
  const bool shared_acc = tile_bytes + acc_bytes <= kDefaultSharedBytes;
  const int64_t warp_bytes = shared_acc ? tile_bytes + acc_bytes : tile_bytes;
  int64_t warps = warp_bytes > 0 ? kDefaultSharedBytes / warp_bytes : kMaxWarpsPerBlock;
  warps = warps < 1 ? 1 : (warps > kMaxWarpsPerBlock ? kMaxWarpsPerBlock : warps);
  const int64_t blocks = (units + warps - 1) / warps;
  TORCH_CHECK(blocks <= 0x7fffffff, "class_center_stats: too many channels x pixels");
  FADA_LAUNCH(dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(warps * kLanes)),
              static_cast<size_t>(warp_bytes * warps), stream, partial_stats_kernel<scalar_t, kLayout>)(
      x, g, slot.data_ptr<int32_t>(), shifts.data_ptr<double>(), static_cast<int>(num_classes), shared_acc,
      warp_bytes, part1.data_ptr<double>(), part2.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Fills (counts, means, m2) (float64 zeros) for B * h * w > 0 pixels.
void launch_class_stats(const at::Tensor& features_in, const at::Tensor& labels, int64_t num_classes,
                        int64_t ignore_index, at::Tensor& counts, at::Tensor& means, at::Tensor& m2) {
  const c10::cuda::CUDAGuard guard(features_in.device());
  const int64_t channels = features_in.size(1);
  const auto opts = features_in.options().dtype(at::kDouble);
  const int64_t num_pixels = labels.numel();

  // Pixels of an image must be one stride apart: NCHW or channels_last as
  // they are, anything else made NCHW.
  const bool channels_last = !features_in.is_contiguous() &&
                             features_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor features = channels_last ? features_in : features_in.contiguous();

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  at::Tensor slot = at::empty({num_pixels}, lab.options().dtype(at::kInt));
  at::Tensor count = at::zeros({num_classes}, lab.options());
  at::Tensor first = at::full({num_classes}, -1, lab.options());  // all bits set: "absent"
  at::Tensor bad = at::zeros({1}, lab.options().dtype(at::kInt));
  FADA_LAUNCH(blocks_for(num_pixels, 256), 256, 0, stream, scan_labels_kernel)(
      lab.data_ptr<int64_t>(), num_pixels, num_classes, ignore_index, slot.data_ptr<int32_t>(),
      reinterpret_cast<u64*>(count.data_ptr<int64_t>()), reinterpret_cast<u64*>(first.data_ptr<int64_t>()),
      bad.data_ptr<int32_t>(), fada::cuda::label_error_record(fada::cuda::kClassStatsLabels));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t hw = features.size(2) * features.size(3);
  Geometry g{features.size(0), channels, hw, features.stride(0), features.stride(1),
             channels_last ? channels : 1, 0, 0};
  g.split_len = split_length(g.batch, hw);
  g.splits_per_image = (hw + g.split_len - 1) / g.split_len;
  const int64_t splits = g.batch * g.splits_per_image;
  at::Tensor shifts = at::empty({num_classes, channels}, opts);
  at::Tensor part1 = at::empty({splits, num_classes, channels}, opts);
  at::Tensor part2 = at::empty({splits, num_classes, channels}, opts);
  at::Tensor m2_channel = at::empty({num_classes, channels}, opts);
  const u64* count_p = reinterpret_cast<const u64*>(count.data_ptr<int64_t>());

  if (channels > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, features.scalar_type(), "class_center_stats_cuda", [&] {
          const scalar_t* x = features.data_ptr<scalar_t>();
          FADA_LAUNCH(blocks_for(num_classes * channels, 256), 256, 0, stream, class_shifts_kernel<scalar_t>)(
              x, g, reinterpret_cast<const u64*>(first.data_ptr<int64_t>()), num_classes,
              shifts.data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          constexpr int64_t kVec = 16 / sizeof(scalar_t);
          const bool vec16 = hw % kVec == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
          if (channels_last) {
            launch_partial_stats<scalar_t, Layout::kChannelsLast>(x, g, slot, shifts, num_classes, part1, part2, stream);
          } else if (vec16) {
            launch_partial_stats<scalar_t, Layout::kPlanesVec16>(x, g, slot, shifts, num_classes, part1, part2, stream);
          } else {
            launch_partial_stats<scalar_t, Layout::kPlanes>(x, g, slot, shifts, num_classes, part1, part2, stream);
          }
        });
    FADA_LAUNCH(blocks_for(num_classes * channels, 256), 256, 0, stream, reduce_splits_kernel)(
        g, count_p, shifts.data_ptr<double>(), bad.data_ptr<int32_t>(), num_classes, splits,
        part1.data_ptr<double>(), part2.data_ptr<double>(), means.data_ptr<double>(),
        m2_channel.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  FADA_LAUNCH(num_classes, kReduceThreads, 0, stream, finish_classes_kernel)(
      m2_channel.data_ptr<double>(), count_p, bad.data_ptr<int32_t>(), channels, counts.data_ptr<double>(),
      m2.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}


// The CUDA launch; checks and outputs: common/class_stats_checks.h.
std::tuple<at::Tensor, at::Tensor, at::Tensor> class_center_stats_cuda(const at::Tensor& features_in,
                                                                       const at::Tensor& labels,
                                                                       int64_t num_classes,
                                                                       int64_t ignore_index) {
  fada::cuda::raise_pending_label_errors();
  return stats::class_center_stats_host(
      features_in, labels, num_classes, "CUDA kernel", fada::cuda::on_kernel_device(features_in),
      [&](at::Tensor& counts, at::Tensor& means, at::Tensor& m2) {
        launch_class_stats(features_in, labels, num_classes, ignore_index, counts, means, m2);
      });
}

}  // namespace

#ifndef FADA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fada_core, CUDA, m) {
  m.impl("class_center_stats", &class_center_stats_cuda);
}
#endif

}  // namespace fada_core
