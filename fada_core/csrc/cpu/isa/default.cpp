// The CPU kernels for the baseline instruction set (x86-64: SSE2; aarch64: NEON).
// The compiler vectorises their per-pixel loops for it (see isa/kernels.h).
#include "cpu/isa/prelude.h"

#define FADA_CPU_ISA fada_cpu_default
#define FADA_CPU_ISA_NAME "default"
#define FADA_CPU_TABLE kDefault
#if FADA_CPU_X86_ISAS
#define FADA_CPU_ISA_SSE2 1  // x86-64's baseline: the class statistics' intrinsics path
#endif
#include "cpu/isa/kernels.h"
