// What the CUDA kernels need besides CUDA itself, written so that the same
// sources also compile as host code for the CPU emulation test
// (tests/cuda_emulation, FADA_CUDA_EMULATION defined): there CUDA threads are
// host threads, __syncthreads a barrier and a launch a loop over the blocks.
#pragma once

#include <ATen/ATen.h>

#ifdef FADA_CUDA_EMULATION
#include "cuda_emulation.h"
#define FADA_NOINLINE
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

// kernel<<<grid, block, shared bytes, stream>>>(args); the kernel comes last
// (its template arguments hold commas).
#define FADA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
// The block's dynamic shared memory as `type name[]`.
#define FADA_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
// A device function kept out of line (a rarely taken path).
#define FADA_NOINLINE __noinline__
#endif

namespace fada {
namespace cuda {

// Inputs of the CUDA ops must live here (the CPU under the emulation test).
inline bool on_kernel_device(const at::Tensor& t) {
#ifdef FADA_CUDA_EMULATION
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

}  // namespace cuda
}  // namespace fada
