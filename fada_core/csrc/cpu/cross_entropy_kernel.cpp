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
#include "loss_rows.h"

namespace fada {
namespace cpu {
namespace {

// g = gw * (softmax_c - [label == c]) / T from e = exp(z_c - max) and
// inv = 1 / sum_c e; top += (1 - ly) g; bottom += ly g.
template <typename acc_t>
inline void ce_grad_into(acc_t* __restrict top, acc_t* __restrict bot, const acc_t* __restrict gw,
                         const acc_t* __restrict e, const acc_t* __restrict inv, const int32_t* __restrict lab,
                         int32_t c, acc_t wy0, acc_t wy1, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t g = gw[x] * ce_grad_term(e[x] * inv[x], lab[x] == c);
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
      : rows(p.logits, p.K, p.h, p.w, p.lx, p.inv_t),
        z(scratch<acc_t>(p.K * kTile)),
        m(scratch<acc_t>(kTile)),
        sum(scratch<acc_t>(kTile)),
        zl(scratch<acc_t>(kTile)),
        val(scratch<acc_t>(kTile)),
        lab(kTile) {}

  // Tile [x0, x0 + n) of output row y of item b: z (divided by T: the cached
  // rows are), its max m, the labels as int32 (-1 for ignored pixels) and
  // sum = sum_c exp(z_c - m); the tile's loss into `out` when wanted. With
  // keep_exp, z_c is replaced by exp(z_c - m) (what the gradient needs).
  void load_tile(const CeProblem<scalar_t>& p, int64_t b, int64_t y, int64_t x0, int64_t n, bool keep_exp,
                 const LossOut<scalar_t>& out) {
    rows.vertical_max(p.ly.lambda[y], x0, n, z.data(), kTile, m.data());
    const int64_t* src = p.labels + (b * p.H + y) * p.W + x0;
    for (int64_t x = 0; x < n; ++x) {
      const int64_t l = src[x];
      const bool ignored = l == p.ignore_index;
      bad_label |= !ignored && (l < 0 || l >= p.K);
      lab[x] = (ignored || l < 0 || l >= p.K) ? -1 : static_cast<int32_t>(l);
    }
    acc_t* zp = z.data();
    if (out.wanted()) {  // z at the label (0 where ignored), before keep_exp overwrites z
      for (int64_t x = 0; x < n; ++x) zl[x] = lab[x] >= 0 ? zp[lab[x] * kTile + x] : acc_t(0);
    }
    std::fill(sum.begin(), sum.begin() + n, acc_t(0));
    for (int64_t c = 0; c < p.K; ++c) {
      if (keep_exp) {
        exp_store_sum(zp + c * kTile, sum.data(), m.data(), acc_t(1), n);
      } else {
        exp_sum_into(sum.data(), zp + c * kTile, m.data(), n);
      }
    }
    if (out.wanted()) tile_loss(p, (b * p.H + y) * p.W + x0, b * p.H + y, n, out);
  }

  template <typename F>
  void for_each_tile(const CeProblem<scalar_t>& p, int64_t y0, int64_t y1, const F& body) {
    rows.ensure(p.ly.i0[y0], p.ly.i1[y0]);  // shared by every row of the group
    for (int64_t x0 = 0; x0 < p.W; x0 += kTile)
      for (int64_t y = y0; y < y1; ++y) body(y, x0, std::min(kTile, p.W - x0));
  }

 private:
  // The loaded tile's loss; `pix` is its first pixel, `row` its output row.
  void tile_loss(const CeProblem<scalar_t>& p, int64_t pix, int64_t row, int64_t n, const LossOut<scalar_t>& out) {
    const acc_t* __restrict mx = m.data();
    const acc_t* __restrict sm = sum.data();
    const acc_t* __restrict zlp = zl.data();
    const int32_t* __restrict lp = lab.data();
    acc_t* __restrict loss = val.data();
    for (int64_t x = 0; x < n; ++x) {
      const acc_t v = ce_loss_term(mx[x], vlog(sm[x]), zlp[x]);
      loss[x] = lp[x] >= 0 ? v : acc_t(0);
    }
    int64_t count = 0;
    if (out.map == nullptr)
      for (int64_t x = 0; x < n; ++x) count += lp[x] >= 0 ? 1 : 0;
    out.add(pix, row, loss, n, count);  // tiles of a row arrive in increasing x0
  }
};

template <typename scalar_t>
bool ce_forward_kernel(const CeProblem<scalar_t>& p, const LossOut<scalar_t>& out) {
  std::atomic<bool> bad{false};
  parallel_tasks(p.B * p.h, [&](const TaskQueue& queue) {
    CeScratch<scalar_t> t(p);
    for (int64_t begin = 0, end = 0; queue.next(begin, end);)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.h, r = task % p.h;
      if (p.groups[r] == p.groups[r + 1]) continue;
      t.rows.reset(p.logits + b * p.K * p.h * p.w);
      out.start_rows(b * p.H + p.groups[r], b * p.H + p.groups[r + 1]);
      t.for_each_tile(p, p.groups[r], p.groups[r + 1], [&](int64_t y, int64_t x0, int64_t n) {
        t.load_tile(p, b, y, x0, n, false, out);
      });
    }
    if (t.bad_label) bad = true;
  });
  return !bad;
}

// The gradient (through its partials, see adjoint_row_groups), and the loss into `out`
// when wanted (the fused loss-and-gradient: one pass instead of two).
template <typename scalar_t>
bool ce_backward_kernel(const CeProblem<scalar_t>& p, const at::opmath_type<scalar_t>* grad_map,
                        at::opmath_type<scalar_t> grad_scale, at::opmath_type<scalar_t>* part,
                        scalar_t* grad_logits, const LossOut<scalar_t>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.K, W = p.W;
  std::atomic<bool> bad{false};
  auto accumulate = [&](CeScratch<scalar_t>& t, int64_t b, int64_t r, acc_t* top, acc_t* bottom) {
    t.rows.reset(p.logits + b * p.K * p.h * p.w);
    out.start_rows(b * p.H + p.groups[r], b * p.H + p.groups[r + 1]);
    t.for_each_tile(p, p.groups[r], p.groups[r + 1], [&](int64_t y, int64_t x0, int64_t n) {
      const acc_t wy1 = p.ly.lambda[y];
      const acc_t wy0 = static_cast<acc_t>(1) - wy1;
      t.load_tile(p, b, y, x0, n, true, out);
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
        ce_grad_into(top + c * W + x0, bottom + c * W + x0, gw, t.z.data() + c * kTile, inv, lab,
                     static_cast<int32_t>(c), wy0, wy1, n);
    });
    if (t.bad_label) bad = true;
  };
  adjoint_row_groups(p.B, p.h, p.groups, C, p.lx, part, grad_logits, [&] { return CeScratch<scalar_t>(p); },
                     accumulate);
  return !bad;
}

constexpr const char* kBadLabel =
    "upsampled_cross_entropy: labels must be in [0, num_classes) or equal to ignore_index";

// The scale of the gradient of a reduced loss for an upstream gradient
// `upstream`: divided by the number of non-ignored pixels for the mean (all
// ignored: every pixel's gradient is 0 anyway, torch gives zeros too).
template <typename acc_t>
acc_t reduced_grad_scale(acc_t upstream, const at::Tensor& labels, int64_t ignore_index, int64_t reduction) {
  if (reduction != 1) return upstream;
  const int64_t* l = labels.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0, n = labels.numel(); i < n; ++i) count += l[i] != ignore_index ? 1 : 0;
  return count > 0 ? upstream / static_cast<acc_t>(count) : upstream;
}

// The backward's launch: the gradient into grad_logits (contiguous); `out`
// as ce_backward_kernel.
template <typename scalar_t>
void ce_gradient(const CeProblem<scalar_t>& p, const at::opmath_type<scalar_t>* grad_map,
                 at::opmath_type<scalar_t> grad_scale, const LossOut<scalar_t>& out, at::Tensor& grad_logits) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor part = adjoint_partials<acc_t>(grad_logits);
  TORCH_CHECK(ce_backward_kernel<scalar_t>(p, grad_map, grad_scale, part.data_ptr<acc_t>(),
                                           grad_logits.data_ptr<scalar_t>(), out),
              kBadLabel);
}

