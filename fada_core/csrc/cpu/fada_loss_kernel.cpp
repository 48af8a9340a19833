// Fused FADA loss on the CPU: forward, the gradient w.r.t. the
// low-resolution discriminator logits, and both in one pass
// (fada_loss_with_grad), sampling both inputs bilinearly (either corner
// convention) on the fly. Per output pixel (b, y, x):
//   z = upsampled disc logits (2K), s = upsampled seg logits (K),
//   a_c = min(softmax(s / T)_c, cap)             (detached soft label)
//   loss = -sum_c a_c log_softmax(z)_{off + c}   (off = 0 source, K target)
//   dloss/dz = (sum_c a_c) softmax(z) - y        (y = a in the domain's half)
// times weight[b, y, x] if given, then mean / sum / none.
//
// Work is split over (batch item, group of output rows sharing the lower
// source row); rows are processed in column tiles so that every per-channel
// loop over pixels vectorises. The backward accumulates each group's
// contribution into its own partial slot and reduces the slots in a fixed
// order: results are bitwise independent of the number of threads. The
// one-pass loss and gradient is the backward computing each tile's loss too,
// with the forward's arithmetic: it gives the bits of the two separate ops.
//
// Compiled once per instruction set through isa/*.cpp (registered by
// dispatch.cpp); the loops are plain C++ that the compiler vectorises for each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../common/fada_loss_host.h"
#include "../common/fada_math.h"
#include "../common/upsample_rows.h"
#include "loss_rows.h"

namespace fada {
namespace cpu {
namespace {

// Per-channel passes over a tile's pixels. Each is a free function on
// __restrict pointers so that GCC vectorises the loop over x.
// e <- soft_label(e); asum += e.
template <typename acc_t>
inline void soft_label_into(acc_t* __restrict e, acc_t* __restrict asum, const acc_t* __restrict inv, acc_t cap,
                            int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t a = soft_label(e[x], inv[x], cap);
    e[x] = a;
    asum[x] += a;
  }
}

// e <- exp(z - m); sum += e: exp_store_sum out of place, for the domain's
// half of the disc logits, whose z the loss still needs.
template <typename acc_t>
inline void exp_copy_sum(acc_t* __restrict e, acc_t* __restrict sum, const acc_t* __restrict z,
                         const acc_t* __restrict m, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t v = vexp_nonpos(z[x] - m[x]);
    e[x] = v;
    sum[x] += v;
  }
}

template <typename acc_t>
inline void loss_into(acc_t* __restrict loss, const acc_t* __restrict a, const acc_t* __restrict z,
                      const acc_t* __restrict m, const acc_t* __restrict log_sum, int64_t n) {
  for (int64_t x = 0; x < n; ++x) loss[x] += fada_loss_term(a[x], z[x], m[x], log_sum[x]);
}

// g = gw * ((sum a) * e / sum_e - y); top += (1 - ly) g; bottom += ly g.
template <typename acc_t>
inline void grad_into(acc_t* __restrict top, acc_t* __restrict bot, const acc_t* __restrict gw,
                      const acc_t* __restrict asum, const acc_t* __restrict e, const acc_t* __restrict inv,
                      const acc_t* __restrict y, acc_t wy0, acc_t wy1, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t g = gw[x] * fada_grad_term(asum[x], e[x] * inv[x], y[x]);
    top[x] += wy0 * g;
    bot[x] += wy1 * g;
  }
}

template <typename acc_t>
inline void grad_into_other(acc_t* __restrict top, acc_t* __restrict bot, const acc_t* __restrict gw,
                            const acc_t* __restrict asum, const acc_t* __restrict e, const acc_t* __restrict inv,
                            acc_t wy0, acc_t wy1, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    const acc_t g = gw[x] * fada_grad_term(asum[x], e[x] * inv[x], acc_t(0));
    top[x] += wy0 * g;
    bot[x] += wy1 * g;
  }
}

template <typename scalar_t>
struct FadaProblem {
  using acc_t = at::opmath_type<scalar_t>;

