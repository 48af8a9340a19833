// Just enough of CUDA, as host code, to run fada_core's CUDA kernels on the
// CPU (tests/test_cuda_emulation.py): every CUDA thread of a block is a host
// thread, __syncthreads() a barrier across them, warp intrinsics an exchange
// between the 32 threads of a warp, __shared__ variables static (blocks run
// one at a time), and a launch a loop over the grid. Slow, one device, only
// what those kernels use; it tests their indexing, barriers and reductions
// where no GPU is at hand, not their speed. Included by
// csrc/cuda/device_support.cuh when FADA_CUDA_EMULATION is defined.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The emulated thread's coordinates (set by the launch in every host thread).
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fada_emu {

// A reusable barrier. Waiting threads yield rather than sleep: a block has
// more threads than the machine has cores, and they meet at barriers often.
class Barrier {
 public:
  explicit Barrier(size_t n) : n_(n) {}
  void wait() {
    const size_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
    } else {
      while (generation_.load(std::memory_order_acquire) == generation) std::this_thread::yield();
    }
  }

 private:
  const size_t n_;
  std::atomic<size_t> arrived_{0}, generation_{0};
};

// The 32 lanes of a warp exchange values through `slots`, between two waits
// on the warp's barrier (the lanes of a *_sync call all take part).
struct Warp {
  Barrier barrier{32};
  uint64_t slots[32];
};

inline thread_local Barrier* block_barrier = nullptr;
inline thread_local Warp* thread_warp = nullptr;
inline thread_local unsigned char* block_shared = nullptr;

inline unsigned lane_id() { return threadIdx.x % 32; }

// Every lane offers `value` and gets the one lane `source(lane)` offered.
template <typename T, typename Source>
T warp_exchange(T value, Source source) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "32- and 64-bit values only");
  Warp& warp = *thread_warp;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slots[lane_id()] = bits;
  warp.barrier.wait();
  bits = warp.slots[source(lane_id()) % 32];
  warp.barrier.wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline unsigned char* dynamic_shared() { return block_shared; }

// kernel<<<grid, block, smem>>>(args...): the blocks one after the other, the
// threads of a block concurrently. Every block's dynamic shared memory starts
// as 0xFF bytes (NaN as floats), so that a read before a write shows.
template <typename Kernel>
struct Launch {
  dim3 grid, block;
  size_t smem;
  Kernel* kernel;

  template <typename... Args>
  void operator()(Args... args) const {
    const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
    std::vector<unsigned char> shared(smem + 64, 0xFF);
    unsigned char* aligned = shared.data() + (64 - reinterpret_cast<uintptr_t>(shared.data()) % 64) % 64;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          std::fill(shared.begin(), shared.end(), static_cast<unsigned char>(0xFF));
          Barrier barrier(threads);
          std::vector<Warp> warps((threads + 31) / 32);  // blocks of whole warps only
          std::vector<std::thread> pool;
          pool.reserve(threads);
          for (size_t t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
              threadIdx = dim3(static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                               static_cast<unsigned>(t / (block.x * block.y)));
              blockIdx = dim3(bx, by, bz);
              blockDim = block;
              gridDim = grid;
              block_barrier = &barrier;
              thread_warp = &warps[t / 32];
              block_shared = aligned;
              kernel(args...);
            });
          }
          for (std::thread& th : pool) th.join();
        }
  }
};

template <typename Kernel>
Launch<Kernel> launch(dim3 grid, dim3 block, size_t smem, Kernel* kernel) {
  return Launch<Kernel>{grid, block, smem, kernel};
}

}  // namespace fada_emu

inline void __syncthreads() { fada_emu::block_barrier->wait(); }

inline void __syncwarp(unsigned = 0xffffffffu) { fada_emu::thread_warp->barrier.wait(); }

template <typename T>
T __shfl_sync(unsigned, T value, int source_lane) {
  return fada_emu::warp_exchange(value, [&](unsigned) { return static_cast<unsigned>(source_lane); });
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return fada_emu::warp_exchange(value, [&](unsigned lane) { return lane ^ static_cast<unsigned>(lane_mask); });
}

inline unsigned __ballot_sync(unsigned, bool predicate) {
  fada_emu::Warp& warp = *fada_emu::thread_warp;
  warp.slots[fada_emu::lane_id()] = predicate ? 1 : 0;
  warp.barrier.wait();
  unsigned bits = 0;
  for (unsigned lane = 0; lane < 32; ++lane) bits |= static_cast<unsigned>(warp.slots[lane]) << lane;
  warp.barrier.wait();
  return bits;
}

inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  unsigned long long old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < old && !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

template <typename T>
T atomicExch(T* address, T value) {
  return __atomic_exchange_n(address, value, __ATOMIC_RELAXED);
}

// ---- shims for the class statistics and cross-entropy kernels v2 (lane = channel,
// device-side label errors); kept in one block to ease merging with other additions.

template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
  // lanes below delta keep their own value, as on the GPU
  return fada_emu::warp_exchange(value, [&](unsigned lane) { return lane >= delta ? lane - delta : lane; });
}

template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta) {
  return fada_emu::warp_exchange(value, [&](unsigned lane) { return lane + delta < 32 ? lane + delta : lane; });
}

inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }

// ---- end of the v2 shims

#define FADA_LAUNCH(grid, block, smem, stream, ...) ::fada_emu::launch(grid, block, smem, &__VA_ARGS__)
#define FADA_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::fada_emu::dynamic_shared())
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(expr) (void)(expr)

using cudaStream_t = int;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <typename Kernel>
int cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return 0;
}

namespace at {
namespace cuda {
struct EmulatedDeviceProperties {
  size_t sharedMemPerBlockOptin = 227 * 1024;  // an H100's
};
inline int current_device() { return 0; }
inline const EmulatedDeviceProperties* getDeviceProperties(int) {
  static const EmulatedDeviceProperties properties;
  return &properties;
}
inline cudaStream_t getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return 0; }
}  // namespace cuda
}  // namespace c10
