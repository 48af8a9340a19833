// CPU building blocks shared by the fused FADA loss and upsampled
// cross-entropy kernels (csrc/cpu): the index tables (either corner convention), the
// grouping of output rows by their lower source row, a cache of two
// horizontally-upsampled source rows, and the deterministic adjoint of the
// upsampling (per-group partials reduced in a fixed order).
//
// The full-resolution image is processed one output row at a time and, inside
// a row, in column tiles of kTile pixels, so the working set stays in cache and
// the per-channel loops over pixels vectorise. Nothing of full-resolution size
// is ever allocated.
#pragma once

#if !defined(__CUDACC__) && !defined(__HIPCC__)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "fada_math.h"

namespace fada {
namespace cpu {

constexpr int64_t kTile = 256;  // output pixels per column tile

// FADA_CORE_DEBUG_POISON=1: scratch and outputs start as NaN, so a value the
// kernel forgot to write shows up in the tests.
inline bool debug_poison() {
  const char* v = std::getenv("FADA_CORE_DEBUG_POISON");
  return v != nullptr && v[0] == '1';
}

template <typename acc_t>
std::vector<acc_t> scratch(size_t n) {
  return std::vector<acc_t>(n, debug_poison() ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0));
}

// Tasks handed out in small chunks of consecutive indices from a shared
// counter, so that a thread whose core is busy with another process does not
// hold the others back (at::parallel_for splits statically). Every task
// writes only its own outputs, so results do not depend on which thread ran
// which task.
class TaskQueue {
 public:
  TaskQueue(int64_t n, int64_t chunk) : n_(n), chunk_(chunk) {}
  bool next(int64_t& begin, int64_t& end) const {
    begin = next_.fetch_add(chunk_);
    if (begin >= n_) return false;
    end = std::min(begin + chunk_, n_);
    return true;
  }

 private:
  int64_t n_, chunk_;
  mutable std::atomic<int64_t> next_{0};
};

// Calls fn(queue) once per worker thread; fn builds its scratch and then
// drains the queue: for (int64_t b = 0, e = 0; queue.next(b, e);) ...
template <typename F>
void parallel_tasks(int64_t n, const F& fn) {
  if (n <= 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunk = n >= 8 * threads ? 4 : 1;  // consecutive groups share cached source rows
  const int64_t workers = std::min<int64_t>(threads, (n + chunk - 1) / chunk);
  const TaskQueue queue(n, chunk);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) fn(queue);
  });
}

// Source positions of every output index along one axis.
template <typename acc_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> lambda;
  int64_t in_size = 0, out_size = 0;

  Axis(int64_t in, int64_t out, bool align_corners)
      : i0(out), i1(out), lambda(out), in_size(in), out_size(out) {
    const AxisMap<acc_t> map = axis_map<acc_t>(in, out, align_corners);
    for (int64_t o = 0; o < out; ++o) {
      const LinearIndex<acc_t> s = source_index<acc_t>(map, o, in);
      i0[o] = s.i0;
      i1[o] = s.i1;
      lambda[o] = s.lambda;
    }
  }

  // Output indices grouped by their lower source index (monotone in the
  // output index): group r is [begin[r], begin[r + 1]), possibly empty.
  std::vector<int64_t> group_begin() const {
    std::vector<int64_t> begin(in_size + 1, out_size);
    for (int64_t o = out_size - 1; o >= 0; --o) begin[i0[o]] = o;
    for (int64_t r = in_size - 1; r >= 0; --r) begin[r] = std::min(begin[r], begin[r + 1]);
    return begin;
  }
};

// sum[x] += exp(z[x] - m[x]) for x < n, m[x] >= z[x] (vectorised): the
// softmax denominator, one channel at a time.
template <typename acc_t>
inline void exp_sum_into(acc_t* __restrict sum, const acc_t* __restrict z, const acc_t* __restrict m, int64_t n) {
  for (int64_t x = 0; x < n; ++x) sum[x] += vexp_nonpos(z[x] - m[x]);
}

// z[x] <- exp((z[x] - m[x]) * scale); sum[x] += z[x]: the softmax numerators
// kept for a gradient, one channel at a time.
template <typename acc_t>
inline void exp_store_sum(acc_t* __restrict z, acc_t* __restrict sum, const acc_t* __restrict m, acc_t scale,
                          int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t e = vexp_nonpos((z[x] - m[x]) * scale);
    z[x] = e;
    sum[x] += e;
  }
}