  const scalar_t* disc;
  const scalar_t* seg;
  const acc_t* weight;  // (B, H, W) or nullptr
  int64_t B, K, h, w, hs, ws, H, W, off;
  acc_t inv_t, cap;
  Axis<acc_t> dy, dx, sy, sx;
  std::vector<int64_t> groups;

  // d, s: contiguous logits; wt: the weight in acc_t, or undefined.
  FadaProblem(const at::Tensor& d, const at::Tensor& s, const at::Tensor& wt, const host::FadaLossArgs& a)
      : disc(d.data_ptr<scalar_t>()),
        seg(s.data_ptr<scalar_t>()),
        weight(wt.defined() ? wt.data_ptr<acc_t>() : nullptr),
        B(d.size(0)),
        K(s.size(1)),
        h(d.size(2)),
        w(d.size(3)),
        hs(s.size(2)),
        ws(s.size(3)),
        H(a.out_h),
        W(a.out_w),
        off(a.domain == 0 ? 0 : s.size(1)),
        inv_t(static_cast<acc_t>(1) / static_cast<acc_t>(a.temperature)),
        cap(static_cast<acc_t>(a.cap)),
        dy(d.size(2), a.out_h, a.align_corners),
        dx(d.size(3), a.out_w, a.align_corners),
        sy(s.size(2), a.out_h, a.align_corners),
        sx(s.size(3), a.out_w, a.align_corners),
        groups(dy.group_begin()) {}

  // The scale of the gradient of a reduced loss for an upstream gradient
  // `upstream`: divided by the number of output pixels for the mean.
  acc_t reduced_grad_scale(acc_t upstream, int64_t reduction) const {
    return reduction == 1 ? upstream / static_cast<acc_t>(B * H * W) : upstream;
  }
};

// Per-thread scratch: two cached source-row pairs and the tile buffers.
template <typename scalar_t>
struct FadaScratch {
  using acc_t = at::opmath_type<scalar_t>;
  RowPair<scalar_t, acc_t> drows, srows;
  std::vector<acc_t> z, s, m, sum, aux, asum, val;
  std::vector<acc_t> e_dom;  // the backward's exp(z - m) for the domain's half

  explicit FadaScratch(const FadaProblem<scalar_t>& p)
      : drows(p.disc, 2 * p.K, p.h, p.w, p.dx),
        srows(p.seg, p.K, p.hs, p.ws, p.sx),
        z(scratch<acc_t>(2 * p.K * kTile)),
        s(scratch<acc_t>(p.K * kTile)),
        m(scratch<acc_t>(kTile)),
        sum(scratch<acc_t>(kTile)),
        aux(scratch<acc_t>(kTile)),
        asum(scratch<acc_t>(kTile)),
        val(scratch<acc_t>(kTile)),
        e_dom(scratch<acc_t>(p.K * kTile)) {}

  // Calls body(y, x0, n) for every column tile of output rows [y0, y1), all
  // of which share their lower disc source row. When the seg logits have the
  // disc's height, their source rows are shared too and tiles are the outer
  // loop: a tile's slices of the cached rows and of the gradient
  // accumulators then stay in cache across the group's rows.
  template <typename F>
  void for_each_tile(const FadaProblem<scalar_t>& p, int64_t y0, int64_t y1, const F& body) {
    if (p.hs == p.h) {
      drows.ensure(p.dy.i0[y0], p.dy.i1[y0]);
      srows.ensure(p.sy.i0[y0], p.sy.i1[y0]);
      for (int64_t x0 = 0; x0 < p.W; x0 += kTile)
        for (int64_t y = y0; y < y1; ++y) body(y, x0, std::min(kTile, p.W - x0));
    } else {
      for (int64_t y = y0; y < y1; ++y) {
        drows.ensure(p.dy.i0[y], p.dy.i1[y]);
        srows.ensure(p.sy.i0[y], p.sy.i1[y]);
        for (int64_t x0 = 0; x0 < p.W; x0 += kTile) body(y, x0, std::min(kTile, p.W - x0));
      }
    }
  }

