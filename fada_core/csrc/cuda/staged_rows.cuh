// Staged separable interpolation for the CUDA fast paths (bilinear
// upsampling, either corner convention, every low-resolution input at one
// h x w): reusable device and host pieces, used by the FADA loss
// (fada_loss_kernel.cu) and cross-entropy (cross_entropy_kernel.cu) fast paths;
// their shared-memory layout and limit are common/kernel_limits.h's.
//
// Tiling, and why it needs no float atomics: a block owns batch item b, the
// output rows whose lower source row i0(y) is r (blockIdx.y), and the output
// columns whose lower source column i0(x) lies in the tile [j0, j0 + nj) of
// source columns (blockIdx.x; a partition of the output, no halo). It stages
// the two source rows r and i1(r) of every channel for the columns
// [j0, j0 + ns), ns = nj + 1 unless the tile ends at the last column, in
// shared memory; one thread per output column interpolates them horizontally
// once (top value and bottom - top per channel), so each output row's value is
// one FMA. The gradient of a block lands on source rows r ("top") and i1(r)
// ("bottom") and on columns [j0, j0 + ns): the first nj into its slots of
// part_main[b][r][top|bottom][c][j], column j0 + nj (reached only through
// i1(x)) into part_spill[b][r][top|bottom][c][tile]. staged_gather_kernel then
// adds the slots of each low-resolution element in a fixed order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../common/fada_math.h"
#include "../common/kernel_limits.h"
#include "device_support.cuh"
#include "upsample_common.cuh"

