// Upsampled cross-entropy on CUDA: CrossEntropyLoss(upsample(logits) / T,
// labels, ignore_index) and its gradient w.r.t. the low-resolution logits,
// with the per-pixel math of fada_math.h and the deterministic backward of
// upsample_common.cuh. "mean" divides by the number of non-ignored pixels,
// counted on the device (integer atomics: exact, order-independent), so no
// host synchronisation is needed. Labels outside [0, K) are recorded for the
// host (label_errors.cuh) and make the loss and gradient NaN.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <limits>

#include "../common/cross_entropy_host.h"
#include "../common/fada_math.h"
#include "label_errors.cuh"
#include "upsample_common.cuh"

namespace fada {
namespace cuda {
namespace {

template <typename acc_t>
struct CeGeometry {
  int64_t K, h, w, H, W, ignore_index;
  acc_t sy, sx, inv_t;
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
                      int64_t B, scalar_t* __restrict__ out_map, acc_t* __restrict__ partials) {
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

// What only this backend limits (grid dimensions y and z).
void check_cuda_limits(const at::Tensor& logits) {
  TORCH_CHECK(logits.size(0) <= 65535 && logits.size(2) <= 65535,
              "upsampled_cross_entropy (CUDA kernel): batch and height must be <= 65535");
}

template <typename acc_t>
CeGeometry<acc_t> geometry(const at::Tensor& logits, const at::Tensor& labels, double temperature, int64_t ignore) {
  CeGeometry<acc_t> g;
  g.K = logits.size(1);
  g.h = logits.size(2);
  g.w = logits.size(3);
  g.H = labels.size(1);
  g.W = labels.size(2);
  g.ignore_index = ignore;
  g.sy = align_corners_scale<acc_t>(g.h, g.H);
  g.sx = align_corners_scale<acc_t>(g.w, g.W);
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

// The CUDA launches; everything around them is common/cross_entropy_host.h.
at::Tensor upsampled_cross_entropy_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in, double temperature,
                                        int64_t ignore_index, int64_t reduction) {
  raise_pending_label_errors();
  return host::upsampled_cross_entropy_forward(
      logits_in, labels_in, temperature, reduction, "CUDA kernel", on_kernel_device(logits_in),
      [&](const at::Tensor& logits, const at::Tensor& labels, at::Tensor& out) {
        check_cuda_limits(logits);
        c10::cuda::CUDAGuard guard(logits.device());
        cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        const int64_t B = labels.size(0), H = labels.size(1), W = labels.size(2);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "upsampled_cross_entropy_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
          const CeGeometry<acc_t> g = geometry<acc_t>(logits, labels, temperature, ignore_index);
          const int64_t total = B * H * W;
          const int64_t blocks = pixel_blocks(total);
          if (reduction == 0) {
            FADA_LAUNCH(blocks, kReduceThreads, 0, stream, ce_forward_kernel<scalar_t, acc_t>)(
                logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), g, B, out.data_ptr<scalar_t>(), nullptr);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
          at::Tensor partials = at::empty({blocks}, logits.options().dtype(acc_type));
          FADA_LAUNCH(blocks, kReduceThreads, 0, stream, ce_forward_kernel<scalar_t, acc_t>)(
              logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), g, B, nullptr, partials.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          // "mean": divided by the non-ignored pixels counted on the device (0 / 0 = NaN, like torch)
          const at::Tensor count = reduction == 1 ? count_valid(labels, ignore_index, stream) : at::Tensor();
          FADA_LAUNCH(1, kFinalThreads, 0, stream, reduce_partials_kernel<scalar_t, acc_t, int64_t>)(
              partials.data_ptr<acc_t>(), blocks, count.defined() ? count.data_ptr<int64_t>() : nullptr,
              static_cast<acc_t>(1), out.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

at::Tensor upsampled_cross_entropy_backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits_in,
                                                 const at::Tensor& labels_in, double temperature, int64_t ignore_index,
                                                 int64_t reduction) {
  raise_pending_label_errors();
  return host::upsampled_cross_entropy_backward(
      grad_in, logits_in, labels_in, temperature, reduction, "CUDA kernel", on_kernel_device(logits_in),
      [&](const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, at::Tensor& grad_logits) {
        check_cuda_limits(logits);
        c10::cuda::CUDAGuard guard(logits.device());
        cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        const int64_t B = labels.size(0);
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                        "upsampled_cross_entropy_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
          const CeGeometry<acc_t> g = geometry<acc_t>(logits, labels, temperature, ignore_index);
          const at::Tensor g_acc = grad.to(acc_type).contiguous();
          at::Tensor count;
          if (reduction == 1) count = count_valid(labels, ignore_index, stream);
          const int64_t C = g.K;
          const AdjointConfig cfg = adjoint_config<acc_t>(C, g.w, g.W, ce_backward_kernel<scalar_t, acc_t>);
          at::Tensor part = at::empty({B * g.h * 2 * C * g.w}, logits.options().dtype(acc_type));
          const dim3 grid(static_cast<unsigned>(ceil_div(g.w, cfg.tj)), static_cast<unsigned>(g.h),
                          static_cast<unsigned>(B));
          FADA_LAUNCH(grid, cfg.nx, cfg.smem, stream, ce_backward_kernel<scalar_t, acc_t>)(
              logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), g_acc.data_ptr<acc_t>(), reduction == 0,
              count.defined() ? reinterpret_cast<const unsigned long long*>(count.data_ptr<int64_t>()) : nullptr, g,
              cfg.tj, part.data_ptr<acc_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          const int64_t n = grad_logits.numel();
          FADA_LAUNCH(pixel_blocks(n), kReduceThreads, 0, stream, gather_partials_kernel<scalar_t, acc_t>)(
              part.data_ptr<acc_t>(), B, C, g.h, g.w, grad_logits.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
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
}
#endif
