// Out-of-range labels on CUDA, caught on the device without a host sync.
//
// A per-pixel validity check on the host (the Python range check, a `.cpu()`
// of a flag) would synchronise the stream on every call and make a training
// step impossible to capture in a CUDA graph; a device assert would leave the
// CUDA context unusable. Instead:
//  - a kernel that meets a label outside [0, K) (and not ignore_index) writes
//    the label, K and ignore_index into a record in mapped (zero-copy) pinned
//    host memory, one record per op, and makes that call's result NaN (so no
//    wrong number is returned as a valid one);
//  - every later call of a fada_core CUDA op first looks at the records (a
//    plain host memory read, no sync) and raises a ValueError that names the op
//    and the label, then clears the record. `fada_core.check_label_errors()`
//    synchronises and does the same check at once.
// The CUDA context stays usable. When several pixels are bad, the record holds
// one of them (plain stores, no atomics on host memory: the reported label is
// one of the bad ones, whichever store lands last). Replays of a captured CUDA
// graph run no host code: what they record is raised by the next eager call or
// check_label_errors(). The records are allocated by the first call of an op,
// which must come before any capture (as torch's warm-up rule has it anyway).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>
#include <sstream>

#include "device_support.cuh"

namespace fada {
namespace cuda {

enum LabelOp : int { kCrossEntropyLabels = 0, kClassStatsLabels = 1, kLabelOps = 2 };

struct LabelErrorRecord {
  int64_t value;
  int64_t num_classes;
  int64_t ignore_index;
  int32_t pending;  // written last: the fields above are complete when the host sees 1
  int32_t unused;
};

// Device side: record a bad label (any thread; the last store wins).
__device__ __forceinline__ void record_bad_label(LabelErrorRecord* record, int64_t value, int64_t num_classes,
                                                 int64_t ignore_index) {
  record->value = value;
  record->num_classes = num_classes;
  record->ignore_index = ignore_index;
  __threadfence_system();  // the fields reach host memory before the flag
  *reinterpret_cast<volatile int32_t*>(&record->pending) = 1;
}

// The records, allocated once per process in mapped pinned memory: the same
// address on the host and (unified addressing) on every device. Allocate
// before capturing a CUDA graph (any earlier call of a fada_core CUDA op does).
inline LabelErrorRecord* label_error_records() {
  static LabelErrorRecord* records = [] {
    LabelErrorRecord* host = nullptr;
#ifdef FADA_CUDA_EMULATION
    static LabelErrorRecord storage[kLabelOps];
    host = storage;
#else
    C10_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host), sizeof(LabelErrorRecord) * kLabelOps,
                                 cudaHostAllocMapped | cudaHostAllocPortable));
#endif
    for (int op = 0; op < kLabelOps; ++op) host[op] = LabelErrorRecord{0, 0, 0, 0, 0};
    return host;
  }();
  return records;
}

inline LabelErrorRecord* label_error_record(LabelOp op) {
  return label_error_records() + op;
}

// Host side: raise for the first pending record (and clear it). Called at the
// start of every CUDA op; no synchronisation.
inline void raise_pending_label_errors() {
  static std::mutex mutex;
  static const char* const names[kLabelOps] = {"upsampled_cross_entropy", "class_center_stats"};
  LabelErrorRecord* records = label_error_records();
  for (int op = 0; op < kLabelOps; ++op) {
    volatile int32_t* pending = &records[op].pending;
    if (*pending == 0) continue;
    std::ostringstream message;
    {
      const std::lock_guard<std::mutex> lock(mutex);
      if (*pending == 0) continue;  // another thread reported it
      const LabelErrorRecord r = const_cast<const LabelErrorRecord&>(records[op]);
      *pending = 0;
      message << names[op] << ": labels must hold class indices in [0, " << r.num_classes
              << ") or ignore_index=" << r.ignore_index << "; found " << r.value
              << " (caught on the GPU by an earlier call, whose result was NaN)";
    }
    TORCH_CHECK_VALUE(false, message.str());
  }
}

}  // namespace cuda
}  // namespace fada
