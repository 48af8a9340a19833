// Per-pixel math of the FADA loss and the upsampled cross-entropy, written once
// for the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda). Every
// function is FADA_HD (host + device inline), so the CPU test suite exercises
// the formulas the GPU runs.
//
// All arithmetic happens in the accumulation type acc_t
// (at::opmath_type<scalar_t>: float for half/bfloat16/float, double for
// double).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "macros.h"

namespace fada {

// ---------------------------------------------------------------- bilinear

// One output index's source position along an axis:
// value = lerp(in[i0], in[i1], lambda).
template <typename acc_t>
struct LinearIndex {
  int64_t i0;
  int64_t i1;
  acc_t lambda;
};

// How output indices map to source positions along one axis, for either
// corner convention: src = scale * (dst + offset) - offset, clamped to >= 0.
// align_corners=True: scale = (in - 1) / (out - 1), offset 0 (src = scale * dst
// exactly); False: scale = in / out, offset 1/2 (pixel centres). Both are
// ATen's area_pixel_compute_scale / area_pixel_compute_source_index (non-cubic)
// for an output size without a scale factor, in acc_t. src, hence i0, is
// non-decreasing in dst either way, which the grouping of output rows by their
// lower source row and the CUDA binary searches rely on.
template <typename acc_t>
struct AxisMap {
  acc_t scale;
  acc_t offset;
};

template <typename acc_t>
FADA_HD AxisMap<acc_t> axis_map(int64_t in_size, int64_t out_size, bool align_corners) {
  AxisMap<acc_t> m;
  if (align_corners) {
    m.scale = out_size > 1 ? static_cast<acc_t>(in_size - 1) / static_cast<acc_t>(out_size - 1)
                           : static_cast<acc_t>(0);
    m.offset = static_cast<acc_t>(0);
  } else {
    m.scale = static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
    m.offset = static_cast<acc_t>(0.5);
  }
  return m;
}

// i0 = floor(src) clamped to the input, i1 = min(i0 + 1, in - 1),
// lambda = src - i0 clamped to [0, 1] (as ATen's upsample_bilinear2d).
template <typename acc_t>
FADA_HD LinearIndex<acc_t> source_index(const AxisMap<acc_t>& map, int64_t dst, int64_t in_size) {
  acc_t src = map.scale * (static_cast<acc_t>(dst) + map.offset) - map.offset;
  src = src < static_cast<acc_t>(0) ? static_cast<acc_t>(0) : src;
  int64_t i0 = static_cast<int64_t>(src);  // src >= 0: truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  const int64_t i1 = i0 + 1 < in_size ? i0 + 1 : in_size - 1;
  acc_t lambda = src - static_cast<acc_t>(i0);
  lambda = lambda > static_cast<acc_t>(1) ? static_cast<acc_t>(1) : lambda;
  LinearIndex<acc_t> r;
  r.i0 = i0;
  r.i1 = i1;
  r.lambda = lambda;
  return r;
}

// (1 - lambda) * a + lambda * b, the form ATen's bilinear kernels use. Its
// adjoint sends (1 - lambda) * g to a and lambda * g to b.
template <typename acc_t>
FADA_HD acc_t lerp(acc_t a, acc_t b, acc_t lambda) {
  return (static_cast<acc_t>(1) - lambda) * a + lambda * b;
}

// Bilinear sample of one (h, w) plane: horizontal lerps of the two source rows,
// then the vertical lerp (the order the CPU row pipeline uses too).
template <typename acc_t, typename scalar_t>
FADA_HD acc_t bilinear_sample(const scalar_t* plane, int64_t w, const LinearIndex<acc_t>& iy,
                              const LinearIndex<acc_t>& ix) {
  const scalar_t* r0 = plane + iy.i0 * w;
  const scalar_t* r1 = plane + iy.i1 * w;
  const acc_t top = lerp(static_cast<acc_t>(r0[ix.i0]), static_cast<acc_t>(r0[ix.i1]), ix.lambda);
  const acc_t bot = lerp(static_cast<acc_t>(r1[ix.i0]), static_cast<acc_t>(r1[ix.i1]), ix.lambda);
  return lerp(top, bot, iy.lambda);
}

// ---------------------------------------------------------------- softmax pieces

// Running maximum for a logsumexp. A NaN operand may be dropped here (this
// compiles to one max instruction); the NaN still reaches the result through
// exp(z - max) in the sum.
template <typename acc_t>
FADA_HD acc_t running_max(acc_t a, acc_t b) {
  return b > a ? b : a;
}

template <typename acc_t>
FADA_HD acc_t exp_acc(acc_t x) {
  return ::exp(x);
}
template <>
FADA_HD float exp_acc<float>(float x) {
  return ::expf(x);
}
template <typename acc_t>
FADA_HD acc_t log_acc(acc_t x) {
  return ::log(x);
}
template <>
FADA_HD float log_acc<float>(float x) {
  return ::logf(x);
}

// Streaming max / sum-of-exp over channels (device path): after all channels,
// logsumexp = m + log(s). NaN anywhere makes s NaN.
template <typename acc_t>
FADA_HD void online_logsumexp(acc_t& m, acc_t& s, acc_t z) {
  if (z > m) {
    s = s * exp_acc(m - z) + static_cast<acc_t>(1);
    m = z;
  } else if (z != -std::numeric_limits<acc_t>::infinity()) {  // NaN z makes s NaN
    s += exp_acc(z - m);
  }
}

// Soft label entry min(softmax_c, cap) from e_c = exp(s_c/T - max) and
// 1/sum_c e_c. NaN stays NaN (like clamp(max=cap)).
template <typename acc_t>
FADA_HD acc_t soft_label(acc_t e, acc_t inv_sum, acc_t cap) {
  const acc_t p = e * inv_sum;
  return p > cap ? cap : p;
}

// One class's share of the soft-label cross-entropy: -a * log_softmax(z)_c,
// with log_softmax(z)_c = (z_c - max) - log(sum_c exp(z_c - max)) computed in
// that order (as torch does), so a dominant class loses no precision.
template <typename acc_t>
FADA_HD acc_t fada_loss_term(acc_t a, acc_t z, acc_t max, acc_t log_sum) {
  return a * (log_sum - (z - max));
}

// d loss / d z_c for one pixel: (sum_c a_c) * softmax(z)_c - y_c, where y is
// the 2K-channel encoding (a in the domain's half, 0 in the other).
template <typename acc_t>
FADA_HD acc_t fada_grad_term(acc_t a_sum, acc_t p, acc_t y) {
  return a_sum * p - y;
}

// Cross-entropy of one pixel: -log_softmax(z)_label = log_sum - (z_label - max).
template <typename acc_t>
FADA_HD acc_t ce_loss_term(acc_t max, acc_t log_sum, acc_t z_label) {
  return log_sum - (z_label - max);
}

// d CE / d z_c: softmax(z)_c - [c == label].
template <typename acc_t>
FADA_HD acc_t ce_grad_term(acc_t p, bool is_label) {
  return is_label ? p - static_cast<acc_t>(1) : p;
}

// ---------------------------------------------------------------- CPU-only vector math
#if !defined(__CUDACC__) && !defined(__HIPCC__)
namespace cpu {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// exp(x) in float without libm calls, so that loops over it vectorise
// (std::exp does not without -ffast-math, which would break NaN handling).
// Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r, then
// 2^n applied in two halves so every intermediate is a normal float. Max error
// about 2 ulp; +inf -> inf, -inf -> 0, NaN -> NaN, overflow -> inf, results
// below the denormal range -> 0.
inline float vexp(float x) {
  const float hi = 88.7228394f;   // log(FLT_MAX)
  const float lo = -103.972084f;  // log(smallest denormal / 2)
  float xc = x < lo ? lo : x;     // comparisons are false for NaN: NaN passes
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // n as an integer, read from t's low mantissa bits (no float->int conversion)
  const int32_t ni = static_cast<int32_t>(bits_of(t) - bits_of(magic));
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  const float s1 = float_of((static_cast<uint32_t>(n1) + 127u) << 23);
  const float s2 = float_of((static_cast<uint32_t>(n2) + 127u) << 23);
  float y = (p * s1) * s2;
  y = x > hi ? std::numeric_limits<float>::infinity() : y;
  y = x < lo ? 0.0f : y;
  return y;
}

inline double vexp(double x) {
  return std::exp(x);
}

// exp(x) for x <= 0 (or NaN), cheaper than vexp: the kernels only take exps
// of (value - max). Results below FLT_MIN (x < -87.34) are flushed to 0; NaN
// stays NaN; positive x is outside the domain.
inline float vexp_nonpos(float x) {
  const float lo = -87.3365447f;  // log(FLT_MIN)
  const float xc = x < lo ? lo : x;
  const float magic = 12583039.0f;  // 1.5 * 2^23 + 127: rounds, and adds the exponent bias
  const float t = xc * 1.44269504088896341f + magic;
  const float n = t - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = float_of(bits_of(t) << 23);  // 2^n: t's low bits hold n + 127
  const float y = p * scale;
  return x < lo ? 0.0f : y;
}

inline double vexp_nonpos(double x) {
  return std::exp(x);
}

// log(x) for float without libm calls (vectorisable). Cephes logf: x = m 2^e
// with m in [sqrt(1/2), sqrt(2)), polynomial in m - 1; ~1 ulp for positive
// normal x. Domain is what the kernels need, the log of a sum of exps that is
// >= 1: NaN -> NaN and +inf -> NaN (through x - x, since a select here stops
// GCC from vectorising the loop); zero, negative and denormal x are not handled.
inline float vlog(float x) {
  const uint32_t u = bits_of(x);
  int32_t e = static_cast<int32_t>((u >> 23) & 0xffu) - 127;
  float m = float_of((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const float half_m = m * 0.5f;
  const bool big = m > 1.41421356237f;
  m = big ? half_m : m;
  e += static_cast<int32_t>(big);
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float ef = static_cast<float>(e);
  float y = p * f * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  float res = f + y;
  res = res + ef * 0.693359375f;
  return res + (x - x);  // NaN for NaN and inf, +0 otherwise
}

inline double vlog(double x) {
  return std::log(x);
}

}  // namespace cpu
#endif

}  // namespace fada
