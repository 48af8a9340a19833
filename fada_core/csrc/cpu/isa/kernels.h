// The body of one instruction-set build of the CPU kernels. The including
// isa/<name>.cpp first includes isa/prelude.h, opens its `#pragma GCC target`
// region, and defines
//   FADA_CPU_ISA        the namespace every kernel of this build lives in,
//   FADA_CPU_ISA_NAME   its FADA_CORE_CPU_CAPABILITY name,
//   FADA_CPU_TABLE      the Kernels table it defines (capability.h),
// and FADA_CPU_ISA_SSE2 / _AVX2 / _AVX512 where the build has them (the
// class-statistics kernel's intrinsics path). The kernel sources see their
// usual namespaces (fada::cpu, fada_core) nested in FADA_CPU_ISA, so no
// function of one build can be mistaken for another's at link time.
//
// No include guard: included once per build.

namespace FADA_CPU_ISA {
#include "cpu/class_stats_kernel.cpp"
#include "cpu/cross_entropy_kernel.cpp"
#include "cpu/fada_loss_kernel.cpp"
}  // namespace FADA_CPU_ISA

namespace fada {
namespace cpu_dispatch {
extern const Kernels FADA_CPU_TABLE = {
    FADA_CPU_ISA_NAME,
    &::FADA_CPU_ISA::fada::cpu::fada_loss_cpu,
    &::FADA_CPU_ISA::fada::cpu::fada_loss_backward_cpu,
    &::FADA_CPU_ISA::fada::cpu::fada_loss_with_grad_cpu,
    &::FADA_CPU_ISA::fada::cpu::upsampled_cross_entropy_cpu,
    &::FADA_CPU_ISA::fada::cpu::upsampled_cross_entropy_backward_cpu,
    &::FADA_CPU_ISA::fada::cpu::upsampled_cross_entropy_with_grad_cpu,
    &::FADA_CPU_ISA::fada_core::class_center_stats_cpu,
};
}  // namespace cpu_dispatch
}  // namespace fada
