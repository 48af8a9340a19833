// Capability limits of the kernels, written once: the CUDA launch code sizes
// its shared memory with these functions, and Python asks for the same numbers
// through the operators fada_core::cuda_backward_max_channels and
// fada_core::cuda_staged_max_classes (fada_core.cpp) instead of re-deriving
// them. No CUDA needed to include it (staged_layout is also device code).
#pragma once

#include <cstdint>

#include "macros.h"

namespace fada {
namespace limits {

// Threads (output columns) of the smallest upsampling-adjoint tile.
constexpr int64_t kAdjointMinThreads = 32;

// Dynamic shared memory of one upsampling-adjoint block (cuda/upsample_common.cuh):
// top/bottom rows [C][nx] and accumulators [2][C][tj] of acc_bytes each, plus
// the column ranges [2][tj] (int64).
constexpr int64_t adjoint_shared_bytes(int64_t channels, int64_t nx, int64_t tj, int64_t acc_bytes) {
  return (2 * channels * nx + 2 * channels * tj) * acc_bytes + 2 * tj * static_cast<int64_t>(sizeof(int64_t));
}

// The most low-resolution channels the CUDA backward takes within
// `shared_bytes` of shared memory per block (its smallest tile: 32 threads, one
// source column); 0 if none.
constexpr int64_t cuda_backward_max_channels(int64_t acc_bytes, int64_t shared_bytes) {
  const int64_t fixed = adjoint_shared_bytes(0, kAdjointMinThreads, 1, acc_bytes);
  const int64_t per_channel = adjoint_shared_bytes(1, kAdjointMinThreads, 1, acc_bytes) - fixed;
  return shared_bytes > fixed ? (shared_bytes - fixed) / per_channel : 0;
}

// Threads (output columns) of the smallest and the largest staged block
// (cuda/staged_rows.cuh).
constexpr int64_t kStagedMinThreads = 32;
constexpr int64_t kStagedMaxThreads = 128;

// What a staged kernel keeps in shared memory: per class, the channels it
// stages and those it accumulates a gradient for; besides its dynamic shared
// memory, static block sums of kStagedMaxThreads values (the loss in the
// accumulation type, plus count_bytes per thread for a count).
struct StagedFootprint {
  int64_t staged_per_class, grads_per_class, count_bytes;
};
// (functions, not variables: device code may call them)
FADA_HD constexpr StagedFootprint fada_staged_footprint() { return {3, 2, 0}; }  // disc 2K + seg K; gradient of disc 2K
FADA_HD constexpr StagedFootprint ce_staged_footprint() { return {1, 1, 8}; }    // logits K; valid-pixel counts (64-bit)

// Shared accumulators of a staged block's horizontal adjoint (cuda/staged_rows.cuh
// staged_adjoint): hacc[2][channels][2][ns_max] values, set by the block's
// first chunk. Half 0 ("own") holds, at [c][top|bottom][jj], the (1 - lambda)-
// weighted sums of the columns whose i0 is j0 + jj; half 1 ("next") their
// lambda-weighted sums, which belong to source column j0 + jj + 1 (at the
// clamped last column, i1 == i0, both stay in "own"). Each entry has one
// writer, so no barrier separates the two.
FADA_HD constexpr int64_t staged_hacc_size(int64_t channels, int64_t ns_max) { return 2 * channels * 2 * ns_max; }

// Dynamic shared memory of one staged block of `classes` classes, in bytes
// from its start: per-thread columns td[staged][nx] and gradient sums
// gacc[grads][nx] (two values each), the staged rows raw[staged][2][tj + 1],
// the per-source-column sums hacc[2][grads][2][tj + 1], column weights colw[nx]
// (acc_bytes each), then the ints colstart[tj + 2] and rows[2].
struct StagedLayout {
  int64_t td, gacc, raw, hacc, colw, colstart, rows, bytes;
};

FADA_HD constexpr StagedLayout staged_layout(StagedFootprint k, int64_t classes, int64_t nx, int64_t tj,
                                             int64_t acc_bytes) {
  const int64_t staged = k.staged_per_class * classes, grads = k.grads_per_class * classes, ns = tj + 1;
  StagedLayout l{};
  l.td = 0;
  l.gacc = l.td + staged * nx * 2 * acc_bytes;
  l.raw = l.gacc + grads * nx * 2 * acc_bytes;
  l.hacc = l.raw + staged * 2 * ns * acc_bytes;
  l.colw = l.hacc + staged_hacc_size(grads, ns) * acc_bytes;
  l.colstart = l.colw + nx * acc_bytes;
  l.rows = l.colstart + (ns + 1) * static_cast<int64_t>(sizeof(int));
  l.bytes = l.rows + 2 * static_cast<int64_t>(sizeof(int));
  return l;
}

// Static shared memory of a staged kernel (its block sums).
constexpr int64_t staged_static_bytes(StagedFootprint k, int64_t acc_bytes) {
  return kStagedMaxThreads * (acc_bytes + k.count_bytes);
}

// The most classes a staged kernel takes within `shared_bytes` of shared
// memory per block (the device's opt-in limit; its smallest block: 32
// threads, one source column); 0 if none. Beyond it the general kernels run.
constexpr int64_t cuda_staged_max_classes(StagedFootprint k, int64_t acc_bytes, int64_t shared_bytes) {
  const int64_t fixed = staged_static_bytes(k, acc_bytes) + staged_layout(k, 0, kStagedMinThreads, 1, acc_bytes).bytes;
  const int64_t per_class = staged_layout(k, 1, kStagedMinThreads, 1, acc_bytes).bytes -
                            staged_layout(k, 0, kStagedMinThreads, 1, acc_bytes).bytes;
  return shared_bytes > fixed ? (shared_bytes - fixed) / per_class : 0;
}

}  // namespace limits
}  // namespace fada
