// The CPU kernels are compiled once per instruction set (isa/*.cpp) and one
// build is picked at run time (dispatch.cpp), as ATen does with CPU_CAPABILITY.
// Each build fills one table of entry points; dispatch.cpp registers forwarders
// that call the active table.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

// x86-64 builds for AVX2 and AVX-512 exist with GCC, whose `#pragma GCC target`
// compiles one region of a translation unit for a wider instruction set. Other
// compilers and architectures (aarch64: NEON is its baseline) get the default
// build only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FADA_CPU_X86_ISAS 1
#else
#define FADA_CPU_X86_ISAS 0
#endif

namespace fada {
namespace cpu_dispatch {

struct Kernels {
  const char* name;  // "default", "avx2", "avx512": the FADA_CORE_CPU_CAPABILITY values
  // the last bool of the loss entries: align_corners
  at::Tensor (*fada_loss)(const at::Tensor&, const at::Tensor&, int64_t, double, double, int64_t, int64_t,
                          const c10::optional<at::Tensor>&, int64_t, bool);
  at::Tensor (*fada_loss_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                   int64_t, int64_t, const c10::optional<at::Tensor>&, int64_t, bool);
  std::tuple<at::Tensor, at::Tensor> (*fada_loss_with_grad)(const at::Tensor&, const at::Tensor&, int64_t, double,
                                                           double, int64_t, int64_t,
                                                           const c10::optional<at::Tensor>&, int64_t, bool);
  at::Tensor (*upsampled_cross_entropy)(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, bool);
  at::Tensor (*upsampled_cross_entropy_backward)(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                 int64_t, int64_t, bool);
  std::tuple<at::Tensor, at::Tensor> (*upsampled_cross_entropy_with_grad)(const at::Tensor&, const at::Tensor&, double,
                                                                         int64_t, int64_t, bool);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*class_center_stats)(const at::Tensor&, const at::Tensor&, int64_t,
                                                                       int64_t);
};

extern const Kernels kDefault;  // isa/default.cpp
#if FADA_CPU_X86_ISAS
extern const Kernels kAvx2;    // isa/avx2.cpp
extern const Kernels kAvx512;  // isa/avx512.cpp
#endif

}  // namespace cpu_dispatch
}  // namespace fada