// o[x] = lerp(a[x], b[x], l) for x < n (vectorised).
template <typename acc_t>
inline void lerp_n(const acc_t* __restrict a, const acc_t* __restrict b, acc_t l, int64_t n, acc_t* __restrict o) {
  for (int64_t x = 0; x < n; ++x) o[x] = lerp(a[x], b[x], l);
}

// o[x] = lerp(a[x], b[x], l); m[x] = max(m[x], o[x]).
template <typename acc_t>
inline void lerp_max_n(const acc_t* __restrict a, const acc_t* __restrict b, acc_t l, int64_t n, acc_t* __restrict o,
                       acc_t* __restrict m) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t v = lerp(a[x], b[x], l);
    o[x] = v;
    m[x] = running_max(m[x], v);
  }
}

// o[x] = lerp(low[i0[x]], low[i1[x]], l[x]) for every output x, walking the
// segments of outputs that share i0 = j (i1 = min(j + 1, w - 1)): the inner
// loop is contiguous with two broadcast values, so it vectorises (3x faster
// than a gather here).
template <typename acc_t>
inline void lerp_segments(const acc_t* __restrict low, int64_t w, const int64_t* __restrict seg,
                          const acc_t* __restrict l, acc_t* __restrict o) {
  for (int64_t j = 0; j < w; ++j) {
    const acc_t a = low[j], b = low[j + 1 < w ? j + 1 : j];
    for (int64_t x = seg[j]; x < seg[j + 1]; ++x) o[x] = lerp(a, b, l[x]);
  }
}

// Two source rows (rows r0 and r1 of a (C, h, w) block), multiplied by
// `scale`, upsampled horizontally to the full output width and kept in acc_t,
// so consecutive output rows that share source rows reuse them. (Scaling the
// low-resolution values costs w multiplies a row instead of one per output
// value; bilinear sampling is linear, so only the rounding differs.)
template <typename scalar_t, typename acc_t>
class RowPair {
 public:
  RowPair(const scalar_t* planes, int64_t channels, int64_t h, int64_t w, const Axis<acc_t>& xs,
          acc_t scale = acc_t(1))
      : planes_(planes),
        channels_(channels),
        h_(h),
        w_(w),
        out_w_(xs.out_size),
        scale_(scale),
        xs_(xs),
        row_{scratch<acc_t>(channels * xs.out_size), scratch<acc_t>(channels * xs.out_size)},
        low_(scratch<acc_t>(w)),
        seg_(xs.group_begin()) {}

  // Point at another batch item's (C, h, w) block; cached rows are dropped.
  void reset(const scalar_t* planes) {
    planes_ = planes;
    idx_[0] = idx_[1] = -1;
  }

  void ensure(int64_t r0, int64_t r1) {
    if (idx_[0] != r0) {
      if (idx_[1] == r0) {
        std::swap(row_[0], row_[1]);
        std::swap(idx_[0], idx_[1]);
      } else {
        fill(0, r0);
      }
    }
    if (idx_[1] != r1) fill(1, r1);
  }

  // out[c * ld + (x - x0)] = lerp(row r0, row r1, ly) for x in [x0, x0 + n), and
  // mx[x - x0] = max over c of those values.
  void vertical_max(acc_t ly, int64_t x0, int64_t n, acc_t* __restrict out, int64_t ld, acc_t* __restrict mx) const {
    const acc_t* a = row_[0].data() + x0;
    const acc_t* b = row_[1].data() + x0;
    lerp_n(a, b, ly, n, out);
    std::copy(out, out + n, mx);
    for (int64_t c = 1; c < channels_; ++c) lerp_max_n(a + c * out_w_, b + c * out_w_, ly, n, out + c * ld, mx);
  }

  // out[c * ld + (x - x0)] = lerp(row r0, row r1, ly) for x in [x0, x0 + n).
  void vertical(acc_t ly, int64_t x0, int64_t n, acc_t* __restrict out, int64_t ld) const {
    const acc_t* a = row_[0].data() + x0;
    const acc_t* b = row_[1].data() + x0;
    for (int64_t c = 0; c < channels_; ++c) lerp_n(a + c * out_w_, b + c * out_w_, ly, n, out + c * ld);
  }

