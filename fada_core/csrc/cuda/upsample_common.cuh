// Device building blocks shared by the fused FADA loss and upsampled
// cross-entropy CUDA kernels: fixed-order (deterministic) reductions, the
// output ranges that touch a source row/column, and the final gather of the
// per-group partials of the upsampling adjoint; and on the host, what their
// entry points share around a launch (dispatch_launch) and the general
// backward's launch (adjoint_backward).
//
// Backward design (no float atomics, same bits every run): one block per
// (batch item b, group r of output rows whose lower source row is r, tile of
// TJ source columns). Each thread owns one output column of a chunk of the
// block's output columns, walks the group's rows and accumulates its pixel's
// gradient in shared memory, weighted by the vertical lerp weights, into a
// "top" (source row r) and a "bottom" (source row min(r + 1, h - 1)) row.
// Then the horizontal adjoint sums each (channel, source column) over its
// output columns in increasing x into per-block accumulators, and the block
// writes partial slots part[b][r][top|bottom][c][j]. A last kernel adds
// top(i) + bottom(i - 1) (+ bottom(h - 1) on the last row) in that order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>

#include "../common/fada_math.h"
#include "../common/kernel_limits.h"
#include "device_support.cuh"

namespace fada {
namespace cuda {

constexpr int kReduceThreads = 256;
constexpr int kFinalThreads = 1024;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Blocks for a one-thread-per-pixel launch. Depends only on the problem size
// (never on the device), so the reduction order is the same everywhere.
inline int64_t pixel_blocks(int64_t total) {
  const int64_t blocks = ceil_div(total, kReduceThreads);
  return blocks < 1 ? 1 : (blocks > 65536 ? 65536 : blocks);
}

// Sum of v over the block (blockDim.x == kReduceThreads) in a fixed tree order;
// the result is valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  return shared[0];
}

// One block of kFinalThreads: out[0] = (sum of partials) / divisor, summed in a
// fixed order. divisor == nullptr: no division.
template <typename scalar_t, typename acc_t, typename div_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partials, int64_t n, const div_t* __restrict__ divisor,
                                       acc_t constant_divisor, scalar_t* __restrict__ out) {
  __shared__ acc_t shared[kFinalThreads];
  acc_t v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += partials[i];
  const acc_t total = block_sum(v, shared);
  if (threadIdx.x == 0) {
    acc_t d = constant_divisor;
    if (divisor != nullptr) d = static_cast<acc_t>(*divisor);
    out[0] = static_cast<scalar_t>(total / d);
  }
}

// Binary searches over the output indices of one axis; each relies on i0 and
// i1 being non-decreasing in the output index (either corner convention).

