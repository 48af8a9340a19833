// Upsampled cross-entropy on the CPU: CrossEntropyLoss(upsample(logits) / T,
// labels, ignore_index) with the low-resolution logits (B, K, h, w) sampled
// bilinearly (either corner convention) at the labels' resolution (H, W) on the fly,
// and its gradient w.r.t. the low-resolution logits. "mean" divides by the
// number of non-ignored pixels (NaN when there are none, like torch).
//
// Same structure as fada_loss_kernel.cpp: tasks are (batch item, group of
// output rows sharing the lower source row), rows are processed in column
// tiles, and the backward reduces per-group partials in a fixed order.
// Compiled once per instruction set, like it (isa/*.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/cross_entropy_host.h"
#include "../common/fada_math.h"
#include "../common/upsample_rows.h"

namespace fada {
namespace cpu {
namespace {

// z <- z / T (in place); z_label += z where label == c.
template <typename acc_t>
inline void scale_pick(acc_t* __restrict z, acc_t* __restrict zl, const int32_t* __restrict lab, int32_t c, acc_t inv_t,
                       int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t v = z[x] * inv_t;
    z[x] = v;
    zl[x] = lab[x] == c ? v : zl[x];
  }
}

// g = gw * (softmax_c - [label == c]) / T; top += (1 - ly) g; bottom += ly g.
template <typename acc_t>
inline void ce_grad_into(acc_t* __restrict top, acc_t* __restrict bot, const acc_t* __restrict gw,
                         const acc_t* __restrict z, const acc_t* __restrict m, const acc_t* __restrict inv,
                         const int32_t* __restrict lab, int32_t c, acc_t wy0, acc_t wy1, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t p = vexp_nonpos(z[x] - m[x]) * inv[x];
    const acc_t g = gw[x] * ce_grad_term(p, lab[x] == c);
    top[x] += wy0 * g;
    bot[x] += wy1 * g;
  }
}

template <typename scalar_t>
struct CeProblem {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits;
  const int64_t* labels;
  int64_t B, K, h, w, H, W, ignore_index;
  acc_t inv_t;
  Axis<acc_t> ly, lx;
  std::vector<int64_t> groups;

  CeProblem(const at::Tensor& lg, const at::Tensor& lab, double temperature, int64_t ignore, bool align_corners)
      : logits(lg.data_ptr<scalar_t>()),
        labels(lab.data_ptr<int64_t>()),
        B(lg.size(0)),
        K(lg.size(1)),
        h(lg.size(2)),
        w(lg.size(3)),
        H(lab.size(1)),
        W(lab.size(2)),
        ignore_index(ignore),
        inv_t(static_cast<acc_t>(1) / static_cast<acc_t>(temperature)),
        ly(lg.size(2), lab.size(1), align_corners),
        lx(lg.size(3), lab.size(2), align_corners),
        groups(ly.group_begin()) {}
};

template <typename scalar_t>
struct CeScratch {
  using acc_t = at::opmath_type<scalar_t>;
  RowPair<scalar_t, acc_t> rows;
  std::vector<acc_t> z, m, sum, zl, val;
  std::vector<int32_t> lab;
  bool bad_label = false;

  explicit CeScratch(const CeProblem<scalar_t>& p)
      : rows(p.logits, p.K, p.h, p.w, p.lx),
        z(scratch<acc_t>(p.K * kTile)),
        m(scratch<acc_t>(kTile)),
        sum(scratch<acc_t>(kTile)),
        zl(scratch<acc_t>(kTile)),
        val(scratch<acc_t>(kTile)),
        lab(kTile) {}

  // z (divided by T), its max m, sum of exp(z - m), the labels of the tile as
  // int32 (-1 for ignored pixels) and z at the label (0 where ignored).
  void load_tile(const CeProblem<scalar_t>& p, int64_t b, int64_t y, int64_t x0, int64_t n) {
    rows.vertical_max(p.ly.lambda[y], x0, n, z.data(), kTile, m.data());
    const int64_t* src = p.labels + (b * p.H + y) * p.W + x0;
    for (int64_t x = 0; x < n; ++x) {
      const int64_t l = src[x];
      const bool ignored = l == p.ignore_index;
      bad_label |= !ignored && (l < 0 || l >= p.K);
      lab[x] = (ignored || l < 0 || l >= p.K) ? -1 : static_cast<int32_t>(l);
    }
    acc_t* zp = z.data();
    std::fill(zl.begin(), zl.begin() + n, acc_t(0));
    for (int64_t c = 0; c < p.K; ++c) scale_pick(zp + c * kTile, zl.data(), lab.data(), static_cast<int32_t>(c), p.inv_t, n);
    // fl(v / T) is monotone in v: the max of the scaled values is the scaled max
    for (int64_t x = 0; x < n; ++x) m[x] *= p.inv_t;
    std::fill(sum.begin(), sum.begin() + n, acc_t(0));
    for (int64_t c = 0; c < p.K; ++c) exp_sum_into(sum.data(), zp + c * kTile, m.data(), n);
  }