 private:
  void fill(int which, int64_t r) {
    acc_t* dst = row_[which].data();
    const acc_t* lx = xs_.lambda.data();
    acc_t* low = low_.data();
    for (int64_t c = 0; c < channels_; ++c) {
      const scalar_t* src = planes_ + (c * h_ + r) * w_;
      for (int64_t j = 0; j < w_; ++j) low[j] = static_cast<acc_t>(src[j]) * scale_;
      lerp_segments(low, w_, seg_.data(), lx, dst + c * out_w_);
    }
    idx_[which] = r;
  }

  const scalar_t* planes_;
  int64_t channels_, h_, w_, out_w_;
  acc_t scale_;
  const Axis<acc_t>& xs_;
  std::vector<acc_t> row_[2];
  std::vector<acc_t> low_;
  std::vector<int64_t> seg_;  // output columns [seg_[j], seg_[j + 1]) have i0 == j
  int64_t idx_[2] = {-1, -1};
};

// Adjoint of the horizontal upsampling for C channels of one row:
// dst[c][j] = sum_x (weight of source column j in output x) * src[c][x].
// dst is overwritten. Output columns are visited segment by segment (the
// columns whose lower source column is j), the sums kept in registers and four
// channels interleaved, so there is no store-to-load dependency between
// iterations; the summation order is fixed.
template <typename acc_t>
void horizontal_adjoint(const acc_t* src, int64_t channels, const Axis<acc_t>& xs, acc_t* dst) {
  const int64_t out_w = xs.out_size, w = xs.in_size;
  const acc_t* lx = xs.lambda.data();
  const std::vector<int64_t> seg = xs.group_begin();
  int64_t c = 0;
  for (; c + 4 <= channels; c += 4) {
    const acc_t* s0 = src + c * out_w;
    const acc_t* s1 = s0 + out_w;
    const acc_t* s2 = s1 + out_w;
    const acc_t* s3 = s2 + out_w;
    acc_t carry[4] = {0, 0, 0, 0};
    for (int64_t j = 0; j < w; ++j) {
      acc_t u[4] = {carry[0], carry[1], carry[2], carry[3]};
      acc_t v[4] = {0, 0, 0, 0};
      for (int64_t x = seg[j]; x < seg[j + 1]; ++x) {
        const acc_t l1 = lx[x], l0 = acc_t(1) - l1;
        u[0] += l0 * s0[x];
        v[0] += l1 * s0[x];
        u[1] += l0 * s1[x];
        v[1] += l1 * s1[x];
        u[2] += l0 * s2[x];
        v[2] += l1 * s2[x];
        u[3] += l0 * s3[x];
        v[3] += l1 * s3[x];
      }
      if (j == w - 1) {  // i1 == i0 on the last source column
        for (int k = 0; k < 4; ++k) u[k] += v[k];
      }
      for (int k = 0; k < 4; ++k) {
        dst[(c + k) * w + j] = u[k];
        carry[k] = v[k];
      }
    }
  }
  for (; c < channels; ++c) {
    const acc_t* s0 = src + c * out_w;
    acc_t carry = 0;
    for (int64_t j = 0; j < w; ++j) {
      acc_t u = carry, v = 0;
      for (int64_t x = seg[j]; x < seg[j + 1]; ++x) {
        const acc_t l1 = lx[x], l0 = acc_t(1) - l1;
        u += l0 * s0[x];
        v += l1 * s0[x];
      }
      if (j == w - 1) u += v;
      dst[c * w + j] = u;
      carry = v;
    }
  }
}

// Partials of the upsampling adjoint, one slot per (batch item, row group r):
// part[((b * h + r) * 2 + k) * C * w + c * w + j], k = 0 for source row r
// (weight 1 - ly), k = 1 for source row min(r + 1, h - 1) (weight ly).
// grad[b][c][i][j] = top(b, i) + bottom(b, i - 1) [+ bottom(b, h - 1) when
// i == h - 1], always in that order: the result does not depend on how the
// groups were spread over threads.
template <typename acc_t>
inline acc_t gathered_partial(const acc_t* part, int64_t b, int64_t c, int64_t i, int64_t j, int64_t channels,
                              int64_t h, int64_t w) {
  const int64_t slot = channels * w;
  const int64_t off = c * w + j;
  acc_t v = part[((b * h + i) * 2 + 0) * slot + off];
  if (i > 0) v += part[((b * h + i - 1) * 2 + 1) * slot + off];
  if (i == h - 1) v += part[((b * h + i) * 2 + 1) * slot + off];
  return v;
}