// First output index o in [0, out) with i1(o) >= j (out if none).
template <typename acc_t>
__device__ int64_t first_reaching(int64_t j, const AxisMap<acc_t>& map, int64_t in, int64_t out) {
  int64_t lo = 0, hi = out;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (source_index<acc_t>(map, mid, in).i1 >= j) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// First output index o in [0, out) with i0(o) > j (out if none).
template <typename acc_t>
__device__ int64_t first_beyond(int64_t j, const AxisMap<acc_t>& map, int64_t in, int64_t out) {
  int64_t lo = 0, hi = out;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (source_index<acc_t>(map, mid, in).i0 > j) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// First output index o with i0(o) >= r.
template <typename acc_t>
__device__ int64_t first_at_or_beyond(int64_t r, const AxisMap<acc_t>& map, int64_t in, int64_t out) {
  int64_t lo = 0, hi = out;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (source_index<acc_t>(map, mid, in).i0 >= r) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// One backward block (see the top comment): batch item b = blockIdx.z, row
// group r = blockIdx.y, source columns [j0, j0 + nj) (tj per block), the
// output columns [xa, xb) and rows [ya, yb) that touch them, and its dynamic
// shared memory, laid out as adjoint_smem counts it.
template <typename acc_t>
struct AdjointBlock {
  int64_t* xlo;    // [tj]: source column j0 + jj is reached by output columns
  int64_t* xhi;    //       [xlo[jj], xhi[jj])
  acc_t* top;      // [C][nx]: the current chunk's output columns, weighted
  acc_t* bot;      //          onto source row r (top) and r + 1 (bottom)
  acc_t* acc_top;  // [C][tj]: the block's sums per (channel, source column)
  acc_t* acc_bot;
  int64_t channels, tj, nx, b, r, j0, nj, xa, xb, ya, yb;
};

// Lays out the shared memory, zeroes the accumulators, finds the ranges.
// Ends with a barrier.
template <typename acc_t>
__device__ __forceinline__ AdjointBlock<acc_t> begin_adjoint_block(unsigned char* smem, int64_t channels, int64_t tj,
                                                                   const AxisMap<acc_t>& sy,
                                                                   const AxisMap<acc_t>& sx, int64_t h, int64_t w, int64_t H,
                                                                   int64_t W) {
  AdjointBlock<acc_t> blk;
  blk.channels = channels;
  blk.tj = tj;
  blk.nx = blockDim.x;
  blk.xlo = reinterpret_cast<int64_t*>(smem);
  blk.xhi = blk.xlo + tj;
  blk.top = reinterpret_cast<acc_t*>(blk.xhi + tj);
  blk.bot = blk.top + channels * blk.nx;
  blk.acc_top = blk.bot + channels * blk.nx;
  blk.acc_bot = blk.acc_top + channels * tj;
  blk.b = blockIdx.z;
  blk.r = blockIdx.y;
  blk.j0 = static_cast<int64_t>(blockIdx.x) * tj;
  const int64_t j1 = blk.j0 + tj < w ? blk.j0 + tj : w;
  blk.nj = j1 - blk.j0;
  for (int64_t e = threadIdx.x; e < channels * tj; e += blk.nx) {
    blk.acc_top[e] = 0;
    blk.acc_bot[e] = 0;
  }
  for (int64_t jj = threadIdx.x; jj < blk.nj; jj += blk.nx) {
    blk.xlo[jj] = first_reaching<acc_t>(blk.j0 + jj, sx, w, W);
    blk.xhi[jj] = first_beyond<acc_t>(blk.j0 + jj, sx, w, W);
  }
  blk.xa = first_reaching<acc_t>(blk.j0, sx, w, W);
  blk.xb = first_beyond<acc_t>(j1 - 1, sx, w, W);
  blk.ya = first_at_or_beyond<acc_t>(blk.r, sy, h, H);
  blk.yb = first_beyond<acc_t>(blk.r, sy, h, H);
  __syncthreads();
  return blk;
}

// Zeroes this thread's output column of the chunk's top/bottom rows.
template <typename acc_t>
__device__ __forceinline__ void clear_chunk_column(const AdjointBlock<acc_t>& blk) {
  for (int64_t c = 0; c < blk.channels; ++c) {
    blk.top[c * blk.nx + threadIdx.x] = 0;
    blk.bot[c * blk.nx + threadIdx.x] = 0;
  }
}

// After every thread has added its column of the chunk starting at output
// column cx0: the horizontal adjoint of the chunk, each (channel, source
// column) summed in increasing x into the block's accumulators. Barriers on
// both sides.
template <typename acc_t>
__device__ __forceinline__ void finish_chunk(const AdjointBlock<acc_t>& blk, int64_t cx0, const AxisMap<acc_t>& sx,
                                             int64_t w) {
  __syncthreads();
  const int64_t cx1 = cx0 + blk.nx < blk.xb ? cx0 + blk.nx : blk.xb;
  for (int64_t e = threadIdx.x; e < blk.channels * blk.nj; e += blk.nx) {
    const int64_t c = e / blk.nj, jj = e % blk.nj, j = blk.j0 + jj;
    const int64_t lo = blk.xlo[jj] > cx0 ? blk.xlo[jj] : cx0;
    const int64_t hi = blk.xhi[jj] < cx1 ? blk.xhi[jj] : cx1;
    acc_t st = 0, sb = 0;
    for (int64_t xx = lo; xx < hi; ++xx) {
      const LinearIndex<acc_t> ixx = source_index<acc_t>(sx, xx, w);
      acc_t wx = 0;
      if (ixx.i0 == j) wx += static_cast<acc_t>(1) - ixx.lambda;
      if (ixx.i1 == j) wx += ixx.lambda;
      st += wx * blk.top[c * blk.nx + (xx - cx0)];
      sb += wx * blk.bot[c * blk.nx + (xx - cx0)];
    }
    blk.acc_top[c * blk.tj + jj] += st;
    blk.acc_bot[c * blk.tj + jj] += sb;
  }
  __syncthreads();
}

// The block's accumulators into its partial slots part[b][r][top|bottom][c][j].
template <typename acc_t>
__device__ __forceinline__ void write_partial_slots(const AdjointBlock<acc_t>& blk, int64_t h, int64_t w,
                                                    acc_t* part) {
  const int64_t slot = blk.channels * w;
  for (int64_t e = threadIdx.x; e < blk.channels * blk.nj; e += blk.nx) {
    const int64_t c = e / blk.nj, jj = e % blk.nj;
    part[((blk.b * h + blk.r) * 2 + 0) * slot + c * w + blk.j0 + jj] = blk.acc_top[c * blk.tj + jj];
    part[((blk.b * h + blk.r) * 2 + 1) * slot + c * w + blk.j0 + jj] = blk.acc_bot[c * blk.tj + jj];
  }
}

// grad[b][c][i][j] from the partial slots, fixed order (see the top comment).
template <typename scalar_t, typename acc_t>
__global__ void gather_partials_kernel(const acc_t* __restrict__ part, int64_t B, int64_t C, int64_t h, int64_t w,
                                       scalar_t* __restrict__ grad) {
  const int64_t total = B * C * h * w;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % w;
    const int64_t i = (idx / w) % h;
    const int64_t c = (idx / (w * h)) % C;
    const int64_t b = idx / (w * h * C);
    const int64_t slot = C * w;
    const int64_t off = c * w + j;
    acc_t v = part[((b * h + i) * 2 + 0) * slot + off];
    if (i > 0) v += part[((b * h + i - 1) * 2 + 1) * slot + off];
    if (i == h - 1) v += part[((b * h + i) * 2 + 1) * slot + off];
    grad[idx] = static_cast<scalar_t>(v);
  }
}

// Host: what only the CUDA backend limits: grid dimensions y (source rows h)
// and z (batch) of the per-row-group kernels, for `x` (B, C, h, w) of `op`.
inline void check_grid_limits(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.size(0) <= 65535 && x.size(2) <= 65535, op, " (CUDA kernel): batch and height must be <= 65535, got ",
              x.size(0), " and ", x.size(2));
}

// The element type a dispatch_launch body runs for: typename decltype(tag)::type.
template <typename T>
struct ScalarTag {
  using type = T;
};

// Host: what every loss launch of the CUDA backend does around
// `body(tag, stream)`, for input x (B, C, h, w) of `op`: check_grid_limits,
// x's device made current, its current stream, and the dispatch over the
// floating types (tag: a ScalarTag). `dispatch_name` names the launch in the
// error for any other dtype, in AT_DISPATCH's words (whose name must be a
// compile-time constant, so one wrapper could not pass each op's).
template <typename Body>
void dispatch_launch(const at::Tensor& x, const char* op, const char* dispatch_name, Body body) {
  check_grid_limits(x, op);
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kDouble: return body(ScalarTag<double>(), stream);
    case at::kFloat: return body(ScalarTag<float>(), stream);
    case at::kHalf: return body(ScalarTag<at::Half>(), stream);
    case at::kBFloat16: return body(ScalarTag<at::BFloat16>(), stream);
    default:
      TORCH_CHECK_NOT_IMPLEMENTED(false, '"', dispatch_name, "\" not implemented for '", c10::toString(x.scalar_type()),
                                  "'");
  }
}

