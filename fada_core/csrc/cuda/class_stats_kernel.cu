// class_center_stats on CUDA. Deterministic: no floating-point atomics.
//
//  1. scan_labels: validate labels, per-class pixel counts and first pixel
//     (integer atomics only, whose results do not depend on order).
//  2. partial_stats: the flat pixel range of every channel is cut into splits
//     of a fixed length (a function of the sizes only). One warp owns one
//     (channel, split): lanes read 32 consecutive pixels, pixels of the same
//     class are summed with a fixed butterfly, and the group's first lane adds
//     the result into the warp's per-class accumulators in shared memory. Each
//     warp writes its partial sums Σx, Σ(x−s)² (float64, s the class's first
//     pixel; common/stats_math.h) to its own slot.
//  3. reduce_splits: per (class, channel), sums the splits in order and
//     finishes the mean and the channel's share of the centred sum of squares.
//  4. finish_classes: per class, a fixed-order block reduction over channels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common/class_stats_checks.h"
#include "common/stats_math.h"
#include "cuda/device_support.cuh"

namespace fada_core {
namespace {

constexpr int kMaxWarpsPerBlock = 8;
constexpr int64_t kSharedBytes = 48 * 1024;  // default dynamic shared memory limit
constexpr int kReduceThreads = 256;
constexpr int64_t kMinSplit = 4096;  // pixels per (channel, split) unit, at least
constexpr int64_t kMaxSplits = 64;   // bounds the partials to 64 * K * C * 2 doubles
constexpr unsigned kFullMask = 0xffffffffu;

using u64 = unsigned long long;

__global__ void scan_labels_kernel(const int64_t* __restrict__ labels, int64_t n, int64_t num_classes,
                                   int64_t ignore_index, int32_t* __restrict__ slot, u64* count,
                                   u64* first, int* bad, u64* bad_value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t k = stats::label_slot(labels[i], num_classes, ignore_index);
    if (k < 0) {
      if (atomicExch(bad, 1) == 0) atomicExch(bad_value, static_cast<u64>(labels[i]));
      k = num_classes;
    }
    slot[i] = static_cast<int32_t>(k);
    if (k < num_classes) {
      atomicAdd(count + k, 1ull);
      atomicMin(first + k, static_cast<u64>(i));
    }
  }
}

struct Geometry {
  int64_t channels, hw, width;
  int64_t stride_b, stride_c, stride_h, stride_w;
};

// Offset of flat pixel i (over b, y, x) of channel c.
__device__ __forceinline__ int64_t feature_offset(const Geometry& g, int64_t i, int64_t c) {
  const int64_t b = i / g.hw;
  const int64_t p = i - b * g.hw;
  const int64_t y = p / g.width;
  const int64_t x = p - y * g.width;
  return b * g.stride_b + c * g.stride_c + y * g.stride_h + x * g.stride_w;
}

template <typename scalar_t>
__device__ __forceinline__ double load_double(const scalar_t* p) {
  return static_cast<double>(static_cast<at::opmath_type<scalar_t>>(*p));
}

template <typename scalar_t>
__device__ double class_shift(const scalar_t* x, const Geometry& g, const u64* first, int64_t k,
                              int64_t c) {
  const u64 i = first[k];
  return i == ~0ull ? 0.0 : load_double(x + feature_offset(g, static_cast<int64_t>(i), c));
}

// Shared memory per warp: shift[K], s1[K], s2[K].
template <typename scalar_t>
__global__ void partial_stats_kernel(const scalar_t* __restrict__ x, Geometry g,
                                     const int32_t* __restrict__ slot, const u64* __restrict__ first,
                                     int64_t num_classes, int64_t num_pixels, int64_t splits,
                                     int64_t split_len, double* __restrict__ part1,
                                     double* __restrict__ part2) {
  FADA_DYNAMIC_SHARED(double, smem);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp;
  if (unit >= g.channels * splits) return;  // whole warp leaves together
  const int64_t c = unit / splits;
  const int64_t s = unit - c * splits;
  double* shift = smem + warp * 3 * num_classes;
  double* acc1 = shift + num_classes;
  double* acc2 = acc1 + num_classes;
  for (int64_t k = lane; k < num_classes; k += 32) {
    shift[k] = class_shift(x, g, first, k, c);
    acc1[k] = 0.0;
    acc2[k] = 0.0;
  }
  __syncwarp();

  const int64_t begin = s * split_len;
  const int64_t end = begin + split_len < num_pixels ? begin + split_len : num_pixels;
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t i = base + lane;
    const int k = i < end ? slot[i] : static_cast<int>(num_classes);
    double v = 0.0, v2 = 0.0;  // this lane's x and (x − s)²
    if (k < num_classes) stats::accumulate(load_double(x + feature_offset(g, i, c)), shift[k], v, v2);
    unsigned pending = __ballot_sync(kFullMask, k < num_classes);
    while (pending) {
      const int leader = __ffs(pending) - 1;
      const int group = __shfl_sync(kFullMask, k, leader);
      const bool mine = k == group;
      double a = mine ? v : 0.0;
      double q = mine ? v2 : 0.0;
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) {
        a += __shfl_xor_sync(kFullMask, a, offset);
        q += __shfl_xor_sync(kFullMask, q, offset);
      }
      if (lane == leader) {
        acc1[group] += a;
        acc2[group] += q;
      }
      __syncwarp();  // the next update of this class may come from another lane
      pending &= ~__ballot_sync(kFullMask, mine);
    }
  }
  __syncwarp();
  for (int64_t k = lane; k < num_classes; k += 32) {
    const int64_t out = (s * num_classes + k) * g.channels + c;
    part1[out] = acc1[k];
    part2[out] = acc2[k];
  }
}

