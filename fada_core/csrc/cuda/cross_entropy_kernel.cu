// Upsampled cross-entropy on CUDA: CrossEntropyLoss(upsample(logits) / T,
// labels, ignore_index) and its gradient w.r.t. the low-resolution logits,
// with the per-pixel math of fada_math.h: a staged fast path (staged_rows.cuh,
// see "fast path" below) and, where its shared memory does not fit, the
// general kernels with the deterministic backward of upsample_common.cuh.
// "mean" divides by the number of non-ignored pixels, counted on the device
// (integers: exact in any order), so no host synchronisation is needed. Labels outside [0, K) are recorded for the
// host (label_errors.cuh) and make the loss and gradient NaN.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../common/cross_entropy_host.h"
#include "../common/fada_math.h"
#include "../common/kernel_limits.h"
#include "label_errors.cuh"
#include "staged_rows.cuh"
#include "upsample_common.cuh"

namespace fada {
namespace cuda {
namespace {

template <typename acc_t>
struct CeGeometry {
  int64_t K, h, w, H, W, ignore_index;
  AxisMap<acc_t> sy, sx;  // source positions: rows, columns
  acc_t inv_t;
  LabelErrorRecord* label_error;  // mapped host memory (label_errors.cuh)
};

constexpr int64_t kIgnored = -1;
constexpr int64_t kBadLabel = -2;

// The pixel's label, kIgnored, or kBadLabel for one outside [0, K) (recorded
// for the host; the caller makes its loss and gradient NaN).
template <typename acc_t>
__device__ __forceinline__ int64_t read_label(const int64_t* labels, int64_t idx, const CeGeometry<acc_t>& g) {
  const int64_t l = labels[idx];
  if (l == g.ignore_index) return kIgnored;
  if (l < 0 || l >= g.K) {
    record_bad_label(g.label_error, l, g.K, g.ignore_index);
    return kBadLabel;
  }
  return l;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void logit_stats(const scalar_t* plane0, const CeGeometry<acc_t>& g,
                                            const LinearIndex<acc_t>& iy, const LinearIndex<acc_t>& ix, acc_t& m,
                                            acc_t& s) {
  m = -std::numeric_limits<acc_t>::infinity();
  s = 0;
  for (int64_t c = 0; c < g.K; ++c)
    online_logsumexp(m, s, bilinear_sample(plane0 + c * g.h * g.w, g.w, iy, ix) * g.inv_t);
}

__global__ void count_valid_kernel(const int64_t* __restrict__ labels, int64_t total, int64_t ignore_index,
                                   unsigned long long* __restrict__ count) {
  __shared__ unsigned long long shared[kReduceThreads];
  unsigned long long local = 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    local += labels[idx] != ignore_index ? 1ull : 0ull;
  const unsigned long long block_total = block_sum(local, shared);
  if (threadIdx.x == 0) atomicAdd(count, block_total);  // integer: exact in any order
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    ce_forward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels, CeGeometry<acc_t> g,
                      int64_t B, acc_t* __restrict__ out_map, acc_t* __restrict__ partials) {
  __shared__ acc_t shared[kReduceThreads];
  const int64_t total = B * g.H * g.W;
  acc_t local = 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t x = idx % g.W;
    const int64_t y = (idx / g.W) % g.H;
    const int64_t b = idx / (g.W * g.H);
    const int64_t label = read_label(labels, idx, g);
    acc_t loss = label == kBadLabel ? std::numeric_limits<acc_t>::quiet_NaN() : static_cast<acc_t>(0);
    if (label >= 0) {
      const LinearIndex<acc_t> iy = source_index<acc_t>(g.sy, y, g.h), ix = source_index<acc_t>(g.sx, x, g.w);
      const scalar_t* plane0 = logits + b * g.K * g.h * g.w;
      acc_t m, s;
      logit_stats(plane0, g, iy, ix, m, s);
      const acc_t zl = bilinear_sample(plane0 + label * g.h * g.w, g.w, iy, ix) * g.inv_t;
      loss = ce_loss_term(m, log_acc(s), zl);
    }
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

// grad: the (B, H, W) map when grad_is_map, else a scalar; divided by *count
// when count != nullptr (mean).
template <typename scalar_t, typename acc_t>
__global__ void ce_backward_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                                   const acc_t* __restrict__ grad, bool grad_is_map,
                                   const unsigned long long* __restrict__ count, CeGeometry<acc_t> g, int64_t tj,
                                   acc_t* __restrict__ part) {
  FADA_DYNAMIC_SHARED(unsigned char, smem_raw);
  const int64_t C = g.K;
  const AdjointBlock<acc_t> blk = begin_adjoint_block<acc_t>(smem_raw, C, tj, g.sy, g.sx, g.h, g.w, g.H, g.W);
  const int64_t b = blk.b, nx = blk.nx, tid = threadIdx.x;
  const scalar_t* plane0 = logits + b * C * g.h * g.w;
  acc_t gscalar = grad_is_map ? static_cast<acc_t>(0) : grad[0];
  if (count != nullptr && *count > 0) gscalar /= static_cast<acc_t>(*count);

  for (int64_t cx0 = blk.xa; cx0 < blk.xb; cx0 += nx) {
    const int64_t x = cx0 + tid;
    clear_chunk_column(blk);
    if (x < blk.xb) {
      const LinearIndex<acc_t> ix = source_index<acc_t>(g.sx, x, g.w);
      for (int64_t y = blk.ya; y < blk.yb; ++y) {
        const int64_t pix = (b * g.H + y) * g.W + x;
        int64_t label = read_label(labels, pix, g);
        if (label == kIgnored) continue;
        const LinearIndex<acc_t> iy = source_index<acc_t>(g.sy, y, g.h);
        acc_t gw = (grad_is_map ? grad[pix] : gscalar) * g.inv_t;  // d(z / T) / dz = 1 / T
        if (label == kBadLabel) {  // NaN into every gradient the pixel reaches
          gw = std::numeric_limits<acc_t>::quiet_NaN();
          label = 0;
        }
        acc_t m, s;
        logit_stats(plane0, g, iy, ix, m, s);
        const acc_t inv_s = static_cast<acc_t>(1) / s;
        const acc_t wy1 = iy.lambda, wy0 = static_cast<acc_t>(1) - iy.lambda;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t z = bilinear_sample(plane0 + c * g.h * g.w, g.w, iy, ix) * g.inv_t;
          const acc_t gc = gw * ce_grad_term(exp_acc(z - m) * inv_s, c == label);
          blk.top[c * nx + tid] += wy0 * gc;
          blk.bot[c * nx + tid] += wy1 * gc;
        }
      }
    }
    finish_chunk(blk, cx0, g.sx, g.w);
  }
  write_partial_slots(blk, g.h, g.w, part);
}

// ------------------------------------------------------------------ fast path
// The staged tiling of staged_rows.cuh (as the FADA loss fast path): a block
// stages its two source rows of all K channels, pre-scaled by log2(e) / T, so
// every exp is one exp2 and the logsumexp one log2; each column interpolates
// horizontally once, each output row's value is one FMA. The gradient of a
// pass of kRows rows is summed per (channel, column) in registers, written to
// shared memory once, and the horizontal adjoint and slots are
// staged_rows.cuh's (fixed order, no float atomics). Each block also counts its
// non-ignored pixels (integer partials), so "mean" needs no other pass over
// the labels; its gradient is divided by that count in the gather. kLoss /
// kGrad: which of the loss and dL/d(logits) the launch computes (both: the
// fused forward + backward). Used whenever the block's shared memory fits
// (ce_staged_config); the kernels above are the fallback.

template <typename acc_t>
struct CeStagedGeometry {
  CeGeometry<acc_t> g;
  int64_t tj, tiles;
  int nx;
  acc_t scale;  // log2(e) / T
};

// grad: the (B, H, W) map when grad_is_map, else a scalar (nullptr: 1).
// partials / counts: per-block loss sums and non-ignored pixel counts
// (nullptr: not wanted). The main slots cover part_main, the spills part_spill (kGrad).
template <typename scalar_t, typename acc_t, bool kLoss, bool kGrad>
__global__ void __launch_bounds__(kStagedMaxThreads)
    ce_staged_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ labels,
                     const acc_t* __restrict__ grad, bool grad_is_map, CeStagedGeometry<acc_t> sg,
                     acc_t* __restrict__ out_map, acc_t* __restrict__ partials, int64_t* __restrict__ counts,
                     acc_t* __restrict__ part_main, acc_t* __restrict__ part_spill) {
  FADA_DYNAMIC_SHARED(unsigned char, smem);
  const CeGeometry<acc_t>& g = sg.g;
  const limits::StagedLayout lay = limits::staged_layout(limits::ce_staged_footprint(), g.K, sg.nx, sg.tj, sizeof(acc_t));
  TwoOf<acc_t>* td = reinterpret_cast<TwoOf<acc_t>*>(smem + lay.td);
  TwoOf<acc_t>* gacc = reinterpret_cast<TwoOf<acc_t>*>(smem + lay.gacc);
  acc_t* raw = reinterpret_cast<acc_t*>(smem + lay.raw);
  acc_t* hacc = reinterpret_cast<acc_t*>(smem + lay.hacc);
  acc_t* colw = reinterpret_cast<acc_t*>(smem + lay.colw);
  int* colstart = reinterpret_cast<int*>(smem + lay.colstart);
  int* rows = reinterpret_cast<int*>(smem + lay.rows);

  const int64_t ns_max = sg.tj + 1;
  const int nx = sg.nx, tid = threadIdx.x, k = static_cast<int>(g.K), ns = static_cast<int>(ns_max);
  const StagedTile t = staged_tile(sg.tj, g.h, g.w);
  stage_rows(logits + t.b * g.K * g.h * g.w, g.K, t, g.h, g.w, sg.scale, ns_max, raw);
  staged_ranges(t, g.sy, g.sx, g.h, g.w, g.H, g.W, colstart, rows);
  __syncthreads();

  const int ya = rows[0], yb = rows[1], xa = colstart[0], xb = colstart[t.nj];
  // the upstream gradient of a pixel times d(z / T) / dz = 1 / T (as ce_backward_kernel)
  acc_t gscalar = 0;
  if (kGrad && !grad_is_map) gscalar = (grad != nullptr ? grad[0] : static_cast<acc_t>(1)) * g.inv_t;
  const acc_t zero = 0, ln2 = static_cast<acc_t>(0.693147180559945309417232121458176568);
  acc_t local = 0;               // this thread's loss sum (reductions)
  unsigned long long valid = 0;  // and its non-ignored pixels

  for (int cx0 = xa; cx0 < xb && ya < yb; cx0 += nx) {
    const int x = cx0 + tid;
    if (x < xb) {
      const LinearIndex<acc_t> ix = source_index<acc_t>(g.sx, x, g.w);
      const int i0 = static_cast<int>(ix.i0 - t.j0);
      if (kGrad) colw[tid] = ix.lambda;
      for (int c = 0; c < k; ++c) td[c * nx + tid] = staged_column(raw + c * 2 * ns, ns_max, i0, ix.lambda);
      const TwoOf<acc_t>* tv = td + tid;
      TwoOf<acc_t>* ga = gacc + tid;
      const int64_t row0 = (t.b * g.H) * g.W + x;  // output pixel (b, y, x) = row0 + y * W

      for (int y0 = ya; y0 < yb; y0 += kRows) {
        const bool first = y0 == ya;
        acc_t ly[kRows], m[kRows], s[kRows];
        int label[kRows];  // a class, kIgnored (also past the group's rows) or kBadLabel
#pragma unroll
        for (int q = 0; q < kRows; ++q) {
          const bool inside = y0 + q < yb;
          ly[q] = inside ? source_index<acc_t>(g.sy, y0 + q, g.h).lambda : zero;
          label[q] = inside ? static_cast<int>(read_label(labels, row0 + static_cast<int64_t>(y0 + q) * g.W, g))
                            : static_cast<int>(kIgnored);
          valid += label[q] != kIgnored ? 1u : 0u;
          m[q] = -std::numeric_limits<acc_t>::infinity();
          s[q] = 0;
        }
        // maxima (NaN may be dropped here; the sums below pick it up)
        for (int c = 0; c < k; ++c) {
          const TwoOf<acc_t> v = tv[c * nx];
#pragma unroll
          for (int q = 0; q < kRows; ++q) m[q] = max_acc(m[q], ly[q] * v.y + v.x);
        }
        for (int c = 0; c < k; ++c) {
          const TwoOf<acc_t> v = tv[c * nx];
#pragma unroll
          for (int q = 0; q < kRows; ++q) s[q] += exp2_acc(ly[q] * v.y + v.x - m[q]);
        }
        // per row: the gradient weight gw (0 where ignored, NaN for a bad
        // label) and alpha = gw / sum, so that dL/dz_c = alpha 2^(z_c - m) - gw [c == label]
        acc_t gw[kRows], alpha[kRows];
#pragma unroll
        for (int q = 0; q < kRows; ++q) {
          gw[q] = 0;
          if (kGrad && label[q] != kIgnored) {
            gw[q] = grad_is_map ? grad[row0 + static_cast<int64_t>(y0 + q) * g.W] * g.inv_t : gscalar;
            if (label[q] == kBadLabel) gw[q] = std::numeric_limits<acc_t>::quiet_NaN();
          }
          alpha[q] = gw[q] * recip_acc(s[q]);
        }
        if (kLoss) {
#pragma unroll
          for (int q = 0; q < kRows; ++q) {
            if (y0 + q >= yb) continue;
            acc_t l = 0;
            if (label[q] == kBadLabel) {
              l = std::numeric_limits<acc_t>::quiet_NaN();
            } else if (label[q] >= 0) {
              const TwoOf<acc_t> v = tv[label[q] * nx];
              l = ce_loss_term(m[q], log2_acc(s[q]), ly[q] * v.y + v.x) * ln2;
            }
            const int64_t pix = row0 + static_cast<int64_t>(y0 + q) * g.W;
            if (out_map != nullptr) {
              out_map[pix] = l;
            } else {
              local += l;
            }
          }
        }
        if (kGrad) {
          for (int c = 0; c < k; ++c) {
            const TwoOf<acc_t> v = tv[c * nx];
            acc_t sum = 0, bottom = 0;
#pragma unroll
            for (int q = 0; q < kRows; ++q) {
              // the label's -gw per pixel (not after the row sums): p - 1 cancels exactly where p == 1
              acc_t gc = alpha[q] * exp2_acc(ly[q] * v.y + v.x - m[q]);
              if (c == label[q]) gc -= gw[q];
              sum += gc;
              bottom += ly[q] * gc;
            }
            accumulate_rows(ga[c * nx], sum, bottom, first);
          }
        }
      }
    }
    if (kGrad) {
      __syncthreads();
      const int cx1 = cx0 + nx < xb ? cx0 + nx : xb;
      staged_adjoint(t, g.K, g.w, cx0, cx1, nx, colstart, gacc, colw, ns_max, hacc, cx0 == xa);
      __syncthreads();
    }
  }
  if (kGrad) staged_write_slots(t, g.K, g.h, g.w, sg.tiles, hacc, ns_max, xa < xb && ya < yb, part_main, part_spill);
  const int64_t block = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  if (kLoss && partials != nullptr) {
    __shared__ acc_t loss_shared[kStagedMaxThreads];
    const acc_t block_total = block_sum(local, loss_shared);
    if (tid == 0) partials[block] = block_total;
  }
  if (counts != nullptr) {
    __shared__ unsigned long long count_shared[kStagedMaxThreads];
    const unsigned long long block_valid = block_sum(valid, count_shared);
    if (tid == 0) counts[block] = static_cast<int64_t>(block_valid);
  }
}

// One block of kFinalThreads: count[0] = the sum of n integer partials.
__global__ void sum_counts_kernel(const int64_t* __restrict__ partials, int64_t n, int64_t* __restrict__ count) {
  __shared__ unsigned long long shared[kFinalThreads];
  unsigned long long v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) v += static_cast<unsigned long long>(partials[i]);
  const unsigned long long total = block_sum(v, shared);
  if (threadIdx.x == 0) count[0] = static_cast<int64_t>(total);
}

template <typename acc_t>
CeGeometry<acc_t> geometry(const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore,
                           bool align_corners) {
  CeGeometry<acc_t> g;
  g.K = logits.size(1);
  g.h = logits.size(2);
  g.w = logits.size(3);
  g.H = labels.size(1);
  g.W = labels.size(2);
  g.ignore_index = ignore;
  g.sy = axis_map<acc_t>(g.h, g.H, align_corners);
  g.sx = axis_map<acc_t>(g.w, g.W, align_corners);
  g.inv_t = static_cast<acc_t>(1) / static_cast<acc_t>(temperature);
  g.label_error = label_error_record(kCrossEntropyLabels);
  return g;
}

at::Tensor count_valid(const at::Tensor& labels, int64_t ignore_index, cudaStream_t stream) {
  at::Tensor count = at::zeros({1}, labels.options().dtype(at::kLong));
  const int64_t total = labels.numel();
  FADA_LAUNCH(pixel_blocks(total), kReduceThreads, 0, stream, count_valid_kernel)(
      labels.data_ptr<int64_t>(), total, ignore_index, reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return count;
}


// The staged fast path's configuration, or tiles == 0 when it does not apply
// (staged_config's conditions).
template <typename acc_t>
StagedConfig ce_staged_config(const at::Tensor& logits, const CeGeometry<acc_t>& g) {
  return staged_config<acc_t>(limits::ce_staged_footprint(), logits.size(1), logits, g.H, g.W, g.sx);
}

template <typename acc_t>
CeStagedGeometry<acc_t> ce_staged_geometry(const CeGeometry<acc_t>& g, const StagedConfig& cfg) {
  CeStagedGeometry<acc_t> sg;
  sg.g = g;
  sg.tj = cfg.tj;
  sg.tiles = cfg.tiles;
  sg.nx = cfg.nx;
  sg.scale = static_cast<acc_t>(1.44269504088896340735992468100189214) * g.inv_t;
  return sg;
}

// What one staged launch reads and writes; unused outputs are undefined.
// reduction: 0 none (out_map / a gradient map), 1 mean, 2 sum.
template <typename acc_t>
struct CeStagedRun {
  const acc_t* grad = nullptr;
  bool grad_is_map = false;
  at::Tensor out_map, partials, counts, count, part_main, part_spill;
};

template <typename scalar_t, typename acc_t, bool kLoss, bool kGrad>
void launch_ce_staged(const at::Tensor& logits, const at::Tensor& labels, const CeStagedGeometry<acc_t>& sg,
                      const StagedConfig& cfg, const CeStagedRun<acc_t>& run, cudaStream_t stream) {
  const dim3 grid = staged_launch_grid(ce_staged_kernel<scalar_t, acc_t, kLoss, kGrad>, cfg, sg.g.h, logits.size(0));
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.template data_ptr<acc_t>() : nullptr; };
  FADA_LAUNCH(grid, cfg.nx, cfg.smem, stream, ce_staged_kernel<scalar_t, acc_t, kLoss, kGrad>)(
      logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), run.grad, run.grad_is_map, sg,
      run.out_map.defined() ? run.out_map.template data_ptr<acc_t>() : nullptr, ptr(run.partials),
      run.counts.defined() ? run.counts.template data_ptr<int64_t>() : nullptr, ptr(run.part_main),
      ptr(run.part_spill));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-block outputs of a staged launch: loss partials (loss reductions), the
// valid-pixel counts and their total (mean), the gradient slots (kGrad).
template <typename acc_t>
CeStagedRun<acc_t> ce_staged_run(const at::Tensor& logits, const StagedConfig& cfg, int64_t reduction, bool loss,
                                 bool grad) {
  CeStagedRun<acc_t> run;
  const int64_t blocks = cfg.tiles * logits.size(2) * logits.size(0);
  if (loss && reduction != 0) run.partials = at::empty({blocks}, logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (reduction == 1) {
    run.counts = at::empty({blocks}, logits.options().dtype(at::kLong));
    run.count = at::empty({1}, logits.options().dtype(at::kLong));
  }
  if (grad) staged_slot_tensors<acc_t>(logits, cfg, run.part_main, run.part_spill);
  return run;
}

// After a staged launch: the valid-pixel total (mean), then the loss
// (reductions) from the partials, in a fixed order.
template <typename scalar_t, typename acc_t>
void ce_staged_reduce(const CeStagedRun<acc_t>& run, const at::Tensor& out, cudaStream_t stream) {
  if (run.count.defined()) {
    FADA_LAUNCH(1, kFinalThreads, 0, stream, sum_counts_kernel)(run.counts.template data_ptr<int64_t>(), run.counts.numel(),
                                                                run.count.template data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (run.partials.defined()) {
    // "mean": over the non-ignored pixels (0 / 0 = NaN, like torch)
    FADA_LAUNCH(1, kFinalThreads, 0, stream, reduce_partials_kernel<acc_t, acc_t, int64_t>)(
        run.partials.template data_ptr<acc_t>(), run.partials.numel(),
        run.count.defined() ? run.count.template data_ptr<int64_t>() : nullptr, static_cast<acc_t>(1), out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// After a staged launch with kGrad: the gradient from the slots ("mean":
// divided by the valid-pixel total when it is > 0, as ce_backward_kernel).
template <typename scalar_t, typename acc_t>
void ce_staged_gather(const CeStagedRun<acc_t>& run, const StagedConfig& cfg, const at::Tensor& grad_logits,
                      cudaStream_t stream) {
  launch_staged_gather<scalar_t, acc_t>(run.part_main, run.part_spill, cfg,
                                        run.count.defined() ? run.count.template data_ptr<int64_t>() : nullptr, grad_logits,
                                        stream);
}

// The CUDA launches; everything around them is common/cross_entropy_host.h.
template <typename scalar_t, typename acc_t>
void ce_forward_into(const at::Tensor& logits, const at::Tensor& labels, const CeGeometry<acc_t>& g,
                     const StagedConfig& cfg, int64_t reduction, at::Tensor& out, cudaStream_t stream) {
  const int64_t B = labels.size(0);
  if (cfg.tiles > 0) {
    CeStagedRun<acc_t> run = ce_staged_run<acc_t>(logits, cfg, reduction, true, false);
    if (reduction == 0) run.out_map = out;
    launch_ce_staged<scalar_t, acc_t, true, false>(logits, labels, ce_staged_geometry(g, cfg), cfg, run, stream);
    ce_staged_reduce<scalar_t, acc_t>(run, out, stream);
    return;
  }
  const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t total = B * g.H * g.W;
  const int64_t blocks = pixel_blocks(total);
  if (reduction == 0) {
    FADA_LAUNCH(blocks, kReduceThreads, 0, stream, ce_forward_kernel<scalar_t, acc_t>)(
        logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), g, B, out.data_ptr<acc_t>(), nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor partials = at::empty({blocks}, logits.options().dtype(acc_type));
  FADA_LAUNCH(blocks, kReduceThreads, 0, stream, ce_forward_kernel<scalar_t, acc_t>)(
      logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), g, B, nullptr, partials.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // "mean": divided by the non-ignored pixels counted on the device (0 / 0 = NaN, like torch)
  const at::Tensor count = reduction == 1 ? count_valid(labels, g.ignore_index, stream) : at::Tensor();
  FADA_LAUNCH(1, kFinalThreads, 0, stream, reduce_partials_kernel<acc_t, acc_t, int64_t>)(
      partials.data_ptr<acc_t>(), blocks, count.defined() ? count.data_ptr<int64_t>() : nullptr,
      static_cast<acc_t>(1), out.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad: the (B, H, W) map for reduction none, else the scalar upstream
// gradient, in any floating type (read as acc_t).
template <typename scalar_t, typename acc_t>
void ce_backward_into(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                      const CeGeometry<acc_t>& g, const StagedConfig& cfg, int64_t reduction, at::Tensor& grad_logits,
                      cudaStream_t stream) {
  const at::Tensor g_acc = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  if (cfg.tiles > 0) {
    CeStagedRun<acc_t> run = ce_staged_run<acc_t>(logits, cfg, reduction, false, true);
    run.grad = g_acc.data_ptr<acc_t>();
    run.grad_is_map = reduction == 0;
    launch_ce_staged<scalar_t, acc_t, false, true>(logits, labels, ce_staged_geometry(g, cfg), cfg, run, stream);
    ce_staged_reduce<scalar_t, acc_t>(run, at::Tensor(), stream);
    ce_staged_gather<scalar_t, acc_t>(run, cfg, grad_logits, stream);
    return;
  }
  const at::Tensor count = reduction == 1 ? count_valid(labels, g.ignore_index, stream) : at::Tensor();
  const auto launch = [&](const dim3& grid, const AdjointConfig& acfg, acc_t* part) {
    FADA_LAUNCH(grid, acfg.nx, acfg.smem, stream, ce_backward_kernel<scalar_t, acc_t>)(
        logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), g_acc.data_ptr<acc_t>(), reduction == 0,
        count.defined() ? reinterpret_cast<const unsigned long long*>(count.data_ptr<int64_t>()) : nullptr, g,
        acfg.tj, part);
  };
  adjoint_backward<scalar_t>(ce_backward_kernel<scalar_t, acc_t>, g.sx, g.W, grad_logits, stream, launch);
}

// The loss into `out` and dL/d(logits) for an upstream gradient of 1 into
// grad_logits (reduction mean or sum). On the fast path one launch computes
// both (then the fixed-order sums and the gradient gather); else the forward
// and backward kernels run one after the other.
template <typename scalar_t, typename acc_t>
void ce_with_grad_into(const at::Tensor& logits, const at::Tensor& labels, const CeGeometry<acc_t>& g,
                       const StagedConfig& cfg, int64_t reduction, at::Tensor& out, at::Tensor& grad_logits,
                       cudaStream_t stream) {
  if (cfg.tiles == 0) {
    ce_forward_into<scalar_t, acc_t>(logits, labels, g, cfg, reduction, out, stream);
    const at::Tensor one = at::ones({}, logits.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    ce_backward_into<scalar_t, acc_t>(one, logits, labels, g, cfg, reduction, grad_logits, stream);
    return;
  }
  CeStagedRun<acc_t> run = ce_staged_run<acc_t>(logits, cfg, reduction, true, true);
  launch_ce_staged<scalar_t, acc_t, true, true>(logits, labels, ce_staged_geometry(g, cfg), cfg, run, stream);
  ce_staged_reduce<scalar_t, acc_t>(run, out, stream);
  ce_staged_gather<scalar_t, acc_t>(run, cfg, grad_logits, stream);
}

// What the three launches below share: dispatch_launch's set-up, then
// body(tag, g, cfg, stream) with the geometry and the staged configuration
// in the accumulation type of the dispatched element type.
template <typename Body>
void dispatch_ce(const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore_index,
                 bool align_corners, const char* dispatch_name, Body body) {
  dispatch_launch(logits, "upsampled_cross_entropy", dispatch_name, [&](auto tag, cudaStream_t stream) {
    using acc_t = at::opmath_type<typename decltype(tag)::type>;
    const CeGeometry<acc_t> g = geometry<acc_t>(logits, labels, temperature, ignore_index, align_corners);
    body(tag, g, ce_staged_config<acc_t>(logits, g), stream);
  });
}

at::Tensor upsampled_cross_entropy_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in, double temperature,
                                        int64_t ignore_index, int64_t reduction, bool align_corners) {
  raise_pending_label_errors();
  return host::upsampled_cross_entropy_forward(
      logits_in, labels_in, temperature, reduction, "CUDA kernel", on_kernel_device(logits_in),
      [&](const at::Tensor& logits, const at::Tensor& labels, at::Tensor& out) {
        dispatch_ce(logits, labels, temperature, ignore_index, align_corners, "upsampled_cross_entropy_cuda",
                    [&](auto tag, const auto& g, const StagedConfig& cfg, cudaStream_t stream) {
                      ce_forward_into<typename decltype(tag)::type>(logits, labels, g, cfg, reduction, out, stream);
                    });
      });
}

at::Tensor upsampled_cross_entropy_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                                 const at::Tensor& labels_in, double temperature, int64_t ignore_index,
                                                 int64_t reduction, bool align_corners) {
  raise_pending_label_errors();
  return host::upsampled_cross_entropy_backward(
      grad_in, logits_in, labels_in, temperature, reduction, "CUDA kernel", on_kernel_device(logits_in),
      [&](const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, at::Tensor& grad_logits) {
        dispatch_ce(logits, labels, temperature, ignore_index, align_corners, "upsampled_cross_entropy_backward_cuda",
                    [&](auto tag, const auto& g, const StagedConfig& cfg, cudaStream_t stream) {
                      ce_backward_into<typename decltype(tag)::type>(grad, logits, labels, g, cfg, reduction,
                                                                     grad_logits, stream);
                    });
      });
}

// The loss and G = dL/d(logits) for an upstream gradient of 1 (reduction mean
// or sum; the autograd backward is grad_out * G): ce_with_grad_into.
std::tuple<at::Tensor, at::Tensor> upsampled_cross_entropy_with_grad_cuda(const at::Tensor& logits_in,
                                                                          const at::Tensor& labels_in,
                                                                          double temperature, int64_t ignore_index,
                                                                          int64_t reduction, bool align_corners) {
  raise_pending_label_errors();
  return host::upsampled_cross_entropy_with_grad(
      logits_in, labels_in, temperature, reduction, "CUDA kernel", on_kernel_device(logits_in),
      [&](const at::Tensor& logits, const at::Tensor& labels, at::Tensor& out, at::Tensor& grad_logits) {
        dispatch_ce(logits, labels, temperature, ignore_index, align_corners, "upsampled_cross_entropy_with_grad_cuda",
                    [&](auto tag, const auto& g, const StagedConfig& cfg, cudaStream_t stream) {
                      ce_with_grad_into<typename decltype(tag)::type>(logits, labels, g, cfg, reduction, out,
                                                                      grad_logits, stream);
                    });
      });
}

}  // namespace
}  // namespace cuda
}  // namespace fada

#ifndef FADA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fada_core, CUDA, m) {
  m.impl("upsampled_cross_entropy", &fada::cuda::upsampled_cross_entropy_cuda);
  m.impl("upsampled_cross_entropy_backward", &fada::cuda::upsampled_cross_entropy_backward_cuda);
  m.impl("upsampled_cross_entropy_with_grad", &fada::cuda::upsampled_cross_entropy_with_grad_cuda);
}
#endif