// The CPU launches; everything around them is common/cross_entropy_host.h.
at::Tensor upsampled_cross_entropy_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in, double temperature,
                                       int64_t ignore_index, int64_t reduction, bool align_corners) {
  return host::upsampled_cross_entropy_forward(
      logits_in, labels_in, temperature, reduction, "CPU kernel", logits_in.device().is_cpu(),
      [&](const at::Tensor& logits, const at::Tensor& labels, at::Tensor& out) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "upsampled_cross_entropy_cpu", [&] {
          CeProblem<scalar_t> p(logits, labels, temperature, ignore_index, align_corners);
          write_loss<scalar_t>(out, p.B * p.H, reduction, [&](const LossOut<scalar_t>& loss) {
            TORCH_CHECK(ce_forward_kernel<scalar_t>(p, loss), kBadLabel);
          });
        });
      });
}

at::Tensor upsampled_cross_entropy_backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                                const at::Tensor& labels_in, double temperature, int64_t ignore_index,
                                                int64_t reduction, bool align_corners) {
  return host::upsampled_cross_entropy_backward(
      grad_in, logits_in, labels_in, temperature, reduction, "CPU kernel", logits_in.device().is_cpu(),
      [&](const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, at::Tensor& grad_logits) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                        "upsampled_cross_entropy_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          CeProblem<scalar_t> p(logits, labels, temperature, ignore_index, align_corners);
          const at::Tensor g = grad.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
          if (reduction == 0) {
            ce_gradient<scalar_t>(p, g.data_ptr<acc_t>(), acc_t(1), LossOut<scalar_t>(), grad_logits);
          } else {
            const acc_t scale = reduced_grad_scale(g.data_ptr<acc_t>()[0], labels, ignore_index, reduction);
            ce_gradient<scalar_t>(p, nullptr, scale, LossOut<scalar_t>(), grad_logits);
          }
        });
      });
}

// The loss and its gradient for an upstream 1 in one pass over the pixels:
// the same arithmetic as the forward and backward kernels, so the same bits.
std::tuple<at::Tensor, at::Tensor> upsampled_cross_entropy_with_grad_cpu(const at::Tensor& logits_in,
                                                                         const at::Tensor& labels_in,
                                                                         double temperature, int64_t ignore_index,
                                                                         int64_t reduction, bool align_corners) {
  return host::upsampled_cross_entropy_with_grad(
      logits_in, labels_in, temperature, reduction, "CPU kernel", logits_in.device().is_cpu(),
      [&](const at::Tensor& logits, const at::Tensor& labels, at::Tensor& out, at::Tensor& grad_logits) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                        "upsampled_cross_entropy_with_grad_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          CeProblem<scalar_t> p(logits, labels, temperature, ignore_index, align_corners);
          const acc_t scale = reduced_grad_scale(acc_t(1), labels, ignore_index, reduction);
          write_loss<scalar_t>(out, p.B * p.H, reduction, [&](const LossOut<scalar_t>& loss) {
            ce_gradient<scalar_t>(p, nullptr, scale, loss, grad_logits);
          });
        });
      });
}

}  // namespace
}  // namespace cpu
}  // namespace fada
