// Which exp to vectorise the CPU kernels' softmax loops with, per instruction set: the kernels' own
// polynomial (fada::cpu::vexp_nonpos, plain C++ the compiler vectorises) against ATen's
// at::vec::Vectorized<float>::exp_u20 (hand-written intrinsics) and ::exp (Sleef, 1 ulp). The loop is
// the kernels' exp_sum_into over one tile (38 channels x 256 pixels). Build and run (RESULTS.md has
// the figures):
//
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   for isa in DEFAULT AVX2 AVX512; do
//     case $isa in DEFAULT) f="";; AVX2) f="-mavx2 -mfma";;
//                  AVX512) f="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma";; esac
//     g++ -O3 -fno-trapping-math -std=c++20 $f -DCPU_CAPABILITY=$isa -DCPU_CAPABILITY_$isa \
//       -I$T/include -Ifada_core/csrc benchmarks/exp_vectorization.cpp -o /tmp/exp_$isa \
//       -L$T/lib -ltorch_cpu -lc10 -Wl,-rpath,$T/lib && /tmp/exp_$isa
//   done
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "common/fada_math.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kPixels = 256, kChannels = 38;

// sum[x] += exp(z[c][x] - m[x]) over all channels c, with the kernels' exp.
__attribute__((noinline)) void kernels_exp(float* __restrict sum, const float* __restrict z,
                                           const float* __restrict m) {
  for (int c = 0; c < kChannels; ++c)
    for (int x = 0; x < kPixels; ++x) sum[x] += fada::cpu::vexp_nonpos(z[c * kPixels + x] - m[x]);
}

// The same with ATen's Vectorized: exp_u20 (kSleef false) or the Sleef exp (kSleef true).
template <bool kSleef>
__attribute__((noinline)) void aten_exp(float* __restrict sum, const float* __restrict z, const float* __restrict m) {
  for (int c = 0; c < kChannels; ++c)
    for (int x = 0; x < kPixels; x += Vec::size()) {
      const Vec d = Vec::loadu(z + c * kPixels + x) - Vec::loadu(m + x);
      (Vec::loadu(sum + x) + (kSleef ? d.exp() : d.exp_u20())).store(sum + x);
    }
}

// Best of 30 runs of 200 calls, in ns per exp.
template <typename F>
double best_ns(F f, float* sum, const float* z, const float* m) {
  double best = 1e9;
  for (int r = 0; r < 30; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 200; ++i) f(sum, z, m);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s / 200 / (kPixels * kChannels) * 1e9);
  }
  return best;
}

}  // namespace

int main() {
  std::vector<float> z(kPixels * kChannels), m(kPixels, 4.f), sum(kPixels, 0.f);
  std::mt19937 gen(1);
  std::normal_distribution<float> normal(0, 3);
  for (auto& v : z) v = normal(gen);
  for (int r = 0; r < 3; ++r)
    std::printf("ns per exp: kernels' vexp_nonpos %.3f | Vectorized::exp_u20 %.3f | Vectorized::exp (Sleef) %.3f\n",
                best_ns(kernels_exp, sum.data(), z.data(), m.data()),
                best_ns(aten_exp<false>, sum.data(), z.data(), m.data()),
                best_ns(aten_exp<true>, sum.data(), z.data(), m.data()));
  return sum[0] > 0 ? 0 : 1;
}