template <typename scalar_t>
__global__ void reduce_splits_kernel(const scalar_t* __restrict__ x, Geometry g,
                                     const u64* __restrict__ first, const u64* __restrict__ count,
                                     int64_t num_classes, int64_t splits,
                                     const double* __restrict__ part1,
                                     const double* __restrict__ part2, double* __restrict__ means,
                                     double* __restrict__ m2_channel) {
  const int64_t total = num_classes * g.channels;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < total; j += stride) {
    const int64_t k = j / g.channels;
    const int64_t c = j - k * g.channels;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t s = 0; s < splits; ++s) {
      s1 += part1[s * total + j];
      s2 += part2[s * total + j];
    }
    const double n = static_cast<double>(count[k]);
    means[j] = stats::finish_mean(s1, n);
    m2_channel[j] = s2 - stats::shift_excess(s1, class_shift(x, g, first, k, c), n);
  }
}

__global__ void finish_classes_kernel(const double* __restrict__ m2_channel,
                                      const u64* __restrict__ count, int64_t channels,
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
    m2_out[k] = stats::finish_m2(partial[0], 0.0);
    counts_out[k] = static_cast<double>(count[k]);
  }
}

int64_t blocks_for(int64_t work, int64_t threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_center_stats_cuda(const at::Tensor& features,
                                                                       const at::Tensor& labels,
                                                                       int64_t num_classes,
                                                                       int64_t ignore_index) {
  stats::check_class_stats_args(features, labels);
  // Shared memory: 3 * K doubles per warp, at least one warp within 48 KB.
  TORCH_CHECK(num_classes > 0 && num_classes <= 2048,
              "class_center_stats (CUDA): num_classes must be in [1, 2048], got ", num_classes);

  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t channels = features.size(1);
  const auto opts = features.options().dtype(at::kDouble);
  at::Tensor counts = at::zeros({num_classes}, opts);
  at::Tensor means = at::zeros({num_classes, channels}, opts);
  at::Tensor m2 = at::zeros({num_classes}, opts);
  const int64_t num_pixels = labels.numel();
  if (num_pixels == 0) return {counts, means, m2};

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  at::Tensor slot = at::empty({num_pixels}, lab.options().dtype(at::kInt));
  at::Tensor count = at::zeros({num_classes}, lab.options());
  at::Tensor first = at::full({num_classes}, -1, lab.options());  // all bits set: "absent"
  at::Tensor bad = at::zeros({2}, lab.options());                 // [flag (as int), value]

  FADA_LAUNCH(blocks_for(num_pixels, 256), 256, 0, stream, scan_labels_kernel)(
      lab.data_ptr<int64_t>(), num_pixels, num_classes, ignore_index, slot.data_ptr<int32_t>(),
      reinterpret_cast<u64*>(count.data_ptr<int64_t>()),
      reinterpret_cast<u64*>(first.data_ptr<int64_t>()), reinterpret_cast<int*>(bad.data_ptr<int64_t>()),
      reinterpret_cast<u64*>(bad.data_ptr<int64_t>() + 1));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor bad_host = bad.cpu();
  TORCH_CHECK(reinterpret_cast<const int*>(bad_host.data_ptr<int64_t>())[0] == 0,
              "class_center_stats: labels must be in [0, num_classes=", num_classes,
              ") or equal ignore_index=", ignore_index, "; found ", bad_host.data_ptr<int64_t>()[1]);

  const Geometry g{channels, features.size(2) * features.size(3), features.size(3),
                   features.stride(0), features.stride(1), features.stride(2), features.stride(3)};
  int64_t split_len = (num_pixels + kMaxSplits - 1) / kMaxSplits;
  split_len = split_len < kMinSplit ? kMinSplit : split_len;
  const int64_t splits = (num_pixels + split_len - 1) / split_len;
  const int64_t units = channels * splits;
  at::Tensor part1 = at::empty({splits, num_classes, channels}, opts);
  at::Tensor part2 = at::empty({splits, num_classes, channels}, opts);
  at::Tensor m2_channel = at::empty({num_classes, channels}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "class_center_stats_cuda", [&] {
        const scalar_t* x = features.data_ptr<scalar_t>();
        const u64* first_p = reinterpret_cast<const u64*>(first.data_ptr<int64_t>());
        const u64* count_p = reinterpret_cast<const u64*>(count.data_ptr<int64_t>());
        if (units > 0) {
          const int64_t per_warp = static_cast<int64_t>(sizeof(double)) * 3 * num_classes;
          int64_t warps = kSharedBytes / per_warp;
          warps = warps < kMaxWarpsPerBlock ? warps : kMaxWarpsPerBlock;
          const int64_t blocks = (units + warps - 1) / warps;
          const size_t shmem = static_cast<size_t>(per_warp * warps);
          TORCH_CHECK(blocks <= 0x7fffffff, "class_center_stats: too many channels x pixels");
          const dim3 grid(static_cast<unsigned>(blocks)), block(static_cast<unsigned>(warps * 32));
          FADA_LAUNCH(grid, block, shmem, stream, partial_stats_kernel<scalar_t>)(
              x, g, slot.data_ptr<int32_t>(), first_p, num_classes, num_pixels, splits, split_len,
              part1.data_ptr<double>(), part2.data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          FADA_LAUNCH(blocks_for(num_classes * channels, 256), 256, 0, stream, reduce_splits_kernel<scalar_t>)(
              x, g, first_p, count_p, num_classes, splits, part1.data_ptr<double>(),
              part2.data_ptr<double>(), means.data_ptr<double>(), m2_channel.data_ptr<double>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          m2_channel.zero_();
        }
        FADA_LAUNCH(num_classes, kReduceThreads, 0, stream, finish_classes_kernel)(
            m2_channel.data_ptr<double>(), count_p, channels, counts.data_ptr<double>(),
            m2.data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {counts, means, m2};
}

}  // namespace

#ifndef FADA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fada_core, CUDA, m) {
  m.impl("class_center_stats", &class_center_stats_cuda);
}
#endif

}  // namespace fada_core
