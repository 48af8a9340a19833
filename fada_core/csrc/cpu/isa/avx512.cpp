// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ: the set ATen's AVX512
// capability needs) with AVX2 + FMA (x86-64 with GCC; empty elsewhere).
#include "cpu/isa/prelude.h"

#if FADA_CPU_X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#define FADA_CPU_ISA fada_cpu_avx512
#define FADA_CPU_ISA_NAME "avx512"
#define FADA_CPU_TABLE kAvx512
#define FADA_CPU_ISA_AVX512 1
#include "cpu/isa/kernels.h"
#pragma GCC pop_options
#endif
