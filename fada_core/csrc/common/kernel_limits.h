// Capability limits of the kernels, written once: the CUDA launch code sizes
// its shared memory with these functions, and Python asks for the same numbers
// through the operator fada_core::cuda_backward_max_channels (fada_core.cpp)
// instead of re-deriving them. Host code only; no CUDA needed to include it.
#pragma once

#include <cstdint>

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

}  // namespace limits
}  // namespace fada