  template <typename F>
  void for_each_tile(const CeProblem<scalar_t>& p, int64_t y0, int64_t y1, const F& body) {
    rows.ensure(p.ly.i0[y0], p.ly.i1[y0]);  // shared by every row of the group
    for (int64_t x0 = 0; x0 < p.W; x0 += kTile)
      for (int64_t y = y0; y < y1; ++y) body(y, x0, std::min(kTile, p.W - x0));
  }
};

template <typename scalar_t>
bool ce_forward_kernel(const CeProblem<scalar_t>& p, at::opmath_type<scalar_t>* out_map, double* row_sums,
                       int64_t* row_counts) {
  using acc_t = at::opmath_type<scalar_t>;
  std::atomic<bool> bad{false};
  parallel_tasks(p.B * p.h, [&](const TaskQueue& queue) {
    CeScratch<scalar_t> t(p);
    for (int64_t begin = 0, end = 0; queue.next(begin, end);)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.h, r = task % p.h;
      if (p.groups[r] == p.groups[r + 1]) continue;
      t.rows.reset(p.logits + b * p.K * p.h * p.w);
      if (row_sums != nullptr) {
        for (int64_t y = p.groups[r]; y < p.groups[r + 1]; ++y) {
          row_sums[b * p.H + y] = 0;
          row_counts[b * p.H + y] = 0;
        }
      }
      t.for_each_tile(p, p.groups[r], p.groups[r + 1], [&](int64_t y, int64_t x0, int64_t n) {
        t.load_tile(p, b, y, x0, n);
        const acc_t* __restrict mx = t.m.data();
        const acc_t* __restrict sm = t.sum.data();
        const acc_t* __restrict zl = t.zl.data();
        const int32_t* __restrict lab = t.lab.data();
        acc_t* __restrict loss = t.val.data();
        for (int64_t x = 0; x < n; ++x) {
          const acc_t v = ce_loss_term(mx[x], vlog(sm[x]), zl[x]);
          loss[x] = lab[x] >= 0 ? v : acc_t(0);
        }
        const int64_t pix = (b * p.H + y) * p.W + x0;
        if (out_map != nullptr) {
          std::copy(loss, loss + n, out_map + pix);
        } else {
          double tile_total = 0;
          int64_t count = 0;
          for (int64_t x = 0; x < n; ++x) {
            tile_total += static_cast<double>(loss[x]);
            count += lab[x] >= 0 ? 1 : 0;
          }
          row_sums[b * p.H + y] += tile_total;  // tiles of a row arrive in increasing x0
          row_counts[b * p.H + y] += count;
        }
      });
    }
    if (t.bad_label) bad = true;
  });
  return !bad;
}

template <typename scalar_t>
bool ce_backward_kernel(const CeProblem<scalar_t>& p, const at::opmath_type<scalar_t>* grad_map,
                        at::opmath_type<scalar_t> grad_scale, at::opmath_type<scalar_t>* part) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.K, W = p.W;
  std::atomic<bool> bad{false};
  auto accumulate = [&](CeScratch<scalar_t>& t, int64_t b, int64_t r, acc_t* top, acc_t* bottom) {
    t.rows.reset(p.logits + b * p.K * p.h * p.w);
    t.for_each_tile(p, p.groups[r], p.groups[r + 1], [&](int64_t y, int64_t x0, int64_t n) {
      const acc_t wy1 = p.ly.lambda[y];
      const acc_t wy0 = static_cast<acc_t>(1) - wy1;
      t.load_tile(p, b, y, x0, n);
      acc_t* __restrict inv = t.sum.data();
      acc_t* __restrict gw = t.val.data();
      const int32_t* __restrict lab = t.lab.data();
      const int64_t pix = (b * p.H + y) * W + x0;
      for (int64_t x = 0; x < n; ++x) {
        inv[x] = static_cast<acc_t>(1) / inv[x];
        gw[x] = lab[x] >= 0 ? grad_scale * p.inv_t : acc_t(0);  // d(z / T) / dz = 1 / T
      }
      if (grad_map != nullptr) {
        const acc_t* __restrict g = grad_map + pix;
        for (int64_t x = 0; x < n; ++x) gw[x] *= g[x];
      }
      for (int64_t c = 0; c < C; ++c)
        ce_grad_into(top + c * W + x0, bottom + c * W + x0, gw, t.z.data() + c * kTile, t.m.data(), inv,
                     lab, static_cast<int32_t>(c), wy0, wy1, n);
    });
    if (t.bad_label) bad = true;
  };
  adjoint_row_groups(p.B, p.h, p.groups, C, p.lx, part, [&] { return CeScratch<scalar_t>(p); }, accumulate);
  return !bad;
}

