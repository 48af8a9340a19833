// FADA_HD marks the per-element math that the CPU and CUDA kernels share: the
// same inline function compiles for the host (CPU kernels, CPU tests) and for
// the device, so the CPU test suite exercises the formulas the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FADA_HD __host__ __device__ __forceinline__
#else
#define FADA_HD inline
#endif