// Launch configuration of the backward: NX threads (output columns per
// chunk), TJ source columns per block, and the dynamic shared memory:
// top/bottom [C][NX], accumulators [2][C][TJ], ranges [2][TJ] (int64).
struct AdjointConfig {
  int nx = 128;
  int64_t tj = 1;
  size_t smem = 0;
};

template <typename acc_t>
size_t adjoint_smem(int64_t channels, int nx, int64_t tj) {
  return static_cast<size_t>(limits::adjoint_shared_bytes(channels, nx, tj, sizeof(acc_t)));
}

template <typename acc_t, typename Kernel>
AdjointConfig adjoint_config(int64_t channels, const AxisMap<acc_t>& sx, int64_t w, int64_t out_w, Kernel kernel) {
  AdjointConfig cfg;
  const int device = at::cuda::current_device();
  const size_t max_optin = at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin;
  // widest run of output columns sharing one lower source column (counted:
  // with align_corners=False the first run is about 1.5 times the others)
  int64_t seg_max = 0;
  for (int64_t o = 0, run = 0, prev = -1; o < out_w; ++o) {
    const int64_t i0 = source_index<acc_t>(sx, o, w).i0;
    run = i0 == prev ? run + 1 : 1;
    prev = i0;
    seg_max = run > seg_max ? run : seg_max;
  }
  for (int nx = 128; nx >= 32; nx /= 2) {
    // a block's output columns (tj source columns plus the run left of them)
    // fit in one chunk of nx: one pass over the group's rows
    int64_t tj = nx / (seg_max > 0 ? seg_max : 1) - 1;
    tj = tj < 1 ? 1 : (tj > 32 ? 32 : tj);
    cfg.nx = nx;
    cfg.tj = tj;
    cfg.smem = adjoint_smem<acc_t>(channels, nx, tj);
    if (cfg.smem <= 48 * 1024) break;
  }
  if (cfg.smem > max_optin) {  // many channels: fewer source columns per block before giving up
    cfg.tj = 1;
    cfg.smem = adjoint_smem<acc_t>(channels, cfg.nx, cfg.tj);
  }
  TORCH_CHECK(cfg.smem <= max_optin, "fada_core CUDA kernel: ", channels,
              " channels need more shared memory than the device offers (", cfg.smem, " > ", max_optin, " bytes)");
  if (cfg.smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cfg.smem)));
  }
  return cfg;
}

