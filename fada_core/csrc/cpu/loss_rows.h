// Where the CPU loss kernels (fada_loss_kernel.cpp, cross_entropy_kernel.cpp)
// put a loss: per pixel for reduction none, or per output row for mean / sum,
// reduced in a fixed order afterwards so that the result does not depend on
// the number of threads. The forward kernels and the fused loss-and-gradient
// kernels write it the same way, so they give the same bits.
//
// Included inside each instruction-set build's namespace (isa/kernels.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/upsample_rows.h"

namespace fada {
namespace cpu {

// Per pixel (`map`, reduction none), or per output row (sums, and counts of
// the pixels the mean divides by); all null when only a gradient is wanted.
template <typename scalar_t>
struct LossOut {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* map = nullptr;  // reduction none: the loss in acc_t (float32 for half inputs)
  double* row_sums = nullptr;
  int64_t* row_counts = nullptr;

  bool wanted() const { return map != nullptr || row_sums != nullptr; }

  // Output rows [row0, row1) start empty; called by the task that owns them.
  void start_rows(int64_t row0, int64_t row1) const {
    if (row_sums == nullptr) return;
    std::fill(row_sums + row0, row_sums + row1, 0.0);
    std::fill(row_counts + row0, row_counts + row1, int64_t(0));
  }

  // The loss of tile [pix, pix + n) of output row `row`, of which `count`
  // pixels count for the mean. Tiles of a row must arrive in increasing x.
  void add(int64_t pix, int64_t row, const acc_t* __restrict loss, int64_t n, int64_t count) const {
    if (map != nullptr) {
      std::copy(loss, loss + n, map + pix);
      return;
    }
    double tile_total = 0;
    for (int64_t x = 0; x < n; ++x) tile_total += static_cast<double>(loss[x]);
    row_sums[row] += tile_total;
    row_counts[row] += count;
  }
};

// Per-row sums and counts of a reduced loss, and their reduction in a fixed order.
struct RowTotals {
  std::vector<double> sums;
  std::vector<int64_t> counts;

  explicit RowTotals(int64_t rows)
      : sums(rows, debug_poison() ? std::numeric_limits<double>::quiet_NaN() : 0.0), counts(rows, 0) {}

  template <typename scalar_t>
  LossOut<scalar_t> out() {
    LossOut<scalar_t> o;
    o.row_sums = sums.data();
    o.row_counts = counts.data();
    return o;
  }

  // mean (reduction 1; NaN over no pixel, like torch) or sum (2)
  double finish(int64_t reduction) const {
    double total = 0;
    int64_t count = 0;
    for (size_t i = 0; i < sums.size(); ++i) {
      total += sums[i];
      count += counts[i];
    }
    if (reduction == 1) return count > 0 ? total / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN();
    return total;
  }
};

// Runs `kernel(const LossOut<scalar_t>&)`, which adds the loss of every output
// pixel, and puts the loss into `out`: per pixel for reduction none (0), else
// its mean (1) or sum (2) over the `rows` output rows, in a fixed order.
// Under FADA_CORE_DEBUG_POISON `out` starts as NaN.
template <typename scalar_t, typename Kernel>
void write_loss(at::Tensor& out, int64_t rows, int64_t reduction, const Kernel& kernel) {
  using acc_t = at::opmath_type<scalar_t>;
  if (debug_poison()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  if (reduction == 0) {
    LossOut<scalar_t> map;
    map.map = out.data_ptr<acc_t>();
    kernel(map);
    return;
  }
  RowTotals totals(rows);
  kernel(totals.out<scalar_t>());
  out.fill_(static_cast<acc_t>(totals.finish(reduction)));
}

}  // namespace cpu
}  // namespace fada