// Row i of item b of the low-resolution gradient (B, channels, h, w),
// contiguous, every channel, gathered from the partials.
template <typename scalar_t, typename acc_t>
inline void gather_row(const acc_t* part, scalar_t* out, int64_t b, int64_t i, int64_t channels, int64_t h,
                       int64_t w) {
  for (int64_t c = 0; c < channels; ++c) {
    scalar_t* o = out + ((b * channels + c) * h + i) * w;
    for (int64_t j = 0; j < w; ++j) o[j] = static_cast<scalar_t>(gathered_partial(part, b, c, i, j, channels, h, w));
  }
}

// The partials adjoint_row_groups needs for the gradient `grad` (B, channels,
// h, w): two slots of channels x w per (batch item, row group), in acc_t.
// Under FADA_CORE_DEBUG_POISON they and grad start as NaN, so a slot or a
// gradient element the kernel forgot to write shows up in the tests.
template <typename acc_t>
at::Tensor adjoint_partials(at::Tensor& grad) {
  at::Tensor part = at::empty({2 * grad.numel()}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  if (debug_poison()) {
    part.fill_(std::numeric_limits<double>::quiet_NaN());
    grad.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return part;
}

// The tasks of a backward kernel, one per (batch item b, row group r), the
// layout of `part` described above. Per task: full-width rows top and bottom
// (channels x out_w) start at zero, accumulate(work, b, r, top, bottom) adds
// the group's output gradient into them, weighted onto source rows r and
// min(r + 1, h - 1), and their horizontal adjoint (along `xs`) becomes the
// task's two slots; a group no output row maps to gets zero slots.
// make_work() builds a worker's scratch, handed to every call of accumulate
// on that worker. Each low-resolution row of `out` (B, channels, h, w) is
// gathered by whichever thread finishes the second of the two tasks it
// reads (r = i - 1 and i), inside the same parallel region: a second region
// would wait again for every thread, which costs most when a thread's core is
// busy with another process.
template <typename scalar_t, typename acc_t, typename MakeWork, typename Accumulate>
void adjoint_row_groups(int64_t batch, int64_t h, const std::vector<int64_t>& groups, int64_t channels,
                        const Axis<acc_t>& xs, acc_t* part, scalar_t* out, const MakeWork& make_work,
                        const Accumulate& accumulate) {
  const int64_t width = xs.out_size, slot = channels * xs.in_size;
  // pending[b * h + i]: how many of the tasks row i reads are not done yet
  std::unique_ptr<std::atomic<int>[]> pending(new std::atomic<int>[batch * h]);
  for (int64_t k = 0; k < batch * h; ++k) pending[k].store(k % h > 0 ? 2 : 1, std::memory_order_relaxed);
  parallel_tasks(batch * h, [&](const TaskQueue& queue) {
    auto work = make_work();
    std::vector<acc_t> top = scratch<acc_t>(channels * width), bottom = scratch<acc_t>(channels * width);
    for (int64_t begin = 0, end = 0; queue.next(begin, end);) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / h, r = task % h;
        acc_t* slot_top = part + (task * 2 + 0) * slot;
        acc_t* slot_bottom = part + (task * 2 + 1) * slot;
        if (groups[r] == groups[r + 1]) {
          std::fill(slot_top, slot_top + 2 * slot, acc_t(0));
        } else {
          std::fill(top.begin(), top.end(), acc_t(0));
          std::fill(bottom.begin(), bottom.end(), acc_t(0));
          accumulate(work, b, r, top.data(), bottom.data());
          horizontal_adjoint(top.data(), channels, xs, slot_top);
          horizontal_adjoint(bottom.data(), channels, xs, slot_bottom);
        }
        // acq_rel: the gathering thread sees the other task's slots
        for (int64_t i = r; i <= std::min(r + 1, h - 1); ++i)
          if (pending[b * h + i].fetch_sub(1, std::memory_order_acq_rel) == 1)
            gather_row(part, out, b, i, channels, h, xs.in_size);
      }
    }
  });
}

}  // namespace cpu
}  // namespace fada

#endif