// Host: a backward through the general kernels (see the top comment) into
// grad, the contiguous (B, C, h, w) gradient of source logits sampled through
// `sx` onto W output columns: the configuration of `kernel` (adjoint_config),
// its partial slots, `launch(grid, cfg, part)` (the kernel's launch, whose
// last two arguments are cfg.tj and part), then the gather into grad.
template <typename scalar_t, typename acc_t, typename Kernel, typename Launch>
void adjoint_backward(Kernel kernel, const AxisMap<acc_t>& sx, int64_t W, const at::Tensor& grad, cudaStream_t stream,
                      Launch launch) {
  const int64_t B = grad.size(0), C = grad.size(1), h = grad.size(2), w = grad.size(3);
  const AdjointConfig cfg = adjoint_config<acc_t>(C, sx, w, W, kernel);
  at::Tensor part = at::empty({B * h * 2 * C * w}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  const dim3 grid(static_cast<unsigned>(ceil_div(w, cfg.tj)), static_cast<unsigned>(h), static_cast<unsigned>(B));
  launch(grid, cfg, part.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  FADA_LAUNCH(pixel_blocks(grad.numel()), kReduceThreads, 0, stream, gather_partials_kernel<scalar_t, acc_t>)(
      part.data_ptr<acc_t>(), B, C, h, w, grad.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fada