namespace fada {
namespace cuda {

// Values read with one 64-bit (float) or 128-bit (double) shared-memory access.
template <typename T>
struct alignas(2 * sizeof(T)) TwoOf {
  T x, y;
};

// Largest block of the staged kernels: one thread per output column, blocks of
// 32, 64 or 128 threads (powers of two, for block_sum).
constexpr int kStagedMaxThreads = static_cast<int>(limits::kStagedMaxThreads);

// Output rows per pass of a staged kernel: per-row state stays in registers.
constexpr int kRows = 4;

// A staged tile: tj source columns per block (the last tile may hold fewer),
// nx threads, output columns of a tile in ceil(columns / nx) chunks; the
// block's dynamic shared memory smem and its kernel's static static_smem.
struct StagedConfig {
  int64_t tj = 0;
  int nx = 0;
  int64_t tiles = 0;
  size_t smem = 0;
  size_t static_smem = 0;
};

// Host: first output index whose lower source index is >= j, for j = 0..in
// (the last entry is out), by the device's source_index. Only the choice of
// the block shape depends on it (the kernels find their ranges on the device),
// so an output index on which the host and an FMA-contracting device disagree
// (align_corners=False: scale * (dst + 1/2) - 1/2) costs no correctness.
template <typename acc_t>
std::vector<int64_t> first_output_at_or_beyond(const AxisMap<acc_t>& map, int64_t in, int64_t out) {
  std::vector<int64_t> first(static_cast<size_t>(in + 1), out);
  int64_t j = 0;
  for (int64_t o = 0; o < out; ++o) {
    const int64_t i0 = source_index<acc_t>(map, o, in).i0;
    while (j <= i0) first[static_cast<size_t>(j++)] = o;
  }
  return first;
}

// Host: FADA_CORE_CUDA_GENERAL_KERNELS=1 turns the staged fast paths off, so
// every shape takes the general kernels. For the tests only, which hold the
// general kernels to the reference on random shapes that way (the fast paths
// take nearly all of them otherwise); read at every call, so a test can switch.
inline bool general_kernels_forced() {
  const char* v = std::getenv("FADA_CORE_CUDA_GENERAL_KERNELS");
  return v != nullptr && v[0] == '1';
}

// Host: the tile width and block size that waste the fewest thread-chunk slots
// on the widest tile (idle lanes), among those whose shared memory fits in
// `limit` (smem_of(nx, tj) bytes). Ties go to the wider tile (fewer staged
// halo columns). tiles == 0 when nothing fits. Depends only on the shapes and
// `limit`, so the summation order is the same on every run. tiles == 0 too
// when general_kernels_forced().
template <typename acc_t, typename SmemOf>
StagedConfig choose_staged_config(const AxisMap<acc_t>& sx, int64_t w, int64_t W, size_t limit, SmemOf smem_of) {
  if (general_kernels_forced()) return StagedConfig();
  const std::vector<int64_t> first = first_output_at_or_beyond<acc_t>(sx, w, W);
  StagedConfig best;
  int64_t best_cost = -1;
  for (int64_t tj = 1; tj <= 32 && tj <= w; ++tj) {
    int64_t widest = 0;
    for (int64_t j0 = 0; j0 < w; j0 += tj) {
      const int64_t j1 = j0 + tj < w ? j0 + tj : w;
      const int64_t cols = first[static_cast<size_t>(j1)] - first[static_cast<size_t>(j0)];
      widest = cols > widest ? cols : widest;
    }
    int nx = static_cast<int>(limits::kStagedMinThreads);
    while (nx < kStagedMaxThreads && nx < widest) nx *= 2;
    const size_t smem = smem_of(nx, tj);
    if (smem > limit) continue;
    const int64_t tiles = ceil_div(w, tj);
    const int64_t chunks = widest > nx ? ceil_div(widest, nx) : 1;
    const int64_t cost = tiles * nx * chunks;
    if (best_cost < 0 || cost <= best_cost) {
      best_cost = cost;
      best.tj = tj;
      best.nx = nx;
      best.tiles = tiles;
      best.smem = smem;
    }
  }
  return best;
}

// The staged kernels' float math on the device (FADA loss and cross-entropy): single MUFU instructions
// (ex2/lg2.approx.ftz, about 2 ulp like exp2f/log2f, which add instructions to
// keep denormals; rcp.approx.ftz, 1 ulp, where __frcp_rn adds a Newton step
// and a slow-path branch). Their domains make the flush harmless: exp2 of
// x <= ~0 (a value minus its row's maximum or a bound of it; a term below
// 2^-126 next to a sum >= 2^-32 changes no float sum), log2 and 1/x of a sum
// of exps >= 2^-32, a normal float whose reciprocal is normal too. No
// fast-math anywhere else; double and the host (the emulation test) use the
// library functions and a division.
template <typename acc_t>
__device__ __forceinline__ acc_t exp2_acc(acc_t x) {
  return ::exp2(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t log2_acc(acc_t x) {
  return ::log2(x);
}
template <typename acc_t>
__device__ __forceinline__ acc_t recip_acc(acc_t x) {
  return static_cast<acc_t>(1) / x;
}
// max and min that may drop a NaN operand (one instruction): the callers
// propagate NaN through the sums instead.
template <typename acc_t>
__device__ __forceinline__ acc_t max_acc(acc_t a, acc_t b) {
  return ::fmax(a, b);
}
template <typename acc_t>
__device__ __forceinline__ acc_t min_acc(acc_t a, acc_t b) {
  return ::fmin(a, b);
}
#if defined(__CUDA_ARCH__)
template <>
__device__ __forceinline__ float exp2_acc<float>(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
template <>
__device__ __forceinline__ float log2_acc<float>(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
template <>
__device__ __forceinline__ float recip_acc<float>(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif
template <>
__device__ __forceinline__ float max_acc<float>(float a, float b) {
  return ::fmaxf(a, b);
}
template <>
__device__ __forceinline__ float min_acc<float>(float a, float b) {
  return ::fminf(a, b);
}

// Device: e / n for 0 <= e < 2^22 and n >= 1, from the float quotient: e and
// n are exact in float, 1 / n (1 ulp) and the product (half an ulp) are off
// by less than e / n * 2^-22 < 1, so one correction step makes it exact.
__device__ __forceinline__ int small_div(int e, int n) {
  int q = static_cast<int>(static_cast<float>(e) * recip_acc<float>(static_cast<float>(n)));
  const int r = e - q * n;
  q += r < 0 ? -1 : (r >= n ? 1 : 0);
  return q;
}

// Device: (e / n, e % n) for e = threadIdx.x, threadIdx.x + blockDim.x, ...,
// the block-strided loops over (channel, column) pairs, with the divisions
// done once at the start (n < 2^22) instead of at every step.
struct StridedDivMod {
  int q, r, dq, dr, n;
  __device__ __forceinline__ explicit StridedDivMod(int n_) : n(n_) {
    const int start = threadIdx.x, stride = blockDim.x;
    q = small_div(start, n);
    r = start - q * n;
    dq = small_div(stride, n);
    dr = stride - dq * n;
  }
  __device__ __forceinline__ void next() {
    q += dq;
    r += dr;
    if (r >= n) {
      r -= n;
      ++q;
    }
  }
};

// Device: the block's place in the tiling (see the top comment).
struct StagedTile {
  int64_t b, r, r1;  // batch item, source rows r (top) and i1(r) (bottom)
  int64_t tile, j0, nj, ns;
};

__device__ __forceinline__ StagedTile staged_tile(int64_t tj, int64_t h, int64_t w) {
  StagedTile t;
  t.b = blockIdx.z;
  t.r = blockIdx.y;
  t.r1 = t.r + 1 < h ? t.r + 1 : h - 1;
  t.tile = blockIdx.x;
  t.j0 = t.tile * tj;
  t.nj = t.j0 + tj < w ? tj : w - t.j0;
  t.ns = t.j0 + t.nj < w ? t.nj + 1 : t.nj;
  return t;
}

// Device: colstart[jj] (jj = 0..nj) = first output column whose lower source
// column is >= j0 + jj, rows[0..1] = the output rows of group r; each entry by
// its own thread, all in one loop (one copy of the search, the first warp's
// lanes side by side). The caller synchronises.
template <typename acc_t>
__device__ __forceinline__ void staged_ranges(const StagedTile& t, const AxisMap<acc_t>& sy, const AxisMap<acc_t>& sx,
                                              int64_t h, int64_t w, int64_t H, int64_t W, int* colstart, int* rows) {
  for (int64_t jj = threadIdx.x; jj <= t.nj + 2; jj += blockDim.x) {
    const bool column = jj <= t.nj;
    const int64_t found = first_at_or_beyond<acc_t>(column ? t.j0 + jj : t.r + (jj - t.nj - 1), column ? sx : sy,
                                                    column ? w : h, column ? W : H);
    (column ? colstart[jj] : rows[jj - t.nj - 1]) = static_cast<int>(found);
  }
}

// Device: stages rows r and r1 of `channels` planes (each h x w, plane stride
// h * w, starting at `planes`), columns [j0, j0 + ns), times `scale`, into
// raw[(c * 2 + row) * ns_max + jj]; the last tile (ns == nj < ns_max) also
// gets a copy of its last column at jj = ns, so that i1 = min(i0 + 1, w - 1)
// is always at i0 + 1 (see staged_column). In-block indices are ints (a
// block's shared memory holds them). The caller synchronises.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_rows(const scalar_t* __restrict__ planes, int64_t channels, const StagedTile& t,
                                           int64_t h, int64_t w, acc_t scale, int64_t ns_max, acc_t* raw) {
  const int ns = static_cast<int>(t.ns), per_channel = 2 * ns, total = static_cast<int>(channels) * per_channel;
  const scalar_t* top = planes + t.r * w + t.j0;
  const int64_t bottom_offset = (t.r1 - t.r) * w, plane = h * w;
  StridedDivMod crest(per_channel);
  for (int e = threadIdx.x; e < total; e += blockDim.x, crest.next()) {
    const int c = crest.q, rest = crest.r;
    const int row = rest >= ns ? 1 : 0, jj = rest - row * ns;
    const scalar_t v = top[c * plane + (row ? bottom_offset : 0) + jj];
    acc_t* at = raw + (c * 2 + row) * static_cast<int>(ns_max) + jj;
    at[0] = static_cast<acc_t>(v) * scale;
    if (jj + 1 == ns && t.ns == t.nj) at[1] = at[0];  // the clamped column past the end
  }
}

// Device, one thread: the horizontal interpolation of one staged channel at an
// output column with local source index i0 (i1 is at i0 + 1, see stage_rows)
// and weight lx: (top value, bottom - top), so that row y's value is
// fma(ly, .y, .x). Fixed offsets from one address: no index arithmetic.
template <typename acc_t>
__device__ __forceinline__ TwoOf<acc_t> staged_column(const acc_t* raw_channel, int64_t ns_max, int i0, acc_t lx) {
  const acc_t* at = raw_channel + i0;
  const acc_t* bottom = at + static_cast<int>(ns_max);
  const acc_t top = lerp(at[0], at[1], lx);
  TwoOf<acc_t> v;
  v.x = top;
  v.y = lerp(bottom[0], bottom[1], lx) - top;
  return v;
}

// One pass's gradient of a (channel, column): sum over its rows of g and of
// ly * g, kept as (top, bottom) weights: top = sum (1 - ly) g = sum - bottom.
template <typename acc_t>
__device__ __forceinline__ void accumulate_rows(TwoOf<acc_t>& slot, acc_t sum, acc_t bottom, bool first) {
  if (first) {
    slot.x = sum - bottom;
    slot.y = bottom;
  } else {
    slot.x += sum - bottom;
    slot.y += bottom;
  }
}

// Shared accumulators of a block's horizontal adjoint: see
// limits::staged_hacc_size (common/kernel_limits.h).
using limits::staged_hacc_size;

// Device, after a barrier: the horizontal adjoint of one chunk of output
// columns [cx0, cx1). gacc[c * nx + (x - cx0)] holds column x's gradient sums
// (top row, bottom row) of channel c, colw[x - cx0] its lambda. One work item
// per (channel, source column j0 + jj < j0 + nj) sums its columns in
// increasing x into hacc (see staged_hacc_size): each column read once, as
// sum g and sum lambda g; own = sum g - sum lambda g. `first`: the block's
// first chunk, which sets the entries instead of adding to them.
template <typename acc_t>
__device__ __forceinline__ void staged_adjoint(const StagedTile& t, int64_t channels, int64_t w, int cx0, int cx1,
                                               int nx, const int* colstart, const TwoOf<acc_t>* gacc,
                                               const acc_t* colw, int64_t ns_max, acc_t* hacc, bool first) {
  const int nj = static_cast<int>(t.nj), stride = static_cast<int>(ns_max), ch = static_cast<int>(channels);
  acc_t* next = hacc + ch * 2 * stride;
  StridedDivMod cjj(nj);
  for (int e = threadIdx.x; e < ch * nj; e += blockDim.x, cjj.next()) {
    const int c = cjj.q, jj = cjj.r;
    const TwoOf<acc_t>* gc = gacc + c * nx - cx0;
    const acc_t* wc = colw - cx0;
    const int lo = colstart[jj] > cx0 ? colstart[jj] : cx0;
    const int hi = colstart[jj + 1] < cx1 ? colstart[jj + 1] : cx1;
    acc_t gt = 0, gb = 0, lt = 0, lb = 0;  // sum g, sum lambda g (top, bottom)
#pragma unroll 2
    for (int x = lo; x < hi; ++x) {
      const TwoOf<acc_t> gx = gc[x];
      gt += gx.x;
      gb += gx.y;
      lt += wc[x] * gx.x;
      lb += wc[x] * gx.y;
    }
    const acc_t split = t.j0 + jj == w - 1 ? static_cast<acc_t>(0) : static_cast<acc_t>(1);
    const int top = (c * 2) * stride + jj, bottom = top + stride;
    if (first) {
      hacc[top] = gt - split * lt;
      hacc[bottom] = gb - split * lb;
      next[top] = split * lt;
      next[bottom] = split * lb;
    } else {
      hacc[top] += gt - split * lt;
      hacc[bottom] += gb - split * lb;
      next[top] += split * lt;
      next[bottom] += split * lb;
    }
  }
}

// Device: the block's sums into its main and spill slots (see the top
// comment): source column j0 + jj gets next[jj - 1] + own[jj] (own[nj] is 0),
// or 0 when no chunk ran (`written` false: no output pixel in the block).
template <typename acc_t>
__device__ __forceinline__ void staged_write_slots(const StagedTile& t, int64_t channels, int64_t h, int64_t w,
                                                   int64_t tiles, const acc_t* hacc, int64_t ns_max, bool written,
                                                   acc_t* __restrict__ part_main, acc_t* __restrict__ part_spill) {
  const int ns = static_cast<int>(t.ns), nj = static_cast<int>(t.nj), stride = static_cast<int>(ns_max);
  const int ch = static_cast<int>(channels), wi = static_cast<int>(w), ti = static_cast<int>(tiles);
  const acc_t* next = hacc + ch * 2 * stride;
  // offsets within the block's slots are ints (staged_gather_grid); then + tb * channels * w + c * w
  acc_t* main_top = part_main + ((t.b * h + t.r) * 2) * channels * w + t.j0;
  acc_t* spill_top = part_spill + ((t.b * h + t.r) * 2) * channels * tiles + t.tile;
  StridedDivMod cjj(nj);
  for (int e = threadIdx.x; e < ch * nj; e += blockDim.x, cjj.next()) {  // main slots
    const int c = cjj.q, jj = cjj.r;
    for (int tb = 0; tb < 2; ++tb) {
      const int at = (c * 2 + tb) * stride + jj;
      const acc_t v = jj > 0 ? next[at - 1] + hacc[at] : hacc[at];
      main_top[(tb * ch + c) * wi + jj] = written ? v : static_cast<acc_t>(0);
    }
  }
  if (ns > nj) {  // the spill column jj = nj
    for (int e = threadIdx.x; e < 2 * ch; e += blockDim.x) {  // e = c * 2 + tb
      spill_top[((e & 1) * ch + (e >> 1)) * ti] = written ? next[e * stride + nj - 1] : static_cast<acc_t>(0);
    }
  }
}

// grad[b][c][i][j] from the slots: main top of row group i, main bottom of
// group i - 1 (and of group h - 1 on the last row, whose i1 is itself), then
// the same from the previous tile's spill when j starts a tile. Fixed order.
// Grid: x = chunks of kGatherThreads columns, y = row i, z = plane b * C + c
// (staged_gather_grid checks the limits), so no index needs a division but
// b = z / C and the tile j / tj, both small_div's.
constexpr int kGatherThreads = 128;

// Device: the fixed-order sum of element (plane, i, j)'s slots.
template <typename acc_t>
__device__ __forceinline__ acc_t staged_gather_sum(const acc_t* __restrict__ part_main,
                                                   const acc_t* __restrict__ part_spill, int C, int h, int w,
                                                   int tj, int tiles, int plane, int i, int j) {
  const int b = small_div(plane, C), c = plane - b * C;
  // slot (row group, top|bottom) of this (b, c): ((b * h + row) * 2 + tb) * C + c; the
  // offsets from (i, top) to (i - 1, bottom) and (i, bottom) are ints (staged_gather_grid)
  const int64_t top = (static_cast<int64_t>(b * h + i) * 2) * C + c;
  const acc_t* slot = part_main + top * w + j;
  const int up = -C * w, down = C * w;
  acc_t v = slot[0];
  if (i > 0) v += slot[up];
  if (i == h - 1) v += slot[down];
  const int prev = small_div(j, tj) - 1;
  if (j > 0 && j == (prev + 1) * tj) {
    const acc_t* spill = part_spill + top * tiles + prev;
    v += spill[0];
    if (i > 0) v += spill[-C * tiles];
    if (i == h - 1) v += spill[C * tiles];
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGatherThreads)
    staged_gather_kernel(const acc_t* __restrict__ part_main, const acc_t* __restrict__ part_spill, int C,
                         int h, int w, int tj, int tiles, scalar_t* __restrict__ grad) {
  const int j = static_cast<int>(blockIdx.x) * kGatherThreads + static_cast<int>(threadIdx.x);
  if (j >= w) return;
  const int plane = blockIdx.z, i = blockIdx.y;
  grad[(static_cast<int64_t>(plane) * h + i) * w + j] =
      static_cast<scalar_t>(staged_gather_sum(part_main, part_spill, C, h, w, tj, tiles, plane, i, j));
}

// The same, each sum divided by *divisor when that is > 0 (a count computed on
// the device, e.g. the valid pixels of a mean; 0: nothing to divide, the sums
// are then 0 too).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGatherThreads)
    staged_gather_divided_kernel(const acc_t* __restrict__ part_main, const acc_t* __restrict__ part_spill,
                                 int C, int h, int w, int tj, int tiles,
                                 const int64_t* __restrict__ divisor, scalar_t* __restrict__ grad) {
  const int j = static_cast<int>(blockIdx.x) * kGatherThreads + static_cast<int>(threadIdx.x);
  if (j >= w) return;
  const int plane = blockIdx.z, i = blockIdx.y;
  acc_t v = staged_gather_sum(part_main, part_spill, C, h, w, tj, tiles, plane, i, j);
  const int64_t d = *divisor;
  if (d > 0) v /= static_cast<acc_t>(d);
  grad[(static_cast<int64_t>(plane) * h + i) * w + j] = static_cast<scalar_t>(v);
}

// Host: the gather's grid, or false when the shape exceeds it (or a column
// index exceeds small_div's range, or a block's slot offsets, below
// 2 * planes * w, would not be ints).
inline bool staged_gather_grid(int64_t planes, int64_t h, int64_t w, dim3& grid) {
  if (planes > 65535 || h > 65535 || w >= (int64_t{1} << 22) || 2 * planes * w >= (int64_t{1} << 31)) return false;
  grid = dim3(static_cast<unsigned>(ceil_div(w, kGatherThreads)), static_cast<unsigned>(h),
              static_cast<unsigned>(planes));
  return true;
}

// Host: the staged configuration of a kernel with footprint `fp` (kernel_limits.h)
// for `classes` classes, whose gradient input x is (B, C, h, w) and output
// H x W, its columns sampled through `sx`; tiles == 0 when the staged kernel cannot take it: in-block indices
// within int, the gather's grid (B * C <= 65535 planes), the block's dynamic
// and static shared memory within the device's.
template <typename acc_t>
StagedConfig staged_config(limits::StagedFootprint fp, int64_t classes, const at::Tensor& x, int64_t H, int64_t W,
                           const AxisMap<acc_t>& sx) {
  const int64_t w = x.size(3);
  if (H >= std::numeric_limits<int>::max() || W >= std::numeric_limits<int>::max()) return StagedConfig();
  dim3 gather_grid;
  if (!staged_gather_grid(x.size(0) * x.size(1), x.size(2), w, gather_grid)) return StagedConfig();
  const size_t optin = at::cuda::getDeviceProperties(at::cuda::current_device())->sharedMemPerBlockOptin;
  const size_t static_bytes = static_cast<size_t>(limits::staged_static_bytes(fp, sizeof(acc_t)));
  if (optin <= static_bytes) return StagedConfig();
  StagedConfig cfg = choose_staged_config<acc_t>(
      sx, w, W, optin - static_bytes, [fp, classes](int nx, int64_t tj) {
        return static_cast<size_t>(limits::staged_layout(fp, classes, nx, tj, sizeof(acc_t)).bytes);
      });
  cfg.static_smem = static_bytes;
  return cfg;
}

// Host: the grid (tiles, source rows, batch) of a staged launch of `kernel`,
// after allowing it cfg.smem bytes of dynamic shared memory where that and
// its static shared memory pass the 48 KB every kernel may use.
template <typename Kernel>
dim3 staged_launch_grid(Kernel kernel, const StagedConfig& cfg, int64_t h, int64_t batch) {
  if (cfg.smem + cfg.static_smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cfg.smem)));
  }
  return dim3(static_cast<unsigned>(cfg.tiles), static_cast<unsigned>(h), static_cast<unsigned>(batch));
}

// Host: the slots of a staged backward for input x (B, C, h, w). Under the
// emulation test they start as NaN, so that a slot the kernel fails to write
// shows.
template <typename acc_t>
void staged_slot_tensors(const at::Tensor& x, const StagedConfig& cfg, at::Tensor& part_main, at::Tensor& part_spill) {
  const int64_t B = x.size(0), C = x.size(1), h = x.size(2), w = x.size(3);
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  part_main = at::empty({B * h * 2 * C * w}, opts);
  part_spill = at::empty({B * h * 2 * C * cfg.tiles}, opts);
#ifdef FADA_CUDA_EMULATION
  part_main.fill_(std::numeric_limits<double>::quiet_NaN());
  part_spill.fill_(std::numeric_limits<double>::quiet_NaN());
#endif
}

// Host: the gradient (contiguous, like the staged input) from the slots;
// divisor: nullptr, or a device count to divide each element by when > 0.
template <typename scalar_t, typename acc_t>
void launch_staged_gather(const at::Tensor& part_main, const at::Tensor& part_spill, const StagedConfig& cfg,
                          const int64_t* divisor, const at::Tensor& grad, cudaStream_t stream) {
  dim3 grid;
  const bool fits = staged_gather_grid(grad.size(0) * grad.size(1), grad.size(2), grad.size(3), grid);
  TORCH_INTERNAL_ASSERT(fits, "a staged configuration admitted a plane the gather cannot take");
  const int C = static_cast<int>(grad.size(1)), h = static_cast<int>(grad.size(2)), w = static_cast<int>(grad.size(3));
  const int tj = static_cast<int>(cfg.tj), tiles = static_cast<int>(cfg.tiles);
  if (divisor == nullptr) {
    FADA_LAUNCH(grid, kGatherThreads, 0, stream, staged_gather_kernel<scalar_t, acc_t>)(
        part_main.template data_ptr<acc_t>(), part_spill.template data_ptr<acc_t>(), C, h, w, tj, tiles, grad.template data_ptr<scalar_t>());
  } else {
    FADA_LAUNCH(grid, kGatherThreads, 0, stream, staged_gather_divided_kernel<scalar_t, acc_t>)(
        part_main.template data_ptr<acc_t>(), part_spill.template data_ptr<acc_t>(), C, h, w, tj, tiles, divisor,
        grad.template data_ptr<scalar_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fada
