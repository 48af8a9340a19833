// Per-class feature statistics math shared by the CPU and CUDA kernels of
// class_center_stats (FADA_HD: the same inline code on host and device).
//
// Accuracy with a large common offset: every class k gets a shift s_k (the
// feature vector of one of its pixels: the first one each kernel visits), and
// the kernels accumulate, per class and channel, in float64,
//     S = Σ x,   Q = Σ (x − s)².
// Then mean = S/n, and the centred sum of squares is Q − (S − n·s)²/n, which
// only cancels at the scale of the class's spread, not of the offset. S needs
// no shift: float32 values of a few binades sum exactly in float64 (24-bit
// significands, 53-bit sums), and otherwise its error is that of a plain
// float64 mean. Q may be summed over channels before finishing (the CPU
// kernel does).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace fada_core {
namespace stats {

// Which accumulator slot a label goes to: the class itself, `num_classes` (a
// dump slot) for ignore_index, or -1 for an invalid label.
FADA_HD int64_t label_slot(int64_t label, int64_t num_classes, int64_t ignore_index) {
  if (label == ignore_index) return num_classes;
  return (label >= 0 && label < num_classes) ? label : -1;
}

// One sample into the accumulators. T is double, or a vector of doubles
// (GCC/Clang vector extension) for several channels at once.
template <typename T>
FADA_HD void accumulate(T x, T shift, T& sum, T& sq) {
  const T d = x - shift;
  sum += x;
  sq += d * d;
}

// Mean of a class's channel from its sum; 0 for an absent class.
FADA_HD double finish_mean(double sum, double n) { return n > 0.0 ? sum / n : 0.0; }

// (S − n·s)²/n: what the shift adds to one channel's Q over the centred sum of
// squares; 0 for an absent class.
FADA_HD double shift_excess(double sum, double shift, double n) {
  if (!(n > 0.0)) return 0.0;
  const double d = sum - n * shift;
  return d * (d / n);
}

// Centred sum of squares from Q and the matching shift excess (per channel or
// summed over channels), clamped at 0 against rounding.
FADA_HD double finish_m2(double sq, double excess) {
  const double m2 = sq - excess;
  return m2 > 0.0 ? m2 : 0.0;
}

// Chan et al.'s merge of two summaries (n, mean, m2) of one channel, in place
// into (n_a, mean_a, m2_a): exact for disjoint sample sets.
FADA_HD void chan_merge(double& n_a, double& mean_a, double& m2_a, double n_b, double mean_b,
                        double m2_b) {
  const double n = n_a + n_b;
  if (!(n_b > 0.0)) return;
  if (!(n_a > 0.0)) {
    n_a = n_b;
    mean_a = mean_b;
    m2_a = m2_b;
    return;
  }
  const double delta = mean_b - mean_a;
  mean_a += delta * (n_b / n);
  m2_a += m2_b + delta * delta * (n_a * n_b / n);
  n_a = n;
}

}  // namespace stats
}  // namespace fada_core