  // Load tile [x0, x0 + n) of output row y of item b: z, and the soft labels
  // a (in s) with their sum in asum.
  void load_tile(const FadaProblem<scalar_t>& p, int64_t y, int64_t x0, int64_t n) {
    const int64_t K = p.K;
    const acc_t inv_t = p.inv_t, cap = p.cap;
    acc_t* __restrict sp = s.data();
    acc_t* __restrict mx = m.data();
    acc_t* __restrict sm = sum.data();
    acc_t* __restrict inv = aux.data();
    acc_t* __restrict as = asum.data();
    // soft label: a_c = min(exp((s_c - max) / T) / sum, cap)
    srows.vertical_max(p.sy.lambda[y], x0, n, sp, kTile, mx);
    std::fill(sm, sm + n, acc_t(0));
    for (int64_t c = 0; c < K; ++c) exp_store_sum(sp + c * kTile, sm, mx, inv_t, n);
    for (int64_t x = 0; x < n; ++x) inv[x] = static_cast<acc_t>(1) / sm[x];
    std::fill(as, as + n, acc_t(0));
    for (int64_t c = 0; c < K; ++c) soft_label_into(sp + c * kTile, as, inv, cap, n);
    // the 2K disc logits and their max
    drows.vertical_max(p.dy.lambda[y], x0, n, z.data(), kTile, mx);
  }

  // sum = sum_c exp(z_c - max) over the 2K channels of the loaded tile. With
  // keep_exp, the exps are kept for the gradient: in z, except the domain's
  // half, whose exps go to e_dom because the loss still reads its z. Same
  // sum, in the same channel order, either way.
  void exp_sums(const FadaProblem<scalar_t>& p, int64_t n, bool keep_exp) {
    acc_t* __restrict sm = sum.data();
    const acc_t* __restrict mx = m.data();
    std::fill(sm, sm + n, acc_t(0));
    for (int64_t c = 0; c < 2 * p.K; ++c) {
      acc_t* zc = z.data() + c * kTile;
      if (!keep_exp) {
        exp_sum_into(sm, zc, mx, n);
      } else if (c >= p.off && c < p.off + p.K) {
        exp_copy_sum(e_dom.data() + (c - p.off) * kTile, sm, zc, mx, n);
      } else {
        exp_store_sum(zc, sm, mx, acc_t(1), n);
      }
    }
  }

  // The loaded tile's loss into `out` (times the weight), from z's domain half
  // and sum = sum_c exp(z_c - max) over all 2K channels. Uses aux and val.
  void tile_loss(const FadaProblem<scalar_t>& p, int64_t b, int64_t y, int64_t x0, int64_t n,
                 const LossOut<scalar_t>& out) {
    const acc_t* __restrict zp = z.data();
    const acc_t* __restrict ap = s.data();
    const acc_t* __restrict mx = m.data();
    const acc_t* __restrict sm = sum.data();
    acc_t* __restrict log_sum = aux.data();
    acc_t* __restrict loss = val.data();
    for (int64_t x = 0; x < n; ++x) {
      log_sum[x] = vlog(sm[x]);
      loss[x] = 0;
    }
    for (int64_t c = 0; c < p.K; ++c) loss_into(loss, ap + c * kTile, zp + (p.off + c) * kTile, mx, log_sum, n);
    const int64_t row = b * p.H + y, pix = row * p.W + x0;
    if (p.weight != nullptr) {
      const acc_t* __restrict wt = p.weight + pix;
      for (int64_t x = 0; x < n; ++x) loss[x] *= wt[x];
    }
    out.add(pix, row, loss, n, n);  // every pixel counts for the mean
  }
};

