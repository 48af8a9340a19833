// Which instruction-set build of the CPU kernels runs (see capability.h).
//
// At load time: FADA_CORE_CPU_CAPABILITY (default | avx2 | avx512) when this
// CPU can run it, otherwise the widest build this CPU can run. The choice and
// the reason are readable from Python through the extern "C" functions below
// (fada_core._build.cpu_capability(); `python -m fada_core.info` prints them);
// tests and benchmarks may switch builds at run time to hold each one to the
// reference.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "cpu/capability.h"

namespace fada {
namespace cpu_dispatch {
namespace {

// The builds this CPU can run, narrowest first.
std::vector<const Kernels*> runnable() {
  std::vector<const Kernels*> builds{&kDefault};
#if FADA_CPU_X86_ISAS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    builds.push_back(&kAvx2);
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      builds.push_back(&kAvx512);
  }
#endif
  return builds;
}

const Kernels* find(const std::vector<const Kernels*>& builds, const std::string& name) {
  for (const Kernels* k : builds)
    if (name == k->name) return k;
  return nullptr;
}

struct Active {
  std::atomic<const Kernels*> kernels{nullptr};
  std::mutex mutex;  // guards reason
  std::string reason;
};

Active& active() {
  static Active* state = [] {
    auto* a = new Active();  // never destroyed: kernels may run during interpreter shutdown
    const std::vector<const Kernels*> builds = runnable();
    const Kernels* widest = builds.back();
    const char* env = std::getenv("FADA_CORE_CPU_CAPABILITY");
    const std::string wanted = env ? env : "";
    const Kernels* chosen = wanted.empty() ? nullptr : find(builds, wanted);
    if (chosen != nullptr) {
      a->reason = "FADA_CORE_CPU_CAPABILITY=" + wanted;
    } else {
      chosen = widest;
      a->reason = std::string("the widest build this CPU runs");
      if (!wanted.empty()) {
        const bool known = wanted == "default" || wanted == "avx2" || wanted == "avx512";
        a->reason += known ? " (FADA_CORE_CPU_CAPABILITY=" + wanted + " ignored: this CPU or build lacks it)"
                           : " (FADA_CORE_CPU_CAPABILITY=" + wanted +
                                 " ignored: expected one of default, avx2, avx512)";
      }
    }
    a->kernels.store(chosen);
    return a;
  }();
  return *state;
}

const Kernels& kernels() { return *active().kernels.load(std::memory_order_relaxed); }

at::Tensor fada_loss(const at::Tensor& disc, const at::Tensor& seg, int64_t domain, double temperature, double cap,
                     int64_t out_h, int64_t out_w, const c10::optional<at::Tensor>& weight, int64_t reduction,
                     bool align_corners) {
  return kernels().fada_loss(disc, seg, domain, temperature, cap, out_h, out_w, weight, reduction, align_corners);
}

at::Tensor fada_loss_backward(const at::Tensor& grad, const at::Tensor& disc, const at::Tensor& seg, int64_t domain,
                              double temperature, double cap, int64_t out_h, int64_t out_w,
                              const c10::optional<at::Tensor>& weight, int64_t reduction, bool align_corners) {
  return kernels().fada_loss_backward(grad, disc, seg, domain, temperature, cap, out_h, out_w, weight, reduction,
                                      align_corners);
}

std::tuple<at::Tensor, at::Tensor> fada_loss_with_grad(const at::Tensor& disc, const at::Tensor& seg, int64_t domain,
                                                       double temperature, double cap, int64_t out_h, int64_t out_w,
                                                       const c10::optional<at::Tensor>& weight, int64_t reduction,
                                                       bool align_corners) {
  return kernels().fada_loss_with_grad(disc, seg, domain, temperature, cap, out_h, out_w, weight, reduction,
                                       align_corners);
}

at::Tensor upsampled_cross_entropy(const at::Tensor& logits, const at::Tensor& labels, double temperature,
                                   int64_t ignore_index, int64_t reduction, bool align_corners) {
  return kernels().upsampled_cross_entropy(logits, labels, temperature, ignore_index, reduction, align_corners);
}

at::Tensor upsampled_cross_entropy_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                            double temperature, int64_t ignore_index, int64_t reduction,
                                            bool align_corners) {
  return kernels().upsampled_cross_entropy_backward(grad, logits, labels, temperature, ignore_index, reduction,
                                                    align_corners);
}

std::tuple<at::Tensor, at::Tensor> upsampled_cross_entropy_with_grad(const at::Tensor& logits, const at::Tensor& labels,
                                                                     double temperature, int64_t ignore_index,
                                                                     int64_t reduction, bool align_corners) {
  return kernels().upsampled_cross_entropy_with_grad(logits, labels, temperature, ignore_index, reduction,
                                                     align_corners);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_center_stats(const at::Tensor& features,
                                                                  const at::Tensor& labels, int64_t num_classes,
                                                                  int64_t ignore_index) {
  return kernels().class_center_stats(features, labels, num_classes, ignore_index);
}

}  // namespace
}  // namespace cpu_dispatch
}  // namespace fada

TORCH_LIBRARY_IMPL(fada_core, CPU, m) {
  m.impl("fada_loss", &fada::cpu_dispatch::fada_loss);
  m.impl("fada_loss_backward", &fada::cpu_dispatch::fada_loss_backward);
  m.impl("fada_loss_with_grad", &fada::cpu_dispatch::fada_loss_with_grad);
  m.impl("upsampled_cross_entropy", &fada::cpu_dispatch::upsampled_cross_entropy);
  m.impl("upsampled_cross_entropy_backward", &fada::cpu_dispatch::upsampled_cross_entropy_backward);
  m.impl("upsampled_cross_entropy_with_grad", &fada::cpu_dispatch::upsampled_cross_entropy_with_grad);
  m.impl("class_center_stats", &fada::cpu_dispatch::class_center_stats);
}

// For fada_core._build (ctypes): no op schema, so the operator namespace only
// holds the math.
extern "C" {

// The build in use ("default", "avx2" or "avx512").
__attribute__((visibility("default"))) const char* fada_core_cpu_capability() {
  return fada::cpu_dispatch::kernels().name;
}

// Why it was chosen. The pointer stays valid until the next switch.
__attribute__((visibility("default"))) const char* fada_core_cpu_capability_reason() {
  auto& a = fada::cpu_dispatch::active();
  std::lock_guard<std::mutex> lock(a.mutex);
  return a.reason.c_str();
}

// The builds this CPU can run, narrowest first, comma-separated.
__attribute__((visibility("default"))) const char* fada_core_cpu_capabilities() {
  static const std::string names = [] {
    std::string s;
    for (const auto* k : fada::cpu_dispatch::runnable()) s += (s.empty() ? "" : ",") + std::string(k->name);
    return s;
  }();
  return names.c_str();
}

// Switch to the build `name` for the rest of the process (tests and
// benchmarks). Returns 0, or -1 (nothing changed) when this CPU cannot run it.
__attribute__((visibility("default"))) int fada_core_set_cpu_capability(const char* name) {
  const fada::cpu_dispatch::Kernels* k = fada::cpu_dispatch::find(fada::cpu_dispatch::runnable(), name);
  if (k == nullptr) return -1;
  auto& a = fada::cpu_dispatch::active();
  std::lock_guard<std::mutex> lock(a.mutex);
  a.kernels.store(k);
  a.reason = std::string("switched at run time to ") + name;
  return 0;
}

}  // extern "C"