constexpr const char* kBadLabel =
    "upsampled_cross_entropy: labels must be in [0, num_classes) or equal to ignore_index";

// The CPU launches; everything around them is common/cross_entropy_host.h.
at::Tensor upsampled_cross_entropy_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in, double temperature,
                                       int64_t ignore_index, int64_t reduction, bool align_corners) {
  return host::upsampled_cross_entropy_forward(
      logits_in, labels_in, temperature, reduction, "CPU kernel", logits_in.device().is_cpu(),
      [&](const at::Tensor& logits, const at::Tensor& labels, at::Tensor& out) {
        if (debug_poison()) out.fill_(std::numeric_limits<double>::quiet_NaN());
        const int64_t B = labels.size(0), H = labels.size(1);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "upsampled_cross_entropy_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          CeProblem<scalar_t> p(logits, labels, temperature, ignore_index, align_corners);
          bool ok;
          if (reduction == 0) {
            ok = ce_forward_kernel<scalar_t>(p, out.data_ptr<acc_t>(), nullptr, nullptr);
          } else {
            std::vector<double> rows(B * H, debug_poison() ? std::numeric_limits<double>::quiet_NaN() : 0.0);
            std::vector<int64_t> counts(B * H, 0);
            ok = ce_forward_kernel<scalar_t>(p, nullptr, rows.data(), counts.data());
            double total = 0;
            int64_t count = 0;
            for (int64_t i = 0; i < B * H; ++i) {  // fixed order
              total += rows[i];
              count += counts[i];
            }
            if (reduction == 1) total = count > 0 ? total / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN();
            out.fill_(static_cast<acc_t>(total));
          }
          TORCH_CHECK(ok, kBadLabel);
        });
      });
}

at::Tensor upsampled_cross_entropy_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                                const at::Tensor& labels_in, double temperature, int64_t ignore_index,
                                                int64_t reduction, bool align_corners) {
  return host::upsampled_cross_entropy_backward(
      grad_in, logits_in, labels_in, temperature, reduction, "CPU kernel", logits_in.device().is_cpu(),
      [&](const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, at::Tensor& grad_logits) {
        const int64_t B = labels.size(0);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                        "upsampled_cross_entropy_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
          CeProblem<scalar_t> p(logits, labels, temperature, ignore_index, align_corners);
          at::Tensor g = grad.to(acc_type).contiguous();
          acc_t grad_scale = 1;
          const acc_t* grad_map = nullptr;
          if (reduction == 0) {
            grad_map = g.data_ptr<acc_t>();
          } else {
            grad_scale = g.data_ptr<acc_t>()[0];
            if (reduction == 1) {
              const int64_t count = labels.ne(ignore_index).sum().item<int64_t>();
              // all ignored: every pixel's gradient is 0 anyway (torch gives zeros too)
              if (count > 0) grad_scale /= static_cast<acc_t>(count);
            }
          }
          const int64_t C = p.K;
          at::Tensor part = at::empty({B * p.h * 2 * C * p.w}, logits.options().dtype(acc_type));
          if (debug_poison()) part.fill_(std::numeric_limits<double>::quiet_NaN());
          acc_t* part_ptr = part.data_ptr<acc_t>();
          const bool ok = ce_backward_kernel<scalar_t>(p, grad_map, grad_scale, part_ptr);
          TORCH_CHECK(ok, kBadLabel);
          write_gathered_partials(part_ptr, grad_logits.data_ptr<scalar_t>(), B, C, p.h, p.w);
        });
      });
}

}  // namespace
}  // namespace cpu
}  // namespace fada