template <typename scalar_t>
void fada_forward_kernel(const FadaProblem<scalar_t>& p, const LossOut<scalar_t>& out) {
  parallel_tasks(p.B * p.h, [&](const TaskQueue& queue) {
    FadaScratch<scalar_t> t(p);
    for (int64_t begin = 0, end = 0; queue.next(begin, end);)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.h, r = task % p.h;
      if (p.groups[r] == p.groups[r + 1]) continue;
      t.drows.reset(p.disc + b * 2 * p.K * p.h * p.w);
      t.srows.reset(p.seg + b * p.K * p.hs * p.ws);
      out.start_rows(b * p.H + p.groups[r], b * p.H + p.groups[r + 1]);
      t.for_each_tile(p, p.groups[r], p.groups[r + 1], [&](int64_t y, int64_t x0, int64_t n) {
        t.load_tile(p, y, x0, n);
        t.exp_sums(p, n, false);
        t.tile_loss(p, b, y, x0, n, out);
      });
    }
  });
}

// grad_map: (B, H, W) upstream gradient for reduction none, else nullptr and
// grad_scale is the (already divided, for mean) scalar upstream gradient. The
// loss into `out` when wanted (the fused loss-and-gradient: one pass, not two).
template <typename scalar_t>
void fada_backward_kernel(const FadaProblem<scalar_t>& p, const at::opmath_type<scalar_t>* grad_map,
                          at::opmath_type<scalar_t> grad_scale, at::opmath_type<scalar_t>* part,
                          scalar_t* grad_disc, const LossOut<scalar_t>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = 2 * p.K, K = p.K, W = p.W;
  auto accumulate = [&](FadaScratch<scalar_t>& t, int64_t b, int64_t r, acc_t* top, acc_t* bottom) {
    t.drows.reset(p.disc + b * C * p.h * p.w);
    t.srows.reset(p.seg + b * K * p.hs * p.ws);
    out.start_rows(b * p.H + p.groups[r], b * p.H + p.groups[r + 1]);
    t.for_each_tile(p, p.groups[r], p.groups[r + 1], [&](int64_t y, int64_t x0, int64_t n) {
      const acc_t wy1 = p.dy.lambda[y];
      const acc_t wy0 = static_cast<acc_t>(1) - wy1;
      t.load_tile(p, y, x0, n);
      t.exp_sums(p, n, true);
      if (out.wanted()) t.tile_loss(p, b, y, x0, n, out);
      const acc_t* __restrict ep = t.e_dom.data();
      const acc_t* __restrict zp = t.z.data();
      const acc_t* __restrict ap = t.s.data();
      const acc_t* __restrict as = t.asum.data();
      const acc_t* __restrict sm = t.sum.data();
      acc_t* __restrict inv = t.aux.data();
      acc_t* __restrict gw = t.val.data();
      const int64_t pix = (b * p.H + y) * W + x0;
      for (int64_t x = 0; x < n; ++x) {
        inv[x] = static_cast<acc_t>(1) / sm[x];
        gw[x] = grad_scale;
      }
      if (grad_map != nullptr) {
        const acc_t* __restrict g = grad_map + pix;
        for (int64_t x = 0; x < n; ++x) gw[x] *= g[x];
      }
      if (p.weight != nullptr) {
        const acc_t* __restrict wt = p.weight + pix;
        for (int64_t x = 0; x < n; ++x) gw[x] *= wt[x];
      }
      for (int64_t c = 0; c < C; ++c) {
        acc_t* tc = top + c * W + x0;
        acc_t* bc = bottom + c * W + x0;
        if (c >= p.off && c < p.off + K) {
          grad_into(tc, bc, gw, as, ep + (c - p.off) * kTile, inv, ap + (c - p.off) * kTile, wy0, wy1, n);
        } else {
          grad_into_other(tc, bc, gw, as, zp + c * kTile, inv, wy0, wy1, n);
        }
      }
    });
  };
  adjoint_row_groups(p.B, p.h, p.groups, C, p.dx, part, grad_disc, [&] { return FadaScratch<scalar_t>(p); },
                     accumulate);
}

