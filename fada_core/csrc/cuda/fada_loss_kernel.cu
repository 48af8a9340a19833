// Fused FADA loss on CUDA: forward and the gradient w.r.t. the low-resolution
// discriminator logits. The per-pixel math is fada_math.h's (shared with the
// CPU kernels); see cpu/fada_loss_kernel.cpp for the formulas and
// upsample_common.cuh for the deterministic backward design.
//
// Forward: one thread per output pixel, bilinear samples read straight from
// the (small, cache-resident) low-resolution inputs; "none" writes the map,
// mean/sum reduce per block in a fixed tree order and then in one block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <limits>

#include "../common/fada_math.h"
#include "upsample_common.cuh"

namespace fada {
namespace cuda {
namespace {

template <typename acc_t>
struct FadaGeometry {
  int64_t K, h, w, hs, ws, H, W, off;
  acc_t sdy, sdx, ssy, ssx;  // align_corners scales: disc rows/cols, seg rows/cols
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
                        scalar_t* __restrict__ out_map, acc_t* __restrict__ partials) {
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
      out_map[idx] = static_cast<scalar_t>(loss);
    } else {
      local += loss;
    }
  }
  if (partials != nullptr) {
    const acc_t block_total = block_sum(local, shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = block_total;
  }
}

// grad: the (B, H, W) map when grad_is_map, else a scalar divided by grad_div.
template <typename scalar_t, typename acc_t>
__global__ void fada_backward_kernel(const scalar_t* __restrict__ disc, const scalar_t* __restrict__ seg,
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

void check_inputs(const at::Tensor& disc, const at::Tensor& seg, int64_t domain, double temperature, int64_t out_h,
                  int64_t out_w, const c10::optional<at::Tensor>& weight, int64_t reduction) {
  TORCH_CHECK(disc.dim() == 4 && seg.dim() == 4, "fada_loss: disc_logits (B, 2K, h, w) and seg_logits (B, K, h, w) expected, got ",
              disc.sizes(), " and ", seg.sizes());
  TORCH_CHECK(on_kernel_device(disc) && seg.device() == disc.device(),
              "fada_loss (CUDA kernel): disc_logits and seg_logits must be on the same CUDA device, got ", disc.device(),
              " and ", seg.device());
  TORCH_CHECK(disc.scalar_type() == seg.scalar_type() && at::isFloatingType(disc.scalar_type()),
              "fada_loss: disc_logits and seg_logits must have the same floating dtype, got ", disc.scalar_type(), " and ",
              seg.scalar_type());
  TORCH_CHECK(disc.size(0) == seg.size(0), "fada_loss: batch sizes differ");
  TORCH_CHECK(seg.size(1) > 0 && disc.size(1) == 2 * seg.size(1), "fada_loss: disc_logits needs 2K = ", 2 * seg.size(1),
              " channels, got ", disc.size(1));
  TORCH_CHECK(disc.size(2) > 0 && disc.size(3) > 0 && seg.size(2) > 0 && seg.size(3) > 0, "fada_loss: empty spatial size");
  TORCH_CHECK(out_h > 0 && out_w > 0, "fada_loss: output size must be positive");
  TORCH_CHECK(domain == 0 || domain == 1, "fada_loss: domain must be 0 or 1, got ", domain);
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "fada_loss: reduction must be 0, 1 or 2, got ", reduction);
  TORCH_CHECK(temperature > 0, "fada_loss: temperature must be positive");
  TORCH_CHECK(disc.size(0) <= 65535 && disc.size(2) <= 65535, "fada_loss (CUDA kernel): batch and height must be <= 65535");
  if (weight.has_value()) {
    TORCH_CHECK(weight->device() == disc.device(), "fada_loss: weight must be on ", disc.device());
    TORCH_CHECK(at::isFloatingType(weight->scalar_type()), "fada_loss: weight must be floating point");
    TORCH_CHECK(weight->dim() == 3 && weight->size(0) == disc.size(0) && weight->size(1) == out_h &&
                    weight->size(2) == out_w,
                "fada_loss: weight must be (B, H, W), got ", weight->sizes());
  }
}

template <typename acc_t>
FadaGeometry<acc_t> geometry(const at::Tensor& disc, const at::Tensor& seg, int64_t domain, double temperature, double cap,
                             int64_t out_h, int64_t out_w) {
  FadaGeometry<acc_t> g;
  g.K = seg.size(1);
  g.h = disc.size(2);
  g.w = disc.size(3);
  g.hs = seg.size(2);
  g.ws = seg.size(3);
  g.H = out_h;
  g.W = out_w;
  g.off = domain == 0 ? 0 : g.K;
  g.sdy = align_corners_scale<acc_t>(g.h, out_h);
  g.sdx = align_corners_scale<acc_t>(g.w, out_w);
  g.ssy = align_corners_scale<acc_t>(g.hs, out_h);
  g.ssx = align_corners_scale<acc_t>(g.ws, out_w);
  g.inv_t = static_cast<acc_t>(1) / static_cast<acc_t>(temperature);
  g.cap = static_cast<acc_t>(cap);
  return g;
}

at::Tensor fada_loss_cuda(const at::Tensor& disc_logits, const at::Tensor& seg_logits, int64_t domain,
                          double temperature, double cap, int64_t out_h, int64_t out_w,
                          const c10::optional<at::Tensor>& weight, int64_t reduction) {
  check_inputs(disc_logits, seg_logits, domain, temperature, out_h, out_w, weight, reduction);
  c10::cuda::CUDAGuard guard(disc_logits.device());
  const at::Tensor disc = disc_logits.contiguous();
  const at::Tensor seg = seg_logits.contiguous();
  const int64_t B = disc.size(0);
  at::Tensor out = reduction == 0 ? at::empty({B, out_h, out_w}, disc.options()) : at::empty({}, disc.options());
  if (B == 0) {
    if (reduction != 0) out.fill_(reduction == 1 ? std::numeric_limits<double>::quiet_NaN() : 0.0);
    return out;
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, disc.scalar_type(), "fada_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor wt = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
    const FadaGeometry<acc_t> g = geometry<acc_t>(disc, seg, domain, temperature, cap, out_h, out_w);
    const int64_t total = B * out_h * out_w;
    const int64_t blocks = pixel_blocks(total);
    const acc_t* wptr = wt.defined() ? wt.data_ptr<acc_t>() : nullptr;
    if (reduction == 0) {
      FADA_LAUNCH(blocks, kReduceThreads, 0, stream, fada_forward_kernel<scalar_t, acc_t>)(
          disc.data_ptr<scalar_t>(), seg.data_ptr<scalar_t>(), wptr, g, B, out.data_ptr<scalar_t>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      at::Tensor partials = at::empty({blocks}, disc.options().dtype(acc_type));
      FADA_LAUNCH(blocks, kReduceThreads, 0, stream, fada_forward_kernel<scalar_t, acc_t>)(
          disc.data_ptr<scalar_t>(), seg.data_ptr<scalar_t>(), wptr, g, B, nullptr, partials.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const acc_t divisor = reduction == 1 ? static_cast<acc_t>(total) : static_cast<acc_t>(1);
      FADA_LAUNCH(1, kFinalThreads, 0, stream, reduce_partials_kernel<scalar_t, acc_t, acc_t>)(
          partials.data_ptr<acc_t>(), blocks, nullptr, divisor, out.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor fada_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& disc_logits, const at::Tensor& seg_logits,
                                   int64_t domain, double temperature, double cap, int64_t out_h, int64_t out_w,
                                   const c10::optional<at::Tensor>& weight, int64_t reduction) {
  check_inputs(disc_logits, seg_logits, domain, temperature, out_h, out_w, weight, reduction);
  TORCH_CHECK(grad.device() == disc_logits.device(), "fada_loss_backward: grad must be on ", disc_logits.device());
  const int64_t B = disc_logits.size(0);
  if (reduction == 0) {
    TORCH_CHECK(grad.dim() == 3 && grad.size(0) == B && grad.size(1) == out_h && grad.size(2) == out_w,
                "fada_loss_backward: grad must be (B, H, W) for reduction none, got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, "fada_loss_backward: grad must be a scalar, got ", grad.sizes());
  }
  c10::cuda::CUDAGuard guard(disc_logits.device());
  at::Tensor result = at::empty_like(disc_logits);
  if (B == 0) return result;
  const at::Tensor disc = disc_logits.contiguous();
  const at::Tensor seg = seg_logits.contiguous();
  at::Tensor grad_disc = disc_logits.is_contiguous() ? result : at::empty_like(disc);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, disc.scalar_type(), "fada_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor wt = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
    const at::Tensor g_acc = grad.to(acc_type).contiguous();
    const FadaGeometry<acc_t> g = geometry<acc_t>(disc, seg, domain, temperature, cap, out_h, out_w);
    const int64_t C = 2 * g.K;
    const AdjointConfig cfg = adjoint_config<acc_t>(C, g.w, g.W, fada_backward_kernel<scalar_t, acc_t>);
    at::Tensor part = at::empty({B * g.h * 2 * C * g.w}, disc.options().dtype(acc_type));
    const acc_t grad_div = reduction == 1 ? static_cast<acc_t>(B * out_h * out_w) : static_cast<acc_t>(1);
    const dim3 grid(static_cast<unsigned>(ceil_div(g.w, cfg.tj)), static_cast<unsigned>(g.h), static_cast<unsigned>(B));
    FADA_LAUNCH(grid, cfg.nx, cfg.smem, stream, fada_backward_kernel<scalar_t, acc_t>)(
        disc.data_ptr<scalar_t>(), seg.data_ptr<scalar_t>(), wt.defined() ? wt.data_ptr<acc_t>() : nullptr,
        g_acc.data_ptr<acc_t>(), reduction == 0, grad_div, g, cfg.tj, part.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = grad_disc.numel();
    FADA_LAUNCH(pixel_blocks(n), kReduceThreads, 0, stream, gather_partials_kernel<scalar_t, acc_t>)(
        part.data_ptr<acc_t>(), B, C, g.h, g.w, grad_disc.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!grad_disc.is_same(result)) result.copy_(grad_disc);
  return result;
}

}  // namespace
}  // namespace cuda
}  // namespace fada

#ifndef FADA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fada_core, CUDA, m) {
  m.impl("fada_loss", &fada::cuda::fada_loss_cuda);
  m.impl("fada_loss_backward", &fada::cuda::fada_loss_backward_cuda);
}
#endif
