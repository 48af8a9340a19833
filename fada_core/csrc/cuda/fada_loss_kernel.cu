// Fused FADA loss on CUDA: forward and the gradient w.r.t. the low-resolution
// discriminator logits. The per-pixel math is fada_math.h's (shared with the
// CPU kernels); see cpu/fada_loss_kernel.cpp for the formulas and
// upsample_common.cuh for the deterministic backward design.
//
// Forward: one thread per output pixel, bilinear samples read straight from
// the (small, cache-resident) low-resolution inputs; "none" writes the map,
// mean/sum reduce per block in a fixed tree order and then in one block.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../common/fada_loss_host.h"
#include "../common/fada_math.h"
#include "../common/kernel_limits.h"
#include "staged_rows.cuh"
#include "upsample_common.cuh"

namespace fada {
namespace cuda {
namespace {

template <typename acc_t>
struct FadaGeometry {
  int64_t K, h, w, hs, ws, H, W, off;
  AxisMap<acc_t> sdy, sdx, ssy, ssx;  // source positions: disc rows/cols, seg rows/cols
  acc_t inv_t, cap;
};

// Soft-label normaliser of one pixel: max and 1/sum of exp(s / T - max).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void seg_normaliser(const scalar_t* splane, const FadaGeometry<acc_t>& g,
                                               const LinearIndex<acc_t>& iy, const LinearIndex<acc_t>& ix, acc_t& ms,
                                               acc_t& inv_ss) {
  const int64_t plane = g.hs * g.ws;
  ms = -std::numeric_limits<acc_t>::infinity();
  acc_t ss = 0;
  for (int64_t c = 0; c < g.K; ++c) online_logsumexp(ms, ss, bilinear_sample(splane + c * plane, g.ws, iy, ix) * g.inv_t);
  inv_ss = static_cast<acc_t>(1) / ss;
}

// ... and A = sum_c a_c, which only the gradient needs (one more pass).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void seg_stats(const scalar_t* splane, const FadaGeometry<acc_t>& g,
                                          const LinearIndex<acc_t>& iy, const LinearIndex<acc_t>& ix, acc_t& ms,
                                          acc_t& inv_ss, acc_t& asum) {
  seg_normaliser(splane, g, iy, ix, ms, inv_ss);
  const int64_t plane = g.hs * g.ws;
  asum = 0;
  for (int64_t c = 0; c < g.K; ++c) {
    const acc_t v = bilinear_sample(splane + c * plane, g.ws, iy, ix) * g.inv_t;
    asum += soft_label(exp_acc(v - ms), inv_ss, g.cap);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void disc_stats(const scalar_t* dplane, const FadaGeometry<acc_t>& g,
                                           const LinearIndex<acc_t>& iy, const LinearIndex<acc_t>& ix, acc_t& m,
                                           acc_t& s) {
  const int64_t plane = g.h * g.w;
  m = -std::numeric_limits<acc_t>::infinity();
  s = 0;
  for (int64_t c = 0; c < 2 * g.K; ++c) online_logsumexp(m, s, bilinear_sample(dplane + c * plane, g.w, iy, ix));
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    fada_forward_kernel(const scalar_t* __restrict__ disc, const scalar_t* __restrict__ seg,
                        const acc_t* __restrict__ weight, FadaGeometry<acc_t> g, int64_t B,
                        acc_t* __restrict__ out_map, acc_t* __restrict__ partials) {
  __shared__ acc_t shared[kReduceThreads];
  const int64_t total = B * g.H * g.W;
  acc_t local = 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = idx % g.W;
    const int64_t y = (idx / g.W) % g.H;
    const int64_t b = idx / (g.W * g.H);
    const LinearIndex<acc_t> iy = source_index<acc_t>(g.sdy, y, g.h), ix = source_index<acc_t>(g.sdx, x, g.w);
    const LinearIndex<acc_t> siy = source_index<acc_t>(g.ssy, y, g.hs), six = source_index<acc_t>(g.ssx, x, g.ws);
    const scalar_t* dplane = disc + b * 2 * g.K * g.h * g.w;
    const scalar_t* splane = seg + b * g.K * g.hs * g.ws;
    acc_t ms, inv_ss, m, s;
    seg_normaliser(splane, g, siy, six, ms, inv_ss);
    disc_stats(dplane, g, iy, ix, m, s);
    const acc_t log_sum = log_acc(s);
    acc_t loss = 0;
    for (int64_t c = 0; c < g.K; ++c) {
      const acc_t v = bilinear_sample(splane + c * g.hs * g.ws, g.ws, siy, six) * g.inv_t;
      const acc_t a = soft_label(exp_acc(v - ms), inv_ss, g.cap);
      const acc_t z = bilinear_sample(dplane + (g.off + c) * g.h * g.w, g.w, iy, ix);
      loss += fada_loss_term(a, z, m, log_sum);
    }
    if (weight != nullptr) loss *= weight[idx];
    if (out_map != nullptr) {
      out_map[idx] = loss;
    } else {
      local += loss;
    }
  }
  if (partials != nullptr) {
    const acc_t block_total = block_sum(local, shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
  }
}

// Blocks per SM the general backward is held to: its float version sits at
// the 4-block (16 warps, <= 128 registers) cliff (127 without the bound); the
// double version would spill under it, so it gets no minimum.
template <typename acc_t>
constexpr int backward_min_blocks() {
  return sizeof(acc_t) == 4 ? 4 : 1;
}

// grad: the (B, H, W) map when grad_is_map, else a scalar divided by grad_div.
// At most 128 threads (adjoint_config).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(128, backward_min_blocks<acc_t>()) fada_backward_kernel(const scalar_t* __restrict__ disc, const scalar_t* __restrict__ seg,
                                     const acc_t* __restrict__ weight, const acc_t* __restrict__ grad,
                                     bool grad_is_map, acc_t grad_div, FadaGeometry<acc_t> g, int64_t tj,
                                     acc_t* __restrict__ part) {
  FADA_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int64_t C = 2 * g.K;
  const AdjointBlock<acc_t> blk = begin_adjoint_block<acc_t>(smem_raw, C, tj, g.sdy, g.sdx, g.h, g.w, g.H, g.W);
  const int64_t b = blk.b, nx = blk.nx, tid = threadIdx.x;
  const scalar_t* dplane = disc + b * C * g.h * g.w;
  const scalar_t* splane = seg + b * g.K * g.hs * g.ws;
  const acc_t gscalar = grad_is_map ? static_cast<acc_t>(0) : grad[0] / grad_div;

  for (int64_t cx0 = blk.xa; cx0 < blk.xb; cx0 += nx) {
    const int64_t x = cx0 + tid;
    clear_chunk_column(blk);
    if (x < blk.xb) {
      const LinearIndex<acc_t> ix = source_index<acc_t>(g.sdx, x, g.w), six = source_index<acc_t>(g.ssx, x, g.ws);
      for (int64_t y = blk.ya; y < blk.yb; ++y) {
        const LinearIndex<acc_t> iy = source_index<acc_t>(g.sdy, y, g.h);
        const LinearIndex<acc_t> siy = source_index<acc_t>(g.ssy, y, g.hs);
        const int64_t pix = (b * g.H + y) * g.W + x;
        acc_t gw = grad_is_map ? grad[pix] : gscalar;
        if (weight != nullptr) gw *= weight[pix];
        acc_t ms, inv_ss, asum, m, s;
        seg_stats(splane, g, siy, six, ms, inv_ss, asum);
        disc_stats(dplane, g, iy, ix, m, s);
        const acc_t inv_s = static_cast<acc_t>(1) / s;
        const acc_t wy1 = iy.lambda, wy0 = static_cast<acc_t>(1) - iy.lambda;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t p = exp_acc(bilinear_sample(dplane + c * g.h * g.w, g.w, iy, ix) - m) * inv_s;
          acc_t yc = 0;
          if (c >= g.off && c < g.off + g.K) {
            const acc_t v = bilinear_sample(splane + (c - g.off) * g.hs * g.ws, g.ws, siy, six) * g.inv_t;
            yc = soft_label(exp_acc(v - ms), inv_ss, g.cap);
          }
          const acc_t gc = gw * fada_grad_term(asum, p, yc);
          blk.top[c * nx + tid] += wy0 * gc;
          blk.bot[c * nx + tid] += wy1 * gc;
        }
      }
    }
    finish_chunk(blk, cx0, g.sdx, g.w);
  }
  write_partial_slots(blk, g.h, g.w, part);
}

// ------------------------------------------------------------------ fast path
// Disc and seg logits at the same h x w (the FADA case) and cap >= 0.5: the
// staged tiling of staged_rows.cuh, all 3K channels of a block's two source
// rows interpolated horizontally once, up to 8 output rows per pass. Values
// are kept in base-2 units (disc * log2(e), seg * log2(e) / T), so every exp
// is one exp2 and the logsumexp one log2. The gradient of a pass is summed
// per (channel, column) in registers over its rows and written to shared
// memory once; the horizontal adjoint and the slots are staged_rows.cuh's.
// kLoss / kGrad: which of the loss and dL/d(disc) the launch computes (both:
// the fused forward + backward).
//
// Softmax shifts: a row's value fma(ly, bottom - top, top) lies between the
// column's top and bottom values, so B = max over channels of both is an
// upper bound of every row's maximum (a "column bound", one per column for
// all its rows, disc and seg separately). A pass first shifts by B instead of
// by each row's maximum, which saves the maximum pass and a subtraction per
// exp2. That is exact arithmetic as long as the row's sum of exp2(value - B)
// stays far from underflow: a row whose sum is below bound_sum_min() = 2^-32
// (its maximum ~32 bits or more below B: adjacent source rows' logits more
// than ~22 apart) makes the thread redo the pass with exact row maxima
// (kExact, staged_pass_exact), as the kernel always did before. Otherwise a
// term that exp2 flushes to 0 is below 2^-126 / 2^-32 of its row's sum, far
// under float precision, and the shift adds at most ~38 x 2^-24 of absolute
// error to a value (the maximum is within 32 + log2(2K) bits of B), about
// what logits of that size carry anyway.
//
// Soft labels: with cap >= 0.5 only the argmax can exceed the cap, so
// sum_c a_c = 1 - max(0, p_max - cap), p_max = max_c e_c / sum_c e_c: no
// extra pass. The gradient is dL/dz_c = gw * ((sum a) softmax_c - y_c).

// Below this a row's sum of exp2(value - column bound) is redone with exact
// maxima (see above). Also keeps every reciprocal and log2 argument normal.
template <typename acc_t>
constexpr acc_t bound_sum_min() {
  return static_cast<acc_t>(2.3283064365386962890625e-10);  // 2^-32
}

template <typename acc_t>
struct StagedGeometry {
  int64_t K, h, w, H, W, off, tj, tiles;
  int nx;
  AxisMap<acc_t> sy, sx;  // source positions (both inputs share h x w)
  acc_t disc_scale;       // log2(e)
  acc_t seg_scale;        // log2(e) / T
  acc_t cap;
};

// What a staged launch reads and writes besides the logits: the weight map
// (or nullptr), the upstream gradient (grad_is_map: the (B, H, W) map, else
// the scalar gscalar), the loss map (reduction none) or nullptr.
template <typename scalar_t, typename acc_t>
struct StagedIO {
  const acc_t* weight;
  const acc_t* grad;
  bool grad_is_map;
  acc_t gscalar;
  acc_t* out_map;  // the loss in acc_t (float32 for half inputs)
};

// One thread's output column during its passes: its interpolated channels in
// shared memory (td: the 2K disc, then the K seg; dom / oth: the domain's K
// disc channels and the other K), its gradient sums (gdom, goth), the column
// bounds (bd: disc, bs: seg) and its output pixel (b, 0, x).
template <typename acc_t>
struct StagedColumn {
  const TwoOf<acc_t>* tdisc;
  const TwoOf<acc_t>* tseg;
  const TwoOf<acc_t>* tdom;
  const TwoOf<acc_t>* toth;
  TwoOf<acc_t>* gdom;
  TwoOf<acc_t>* goth;
  acc_t bd, bs;
  int64_t row0;
};

// One pass over the output rows [y0, y0 + R) of a column: adds their loss to
// `local` or writes it to the map (kLoss) and their gradient sums to the
// column's slots (kGrad; `first`: the group's first pass writes them). R rows
// of state stay in registers and each channel's shared-memory reads and
// gradient slot update serve all R. Without kExact, returns false and changes
// nothing when a row's sum is too small for the column bounds (see above); the
// caller then runs staged_pass_exact.
template <int R, bool kExact, bool kLoss, bool kGrad, typename scalar_t, typename acc_t>
__device__ __forceinline__ bool staged_pass(const StagedGeometry<acc_t>& g, const StagedIO<scalar_t, acc_t>& io,
                                            const StagedColumn<acc_t>& col, int y0, bool first, acc_t& local) {
  const int nx = g.nx, k = static_cast<int>(g.K);
  const acc_t zero = 0, one = 1;
  acc_t ly[R], dm[R], dms[R];  // dm, dms: exact row maxima minus the bounds (0 without kExact)
#pragma unroll
  for (int q = 0; q < R; ++q) {
    ly[q] = source_index<acc_t>(g.sy, y0 + q, g.h).lambda;
    dm[q] = dms[q] = kExact ? -std::numeric_limits<acc_t>::infinity() : zero;
  }
  if (kExact) {  // NaN may be dropped here; the sums below pick it up
    const TwoOf<acc_t>* v = col.tdisc;
    for (int c = 0; c < 2 * k; ++c, v += nx) {
      const acc_t x = v->x - col.bd;
#pragma unroll
      for (int q = 0; q < R; ++q) dm[q] = max_acc(dm[q], ly[q] * v->y + x);
    }
    v = col.tseg;
    for (int c = 0; c < k; ++c, v += nx) {
      const acc_t x = v->x - col.bs;
#pragma unroll
      for (int q = 0; q < R; ++q) dms[q] = max_acc(dms[q], ly[q] * v->y + x);
    }
  }
  // sums of exp2 (s: disc, ss: seg) and the largest seg term
  acc_t s[R], ss[R], emax[R];
#pragma unroll
  for (int q = 0; q < R; ++q) s[q] = ss[q] = emax[q] = zero;
  const TwoOf<acc_t>* sv = col.tseg;
  for (int c = 0; c < k; ++c, sv += nx) {
    const TwoOf<acc_t> v = *sv;
    const acc_t x = v.x - col.bs;
#pragma unroll
    for (int q = 0; q < R; ++q) {
      const acc_t e = exp2_acc(ly[q] * v.y + x - dms[q]);
      ss[q] += e;
      emax[q] = max_acc(emax[q], e);
    }
  }
  const TwoOf<acc_t>* dv = col.tdisc;
  for (int c = 0; c < 2 * k; ++c, dv += nx) {
    const TwoOf<acc_t> v = *dv;
    const acc_t x = v.x - col.bd;
#pragma unroll
    for (int q = 0; q < R; ++q) s[q] += exp2_acc(ly[q] * v.y + x - dm[q]);
  }
  if (!kExact) {  // NaN compares false and goes on as NaN
    bool small = false;
#pragma unroll
    for (int q = 0; q < R; ++q) small |= min_acc(s[q], ss[q]) < bound_sum_min<acc_t>();
    if (small) return false;
  }
  // per row: the pixel weight wt, 1 / seg sum (in ss), A = sum_c a_c (in
  // emax), log2 of the disc sum (in s), the gradient weight gw, alpha = gw * A
  // / disc sum and beta = ly * alpha
  // (the fused launch, kLoss and kGrad, serves reductions mean and sum only:
  // a scalar upstream gradient and no loss map)
  constexpr bool kFused = kLoss && kGrad;
  const int64_t pix0 = col.row0 + static_cast<int64_t>(y0) * g.W;
  acc_t wt[R], gw[R], alpha[R], beta[R], loss[R];
#pragma unroll
  for (int q = 0; q < R; ++q) {
    const int64_t pix = pix0 + q * g.W;
    wt[q] = io.weight != nullptr ? io.weight[pix] : one;
    gw[q] = zero;
    if (kGrad) gw[q] = (!kFused && io.grad_is_map ? io.grad[pix] : io.gscalar) * wt[q];
    ss[q] = recip_acc(ss[q]);
    emax[q] = one - max_acc(emax[q] * ss[q] - g.cap, zero);
    alpha[q] = gw[q] * emax[q] * recip_acc(s[q]);
    beta[q] = ly[q] * alpha[q];
    s[q] = log2_acc(s[q]);
    loss[q] = ss[q] - ss[q];  // 0, or NaN when the soft labels are (min_acc drops it)
  }
  // the domain's K channels: soft labels, loss, gradient
  sv = col.tseg;
  dv = col.tdom;
  TwoOf<acc_t>* slot = col.gdom;
  for (int c = 0; c < k; ++c, sv += nx, dv += nx, slot += nx) {
    const TwoOf<acc_t> vs = *sv, vd = *dv;
    const acc_t xs = vs.x - col.bs, xd = vd.x - col.bd;
    acc_t sum = 0, bottom = 0;
#pragma unroll
    for (int q = 0; q < R; ++q) {
      const acc_t a = min_acc(exp2_acc(ly[q] * vs.y + xs - dms[q]) * ss[q], g.cap);
      const acc_t z = ly[q] * vd.y + xd - dm[q];
      if (kLoss) loss[q] -= a * z;  // the row's loss is A * log2(s) + this
      if (kGrad) {
        const acc_t gc = alpha[q] * exp2_acc(z) - gw[q] * a;
        sum += gc;
        bottom += ly[q] * gc;
      }
    }
    if (kGrad) accumulate_rows(*slot, sum, bottom, first);
  }
  // the other K channels: gradient only (their soft label is 0)
  if (kGrad) {
    dv = col.toth;
    slot = col.goth;
    for (int c = 0; c < k; ++c, dv += nx, slot += nx) {
      const TwoOf<acc_t> v = *dv;
      const acc_t x = v.x - col.bd;
      acc_t sum = 0, bottom = 0;
#pragma unroll
      for (int q = 0; q < R; ++q) {
        const acc_t p = exp2_acc(ly[q] * v.y + x - dm[q]);
        sum += alpha[q] * p;
        bottom += beta[q] * p;
      }
      accumulate_rows(*slot, sum, bottom, first);
    }
  }
  if (kLoss) {
    const acc_t ln2 = static_cast<acc_t>(0.693147180559945309417232121458176568);
    for (int q = 0; q < R; ++q) {
      const acc_t l = (emax[q] * s[q] + loss[q]) * (ln2 * wt[q]);
      if (!kFused && io.out_map != nullptr) {
        io.out_map[pix0 + q * g.W] = l;
      } else {
        local += l;
      }
    }
  }
  return true;
}

// staged_pass with exact row maxima, for the passes whose sums are too small
// for the column bounds; returns the loss to add to `local`. A function of its
// own, so the fast path's code stays small (sass_report.py counts it apart; it
// runs at none of its shapes). Arguments by value: a reference would move the
// caller's copies to local memory.
template <int R, bool kLoss, bool kGrad, typename scalar_t, typename acc_t>
FADA_NOINLINE __device__ acc_t staged_pass_exact(const StagedGeometry<acc_t> g, const StagedIO<scalar_t, acc_t> io,
                                                 const StagedColumn<acc_t> col, int y0, bool first) {
  acc_t local = 0;
  staged_pass<R, true, kLoss, kGrad>(g, io, col, y0, first, local);
  return local;
}

// The pass of R rows at y0, exact if the column bounds do not do.
template <int R, bool kLoss, bool kGrad, typename scalar_t, typename acc_t>
__device__ __forceinline__ void pass_rows(const StagedGeometry<acc_t>& g, const StagedIO<scalar_t, acc_t>& io,
                                          const StagedColumn<acc_t>& col, int y0, bool first, acc_t& local) {
  if (!staged_pass<R, false, kLoss, kGrad>(g, io, col, y0, first, local)) {
    local += staged_pass_exact<R, kLoss, kGrad>(g, io, col, y0, first);
  }
}

// Shared memory of a staged block: kernel_limits.h's layout for 3K staged
// channels (2K disc, K seg) and the gradient of the 2K disc channels.
using limits::StagedLayout;

template <typename acc_t>
__host__ __device__ __forceinline__ StagedLayout staged_layout(int64_t K, int nx, int64_t tj) {
  return limits::staged_layout(limits::fada_staged_footprint(), K, nx, tj, sizeof(acc_t));
}

// Horizontal interpolation of `channels` staged channels at one output column
// into td (stride nx); returns their column bound (max of top and bottom).
template <typename acc_t>
__device__ __forceinline__ acc_t interpolate_column(const acc_t* raw, int channels, int64_t ns_max, int i0, acc_t lx,
                                                    int nx, TwoOf<acc_t>* td) {
  acc_t bound = -std::numeric_limits<acc_t>::infinity();
  const int stride = 2 * static_cast<int>(ns_max);
  for (int c = 0; c < channels; ++c, raw += stride, td += nx) {
    const TwoOf<acc_t> v = staged_column(raw, ns_max, i0, lx);
    *td = v;
    bound = max_acc(bound, max_acc(v.x, v.x + v.y));
  }
  return bound;
}

// grad: the (B, H, W) map when grad_is_map, else a scalar (nullptr: 1) divided
// by grad_div. The main slots cover part_main, the spills part_spill (kGrad).
template <typename scalar_t, typename acc_t, bool kLoss, bool kGrad>
__global__ void __launch_bounds__(kStagedMaxThreads)
    fada_staged_kernel(const scalar_t* __restrict__ disc, const scalar_t* __restrict__ seg,
                       const acc_t* __restrict__ weight, const acc_t* __restrict__ grad, bool grad_is_map,
                       acc_t grad_div, StagedGeometry<acc_t> g, acc_t* __restrict__ out_map,
                       acc_t* __restrict__ partials, acc_t* __restrict__ part_main, acc_t* __restrict__ part_spill) {
  FADA_DYNAMIC_SHARED(unsigned char, smem);
  const StagedLayout lay = staged_layout<acc_t>(g.K, g.nx, g.tj);
  TwoOf<acc_t>* td = reinterpret_cast<TwoOf<acc_t>*>(smem + lay.td);
  TwoOf<acc_t>* gacc = reinterpret_cast<TwoOf<acc_t>*>(smem + lay.gacc);
  acc_t* raw = reinterpret_cast<acc_t*>(smem + lay.raw);
  acc_t* hacc = reinterpret_cast<acc_t*>(smem + lay.hacc);
  acc_t* colw = reinterpret_cast<acc_t*>(smem + lay.colw);
  int* colstart = reinterpret_cast<int*>(smem + lay.colstart);
  int* rows = reinterpret_cast<int*>(smem + lay.rows);

  const int64_t K = g.K, C = 2 * K, ns_max = g.tj + 1;
  const int nx = g.nx, tid = threadIdx.x;
  const StagedTile t = staged_tile(g.tj, g.h, g.w);
  const int64_t plane = g.h * g.w;
  stage_rows(disc + t.b * C * plane, C, t, g.h, g.w, g.disc_scale, ns_max, raw);
  stage_rows(seg + t.b * K * plane, K, t, g.h, g.w, g.seg_scale, ns_max, raw + C * 2 * ns_max);
  staged_ranges(t, g.sy, g.sx, g.h, g.w, g.H, g.W, colstart, rows);
  __syncthreads();

  const int ya = rows[0], yb = rows[1], xa = colstart[0], xb = colstart[t.nj];
  StagedIO<scalar_t, acc_t> io;
  io.weight = weight;
  io.grad = grad;
  io.grad_is_map = grad_is_map;
  io.gscalar = 0;
  if (kGrad && !grad_is_map) io.gscalar = (grad != nullptr ? grad[0] : static_cast<acc_t>(1)) / grad_div;
  io.out_map = out_map;
  const int k = static_cast<int>(K), c2 = static_cast<int>(C);
  acc_t local = 0;  // this thread's loss sum (reductions)

  for (int cx0 = xa; cx0 < xb && ya < yb; cx0 += nx) {
    const int x = cx0 + tid;
    if (x < xb) {
      const LinearIndex<acc_t> ix = source_index<acc_t>(g.sx, x, g.w);
      const int i0 = static_cast<int>(ix.i0 - t.j0);
      if (kGrad) colw[tid] = ix.lambda;
      StagedColumn<acc_t> col;
      col.bd = interpolate_column(raw, c2, ns_max, i0, ix.lambda, nx, td + tid);
      col.bs = interpolate_column(raw + C * 2 * ns_max, k, ns_max, i0, ix.lambda, nx, td + c2 * nx + tid);
      col.tdisc = td + tid;
      col.tseg = td + c2 * nx + tid;
      col.tdom = td + static_cast<int>(g.off) * nx + tid;  // the domain's disc channels
      col.toth = td + (g.off == 0 ? k : 0) * nx + tid;    // the other K
      col.gdom = gacc + static_cast<int>(g.off) * nx + tid;
      col.goth = gacc + (g.off == 0 ? k : 0) * nx + tid;
      col.row0 = (t.b * g.H) * g.W + x;
      // the group's rows in passes of 8, then 4, then 1 (8x upsampling: 8-9 rows)
      int y0 = ya;
      for (; y0 + 8 <= yb; y0 += 8) pass_rows<8, kLoss, kGrad>(g, io, col, y0, y0 == ya, local);
      for (; y0 + 4 <= yb; y0 += 4) pass_rows<4, kLoss, kGrad>(g, io, col, y0, y0 == ya, local);
      for (; y0 < yb; ++y0) pass_rows<1, kLoss, kGrad>(g, io, col, y0, y0 == ya, local);
    }
    if (kGrad) {
      __syncthreads();
      const int cx1 = cx0 + nx < xb ? cx0 + nx : xb;
      staged_adjoint(t, C, g.w, cx0, cx1, nx, colstart, gacc, colw, ns_max, hacc, cx0 == xa);
      __syncthreads();
    }
  }
  if (kGrad) staged_write_slots(t, C, g.h, g.w, g.tiles, hacc, ns_max, xa < xb && ya < yb, part_main, part_spill);
  if (kLoss && partials != nullptr) {
    __shared__ acc_t shared[kStagedMaxThreads];
    const acc_t block_total = block_sum(local, shared);
    if (tid == 0) partials[(static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = block_total;
  }
}

template <typename acc_t>
FadaGeometry<acc_t> geometry(const at::Tensor& disc, const at::Tensor& seg, const host::FadaLossArgs& a) {
  FadaGeometry<acc_t> g;
  g.K = seg.size(1);
  g.h = disc.size(2);
  g.w = disc.size(3);
  g.hs = seg.size(2);
  g.ws = seg.size(3);
  g.H = a.out_h;
  g.W = a.out_w;
  g.off = a.domain == 0 ? 0 : g.K;
  g.sdy = axis_map<acc_t>(g.h, a.out_h, a.align_corners);
  g.sdx = axis_map<acc_t>(g.w, a.out_w, a.align_corners);
  g.ssy = axis_map<acc_t>(g.hs, a.out_h, a.align_corners);
  g.ssx = axis_map<acc_t>(g.ws, a.out_w, a.align_corners);
  g.inv_t = static_cast<acc_t>(1) / static_cast<acc_t>(a.temperature);
  g.cap = static_cast<acc_t>(a.cap);
  return g;
}

// The staged fast path's configuration, or tiles == 0 when it does not apply:
// seg logits at the disc logits' size, cap >= 0.5 (closed-form soft-label
// sum), and staged_config's conditions.
template <typename acc_t>
StagedConfig staged_config_for(const at::Tensor& disc, const at::Tensor& seg, const host::FadaLossArgs& a) {
  if (a.cap < 0.5 || seg.size(2) != disc.size(2) || seg.size(3) != disc.size(3)) return StagedConfig();
  return staged_config<acc_t>(limits::fada_staged_footprint(), seg.size(1), disc, a.out_h, a.out_w,
                              axis_map<acc_t>(disc.size(3), a.out_w, a.align_corners));
}

template <typename acc_t>
StagedGeometry<acc_t> staged_geometry(const FadaGeometry<acc_t>& f, const StagedConfig& cfg) {
  StagedGeometry<acc_t> g;
  g.K = f.K;
  g.h = f.h;
  g.w = f.w;
  g.H = f.H;
  g.W = f.W;
  g.off = f.off;
  g.tj = cfg.tj;
  g.tiles = cfg.tiles;
  g.nx = cfg.nx;
  g.sy = f.sdy;
  g.sx = f.sdx;
  const acc_t log2e = static_cast<acc_t>(1.44269504088896340735992468100189214);
  g.disc_scale = log2e;
  g.seg_scale = log2e * f.inv_t;
  g.cap = f.cap;
  return g;
}

// What one staged launch reads and writes; unused outputs are nullptr / undefined.
template <typename acc_t>
struct StagedRun {
  const acc_t* weight = nullptr;
  const acc_t* grad = nullptr;
  bool grad_is_map = false;
  acc_t grad_div = 1;
  at::Tensor out_map, partials, part_main, part_spill;
};

template <typename scalar_t, typename acc_t, bool kLoss, bool kGrad>
void launch_staged(const at::Tensor& disc, const at::Tensor& seg, const StagedGeometry<acc_t>& g,
                   const StagedConfig& cfg, const StagedRun<acc_t>& run, cudaStream_t stream) {
  const dim3 grid = staged_launch_grid(fada_staged_kernel<scalar_t, acc_t, kLoss, kGrad>, cfg, g.h, disc.size(0));
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.template data_ptr<acc_t>() : nullptr; };
  FADA_LAUNCH(grid, cfg.nx, cfg.smem, stream, fada_staged_kernel<scalar_t, acc_t, kLoss, kGrad>)(
      disc.data_ptr<scalar_t>(), seg.data_ptr<scalar_t>(), run.weight, run.grad, run.grad_is_map, run.grad_div, g,
      run.out_map.defined() ? run.out_map.template data_ptr<acc_t>() : nullptr, ptr(run.partials), ptr(run.part_main),
      ptr(run.part_spill));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void staged_slots(const at::Tensor& disc, const StagedConfig& cfg, StagedRun<acc_t>& run) {
  staged_slot_tensors<acc_t>(disc, cfg, run.part_main, run.part_spill);
}

template <typename scalar_t, typename acc_t>
void gather_staged(const StagedRun<acc_t>& run, const StagedConfig& cfg, const at::Tensor& grad_disc,
                   cudaStream_t stream) {
  launch_staged_gather<scalar_t, acc_t>(run.part_main, run.part_spill, cfg, nullptr, grad_disc, stream);
}

// out[0] = sum of the partials / divisor, in a fixed order.
template <typename scalar_t, typename acc_t>
void reduce_loss(const at::Tensor& partials, acc_t divisor, const at::Tensor& out, cudaStream_t stream) {
  FADA_LAUNCH(1, kFinalThreads, 0, stream, reduce_partials_kernel<acc_t, acc_t, acc_t>)(
      partials.data_ptr<acc_t>(), partials.numel(), nullptr, divisor, out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The loss into `out` ((B, H, W) for reduction none, else a scalar).
template <typename scalar_t, typename acc_t>
void forward_into(const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt, const FadaGeometry<acc_t>& g,
                  const StagedConfig& cfg, int64_t reduction, const at::Tensor& out, cudaStream_t stream) {
  const int64_t B = disc.size(0), total = B * g.H * g.W;
  const acc_t* wptr = wt.defined() ? wt.data_ptr<acc_t>() : nullptr;
  const acc_t divisor = reduction == 1 ? static_cast<acc_t>(total) : static_cast<acc_t>(1);
  const auto acc_opts = disc.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  if (cfg.tiles > 0) {
    StagedRun<acc_t> run;
    run.weight = wptr;
    if (reduction == 0) run.out_map = out;
    else run.partials = at::empty({cfg.tiles * g.h * B}, acc_opts);
    launch_staged<scalar_t, acc_t, true, false>(disc, seg, staged_geometry(g, cfg), cfg, run, stream);
    if (reduction != 0) reduce_loss<scalar_t, acc_t>(run.partials, divisor, out, stream);
    return;
  }
  const int64_t blocks = pixel_blocks(total);
  if (reduction == 0) {
    FADA_LAUNCH(blocks, kReduceThreads, 0, stream, fada_forward_kernel<scalar_t, acc_t>)(
        disc.data_ptr<scalar_t>(), seg.data_ptr<scalar_t>(), wptr, g, B, out.data_ptr<acc_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    at::Tensor partials = at::empty({blocks}, acc_opts);
    FADA_LAUNCH(blocks, kReduceThreads, 0, stream, fada_forward_kernel<scalar_t, acc_t>)(
        disc.data_ptr<scalar_t>(), seg.data_ptr<scalar_t>(), wptr, g, B, nullptr, partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_loss<scalar_t, acc_t>(partials, divisor, out, stream);
  }
}

// dL/d(disc) into grad_disc (contiguous); g_acc: the (B, H, W) map for
// reduction none, else the scalar upstream gradient.
template <typename scalar_t, typename acc_t>
void backward_into(const at::Tensor& g_acc, const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt,
                   const FadaGeometry<acc_t>& g, const StagedConfig& cfg, int64_t reduction,
                   const at::Tensor& grad_disc, cudaStream_t stream) {
  const acc_t grad_div = reduction == 1 ? static_cast<acc_t>(disc.size(0) * g.H * g.W) : static_cast<acc_t>(1);
  const acc_t* wptr = wt.defined() ? wt.data_ptr<acc_t>() : nullptr;
  if (cfg.tiles > 0) {
    StagedRun<acc_t> run;
    run.weight = wptr;
    run.grad = g_acc.data_ptr<acc_t>();
    run.grad_is_map = reduction == 0;
    run.grad_div = grad_div;
    staged_slots(disc, cfg, run);
    launch_staged<scalar_t, acc_t, false, true>(disc, seg, staged_geometry(g, cfg), cfg, run, stream);
    gather_staged<scalar_t, acc_t>(run, cfg, grad_disc, stream);
    return;
  }
  const auto launch = [&](const dim3& grid, const AdjointConfig& acfg, acc_t* part) {
    FADA_LAUNCH(grid, acfg.nx, acfg.smem, stream, fada_backward_kernel<scalar_t, acc_t>)(
        disc.data_ptr<scalar_t>(), seg.data_ptr<scalar_t>(), wptr, g_acc.data_ptr<acc_t>(), reduction == 0, grad_div,
        g, acfg.tj, part);
  };
  adjoint_backward<scalar_t>(fada_backward_kernel<scalar_t, acc_t>, g.sdx, g.W, grad_disc, stream, launch);
}

// The loss into `out` and dL/d(disc) for an upstream gradient of 1 into
// grad_disc (reduction mean or sum). On the fast path one launch computes
// both (then the fixed-order loss sum and the gradient gather); else the
// forward and backward kernels run one after the other.
template <typename scalar_t, typename acc_t>
void with_grad_into(const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt, const FadaGeometry<acc_t>& g,
                    const StagedConfig& cfg, int64_t reduction, const at::Tensor& out, const at::Tensor& grad_disc,
                    cudaStream_t stream) {
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  if (cfg.tiles == 0) {
    forward_into<scalar_t, acc_t>(disc, seg, wt, g, cfg, reduction, out, stream);
    backward_into<scalar_t, acc_t>(at::ones({}, disc.options().dtype(acc_type)), disc, seg, wt, g, cfg, reduction,
                                   grad_disc, stream);
    return;
  }
  const int64_t B = disc.size(0), total = B * g.H * g.W;
  StagedRun<acc_t> run;
  run.weight = wt.defined() ? wt.data_ptr<acc_t>() : nullptr;
  run.grad_div = reduction == 1 ? static_cast<acc_t>(total) : static_cast<acc_t>(1);
  run.partials = at::empty({cfg.tiles * g.h * B}, disc.options().dtype(acc_type));
  staged_slots(disc, cfg, run);
  launch_staged<scalar_t, acc_t, true, true>(disc, seg, staged_geometry(g, cfg), cfg, run, stream);
  reduce_loss<scalar_t, acc_t>(run.partials, run.grad_div, out, stream);
  gather_staged<scalar_t, acc_t>(run, cfg, grad_disc, stream);
}

// What the three launches below share: dispatch_launch's set-up, then
// body(tag, g, cfg, stream) with the geometry and the staged configuration
// in the accumulation type of the dispatched element type.
template <typename Body>
void dispatch_fada(const at::Tensor& disc, const at::Tensor& seg, const host::FadaLossArgs& a,
                   const char* dispatch_name, Body body) {
  dispatch_launch(disc, "fada_loss", dispatch_name, [&](auto tag, cudaStream_t stream) {
    using acc_t = at::opmath_type<typename decltype(tag)::type>;
    body(tag, geometry<acc_t>(disc, seg, a), staged_config_for<acc_t>(disc, seg, a), stream);
  });
}

// The CUDA launches; everything around them is common/fada_loss_host.h.
at::Tensor fada_loss_cuda(const at::Tensor& disc_logits, const at::Tensor& seg_logits, int64_t domain,
                          double temperature, double cap, int64_t out_h, int64_t out_w,
                          const c10::optional<at::Tensor>& weight, int64_t reduction,
                          bool align_corners) {
  const host::FadaLossArgs a{domain, temperature, cap, out_h, out_w, reduction, align_corners};
  return host::fada_loss_forward(
      disc_logits, seg_logits, weight, a, "CUDA kernel", on_kernel_device(disc_logits),
      [&](const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt, at::Tensor& out) {
        dispatch_fada(disc, seg, a, "fada_loss_cuda", [&](auto tag, const auto& g, const StagedConfig& cfg,
                                                          cudaStream_t stream) {
          forward_into<typename decltype(tag)::type>(disc, seg, wt, g, cfg, reduction, out, stream);
        });
      });
}

at::Tensor fada_loss_backward_cuda(const at::Tensor& grad_in, const at::Tensor& disc_logits,
                                   const at::Tensor& seg_logits, int64_t domain, double temperature, double cap,
                                   int64_t out_h, int64_t out_w, const c10::optional<at::Tensor>& weight,
                                   int64_t reduction, bool align_corners) {
  const host::FadaLossArgs a{domain, temperature, cap, out_h, out_w, reduction, align_corners};
  return host::fada_loss_backward(
      grad_in, disc_logits, seg_logits, weight, a, "CUDA kernel", on_kernel_device(disc_logits),
      [&](const at::Tensor& grad, const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt,
          at::Tensor& grad_disc) {
        dispatch_fada(disc, seg, a, "fada_loss_backward_cuda", [&](auto tag, const auto& g, const StagedConfig& cfg,
                                                                   cudaStream_t stream) {
          backward_into<typename decltype(tag)::type>(grad, disc, seg, wt, g, cfg, reduction, grad_disc, stream);
        });
      });
}

// The loss and G = dL/d(disc) for an upstream gradient of 1 (reduction mean or
// sum; the autograd backward is grad_out * G): with_grad_into.
std::tuple<at::Tensor, at::Tensor> fada_loss_with_grad_cuda(const at::Tensor& disc_logits,
                                                            const at::Tensor& seg_logits, int64_t domain,
                                                            double temperature, double cap, int64_t out_h,
                                                            int64_t out_w, const c10::optional<at::Tensor>& weight,
                                                            int64_t reduction, bool align_corners) {
  const host::FadaLossArgs a{domain, temperature, cap, out_h, out_w, reduction, align_corners};
  return host::fada_loss_with_grad(
      disc_logits, seg_logits, weight, a, "CUDA kernel", on_kernel_device(disc_logits),
      [&](const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt, at::Tensor& out,
          at::Tensor& grad_disc) {
        dispatch_fada(disc, seg, a, "fada_loss_with_grad_cuda", [&](auto tag, const auto& g, const StagedConfig& cfg,
                                                                    cudaStream_t stream) {
          with_grad_into<typename decltype(tag)::type>(disc, seg, wt, g, cfg, reduction, out, grad_disc, stream);
        });
      });
}

}  // namespace
}  // namespace cuda
}  // namespace fada

#ifndef FADA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fada_core, CUDA, m) {
  m.impl("fada_loss", &fada::cuda::fada_loss_cuda);
  m.impl("fada_loss_backward", &fada::cuda::fada_loss_backward_cuda);
  m.impl("fada_loss_with_grad", &fada::cuda::fada_loss_with_grad_cuda);
}
#endif