// The backward's launch: the gradient into grad_disc (contiguous), through
// per-group partials (adjoint_row_groups); `out` as fada_backward_kernel.
template <typename scalar_t>
void fada_gradient(const FadaProblem<scalar_t>& p, const at::opmath_type<scalar_t>* grad_map,
                   at::opmath_type<scalar_t> grad_scale, const LossOut<scalar_t>& out, at::Tensor& grad_disc) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor part = adjoint_partials<acc_t>(grad_disc);
  fada_backward_kernel<scalar_t>(p, grad_map, grad_scale, part.data_ptr<acc_t>(), grad_disc.data_ptr<scalar_t>(), out);
}

// The CPU launches; everything around them is common/fada_loss_host.h.
at::Tensor fada_loss_cpu(const at::Tensor& disc_logits, const at::Tensor& seg_logits, int64_t domain,
                         double temperature, double cap, int64_t out_h, int64_t out_w,
                         const c10::optional<at::Tensor>& weight, int64_t reduction, bool align_corners) {
  const host::FadaLossArgs a{domain, temperature, cap, out_h, out_w, reduction, align_corners};
  return host::fada_loss_forward(
      disc_logits, seg_logits, weight, a, "CPU kernel", disc_logits.device().is_cpu(),
      [&](const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt, at::Tensor& out) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, disc.scalar_type(), "fada_loss_cpu", [&] {
          FadaProblem<scalar_t> p(disc, seg, wt, a);
          write_loss<scalar_t>(out, p.B * p.H, reduction,
                               [&](const LossOut<scalar_t>& loss) { fada_forward_kernel<scalar_t>(p, loss); });
        });
      });
}

at::Tensor fada_loss_backward_cpu(const at::Tensor& grad_in, const at::Tensor& disc_logits,
                                  const at::Tensor& seg_logits, int64_t domain, double temperature, double cap,
                                  int64_t out_h, int64_t out_w, const c10::optional<at::Tensor>& weight,
                                  int64_t reduction, bool align_corners) {
  const host::FadaLossArgs a{domain, temperature, cap, out_h, out_w, reduction, align_corners};
  return host::fada_loss_backward(
      grad_in, disc_logits, seg_logits, weight, a, "CPU kernel", disc_logits.device().is_cpu(),
      [&](const at::Tensor& grad, const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt,
          at::Tensor& grad_disc) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, disc.scalar_type(), "fada_loss_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          FadaProblem<scalar_t> p(disc, seg, wt, a);
          if (reduction == 0) {
            fada_gradient<scalar_t>(p, grad.data_ptr<acc_t>(), acc_t(1), LossOut<scalar_t>(), grad_disc);
          } else {
            const acc_t scale = p.reduced_grad_scale(grad.data_ptr<acc_t>()[0], reduction);
            fada_gradient<scalar_t>(p, nullptr, scale, LossOut<scalar_t>(), grad_disc);
          }
        });
      });
}

// The loss and its gradient for an upstream 1 in one pass over the pixels:
// the same arithmetic as the forward and backward kernels, so the same bits.
std::tuple<at::Tensor, at::Tensor> fada_loss_with_grad_cpu(const at::Tensor& disc_logits,
                                                           const at::Tensor& seg_logits, int64_t domain,
                                                           double temperature, double cap, int64_t out_h,
                                                           int64_t out_w, const c10::optional<at::Tensor>& weight,
                                                           int64_t reduction, bool align_corners) {
  const host::FadaLossArgs a{domain, temperature, cap, out_h, out_w, reduction, align_corners};
  return host::fada_loss_with_grad(
      disc_logits, seg_logits, weight, a, "CPU kernel", disc_logits.device().is_cpu(),
      [&](const at::Tensor& disc, const at::Tensor& seg, const at::Tensor& wt, at::Tensor& out,
          at::Tensor& grad_disc) {
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, disc.scalar_type(), "fada_loss_with_grad_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          FadaProblem<scalar_t> p(disc, seg, wt, a);
          write_loss<scalar_t>(out, p.B * p.H, reduction, [&](const LossOut<scalar_t>& loss) {
            fada_gradient<scalar_t>(p, nullptr, p.reduced_grad_scale(acc_t(1), reduction), loss, grad_disc);
          });
        });
      });
}

}  // namespace
}  // namespace cpu
}  // namespace fada
