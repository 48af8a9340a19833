// The CPU kernels compiled for AVX2 + FMA (x86-64 with GCC; empty elsewhere).
#include "cpu/isa/prelude.h"

#if FADA_CPU_X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FADA_CPU_ISA fada_cpu_avx2
#define FADA_CPU_ISA_NAME "avx2"
#define FADA_CPU_TABLE kAvx2
#define FADA_CPU_ISA_AVX2 1
#include "cpu/isa/kernels.h"
#pragma GCC pop_options
#endif
