// CUDA device code on the host: what a kernel in csrc/cuda may use, implemented for g++ so the
// same .cu files that nvcc builds for sm_80 / sm_90a also run, on CPU tensors, in the test suite
// (through the frugal._cuda_emu extension). Include it through csrc/cuda/device.h, never
// directly; kernels must not branch on it.
//
// Execution model. A launch runs its blocks one after another on each of a few host threads
// (OpenMP over blocks: blocks are independent in CUDA too). A block runs on one host thread
// as blockDim.x * y * z fibers, one per CUDA thread, each with its own stack; a fiber runs
// until it must wait (a barrier, a warp collective whose lanes have not all arrived) or
// returns, and a scheduler then resumes the next. Fibers, not one host thread per CUDA thread:
// a wait is two ~25 ns context switches instead of a futex sleep and wake-up through the OS
// scheduler (microseconds, for each of 128 threads at every barrier and shuffle), `__shared__` is
// simply memory of the host thread running the block, and a run is deterministic: the
// schedule (the order in which runnable threads are resumed on every pass: forward, reverse
// or a seeded shuffle, see set_schedule) decides which of two unsynchronized accesses comes
// first, so a race shows the same way every time and tests can try more than one order.
//
// What is modeled:
//  - threadIdx, blockIdx, blockDim, gridDim, warpSize; lanes are consecutive linear thread
//    ids (x fastest), 32 to a warp.
//  - __syncthreads (and _or / _and / _count): a barrier over the block's threads that have
//    not returned (as on sm_70+). __syncwarp(mask).
//  - Warp collectives with their lane semantics: __shfl_sync, __shfl_xor_sync, __shfl_up_sync,
//    __shfl_down_sync (width, out-of-segment lanes keep their own value), __ballot_sync,
//    __any_sync, __all_sync, mma.sync (m16n8k16, m16n8k8 with f16 / bf16 inputs, f32
//    accumulators; the fragment layouts of the PTX ISA, section 9.7.14.5) and ldmatrix (.x1,
//    .x2, .x4, .trans: each lane's registers from the rows the lanes address, as the ISA
//    lays them out; every address checked to be 16-byte aligned and inside the
//    block's dynamic shared memory, and the lanes to agree on the shape). A collective waits
//    for exactly the lanes of its mask; a lane not in its own mask, a mask naming a lane that
//    has returned, or a block where no thread can proceed (deadlock) fails the launch.
//  - Shared memory: dynamic shared memory is fresh per block and filled with 0xFF bytes (NaN
//    in every float format, -1 in integers), so a read of something never written shows.
//    Static `__shared__` variables become thread_local statics: one per host thread, shared
//    by the fibers of the block running there, not poisoned (use dynamic shared memory).
//  - cp.async (4, 8, 16 bytes, zero-fill): the copy is deferred to the cp.async.wait_group
//    that completes it (the latest moment the hardware may land it), so reading the
//    destination before the wait returns stale or poisoned bytes.
//  - Atomics (host atomics on the same addresses), __ldg (a plain load), __byte_perm, the
//    IEEE intrinsics the kernels use (__fdiv_rn, __frcp_rn, __float2int_rn, ...), vector
//    types and __half / __nv_bfloat16 (the toolkit's own headers, in host mode).
//
// What is not modeled: timing and performance (nothing about speed can be read from a run);
// memory ordering beyond barriers (a fiber's writes are visible at once to the next fiber,
// so a missing __threadfence or volatile does not show); concurrency between blocks (a kernel
// that waits for another block deadlocks or gives a wrong answer here); warp-synchronous
// execution (lanes run one after another between collectives, which is what independent thread
// scheduling allows, so code relying on implicit lockstep breaks here as it may on sm_70+);
// tensor-core arithmetic rounding (mma products are exact, sums are fp32 in k order; the
// hardware sums with other rounding, a difference within fp32 rounding of a 16-term sum);
// other PTX (wgmma, TMA, fp8; ldmatrix bank conflicts and its lanes' unused addresses);
// resource limits (registers, spills, occupancy: those
// are read from the nvcc build); streams and events (a launch runs to completion before it
// returns); out-of-bounds accesses (they touch host memory as they are; no bounds checks).
#pragma once

#ifndef FRUGAL_CUDA_EMU
#error "csrc/cuda_emu/emu.h is the host emulation of CUDA device code; build with FRUGAL_CUDA_EMU"
#endif

// Claim the CUDA keywords before the toolkit headers do (they keep existing definitions).
#define __host__
#define __device__
#define __global__
#define __shared__ static thread_local
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_emu/control.h"

namespace frugal::emu {

constexpr int kWarpSize = 32;

// What one emulated CUDA thread sees.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The running fiber's state (valid only inside a launched kernel).
namespace detail {
extern thread_local const ThreadState* tl_self;
}  // namespace detail
inline const ThreadState& self() { return *detail::tl_self; }

// Block-level primitives, implemented in emu.cpp.
int sync_threads(int kind, int predicate);  // kind: 0 plain, 1 or, 2 and, 3 count
void sync_warp(unsigned mask);
unsigned char* dynamic_smem();

// Warp exchange: every lane of `mask` deposits `value` (up to 8 bytes); each gets back the
// value of the lane that src_of(lane) names, or its own when that is -1.
enum class Shfl : int { kIdx, kUp, kDown, kXor };
uint64_t shuffle(unsigned mask, uint64_t value, Shfl kind, int arg, int width);
unsigned ballot(unsigned mask, int predicate);

// mma.sync.aligned.m16n8kK.row.col.f32.{f16,bf16}.{f16,bf16}.f32 over the warp: a has K/4
// registers, b K/8, c and d 4 (see device.h for the fragment layouts).
void mma(int k, bool bf16, float d[4], const uint32_t* a, const uint32_t* b, const float c[4]);

// ldmatrix.m8n8.x{num}{.trans}.b16 over the warp (see device.h for the layouts): every lane
// passes its row address; r gets num registers.
void ldmatrix(int num, bool trans, uint32_t* r, const void* row);

// cp.async: bytes in {4, 8, 16}; src_bytes < bytes zero-fills the rest.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

// Runs body(ctx) as every thread of a grid; returns cudaSuccess or an error whose message
// last_error() gives.
using KernelBody = void (*)(void* ctx);
cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, KernelBody body, void* ctx);

// Launches kernel<<<grid, block, smem>>>(args...): each thread calls kernel with its own copy
// of the arguments, converted to the parameter types as a real launch would.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  struct Ctx {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  const KernelBody body = [](void* p) {
    Ctx* c = static_cast<Ctx*>(p);
    std::tuple<std::decay_t<P>...> params = c->params;  // by value, per thread
    std::apply(c->kernel, params);
  };
  return run_grid(grid, block, smem, body, &ctx);
}

// Knobs (control.h, process-wide): the order in which runnable threads are resumed on each
// scheduler pass (set_schedule), the number of host threads that run blocks (set_host_threads,
// 0: OpenMP's default), and what the split-KV planners see as resident blocks per SM
// (set_blocks_per_sm; the occupancy calculator's answer on a GPU), which tests move to force
// split and non-split plans.

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of <= 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace frugal::emu

// ------------------------------------------------------------------------------ built-ins

#define threadIdx (::frugal::emu::self().thread_idx)
#define blockIdx (::frugal::emu::self().block_idx)
#define blockDim (::frugal::emu::self().block_dim)
#define gridDim (::frugal::emu::self().grid_dim)
#define warpSize (::frugal::emu::kWarpSize)

inline void __syncthreads() { ::frugal::emu::sync_threads(0, 0); }
inline int __syncthreads_or(int p) { return ::frugal::emu::sync_threads(1, p); }
inline int __syncthreads_and(int p) { return ::frugal::emu::sync_threads(2, p); }
inline int __syncthreads_count(int p) { return ::frugal::emu::sync_threads(3, p); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::frugal::emu::sync_warp(mask); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::frugal::emu::from_bits<T>(::frugal::emu::shuffle(
      mask, ::frugal::emu::to_bits(v), ::frugal::emu::Shfl::kIdx, src, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::frugal::emu::from_bits<T>(::frugal::emu::shuffle(
      mask, ::frugal::emu::to_bits(v), ::frugal::emu::Shfl::kUp, static_cast<int>(delta), width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::frugal::emu::from_bits<T>(::frugal::emu::shuffle(
      mask, ::frugal::emu::to_bits(v), ::frugal::emu::Shfl::kDown, static_cast<int>(delta),
      width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::frugal::emu::from_bits<T>(::frugal::emu::shuffle(
      mask, ::frugal::emu::to_bits(v), ::frugal::emu::Shfl::kXor, lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int p) { return ::frugal::emu::ballot(mask, p); }
inline int __any_sync(unsigned mask, int p) { return ::frugal::emu::ballot(mask, p) != 0; }
inline int __all_sync(unsigned mask, int p) { return ::frugal::emu::ballot(mask, p) == mask; }

// CUDA's min / max overloads for device code.
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

inline float __int_as_float(int x) { return ::frugal::emu::from_bits<float>(uint32_t(x)); }
inline int __float_as_int(float x) { return static_cast<int>(::frugal::emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::frugal::emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) {
  return static_cast<unsigned>(::frugal::emu::to_bits(x));
}
// IEEE round-to-nearest-even: the host's default rounding mode (the build never uses
// -ffast-math, so x / y is the correctly rounded quotient).
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline float __expf(float x) { return std::exp(x); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t bytes = (uint64_t(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned sel = (s >> (4 * i)) & 7u;
    r |= unsigned((bytes >> (8 * sel)) & 0xffu) << (8 * i);
  }
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline void __threadfence() {}
inline void __threadfence_block() {}

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST,
                                                 __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicCAS(int* p, int expected, int desired) {
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) {
  uint32_t* u = reinterpret_cast<uint32_t*>(p);
  uint32_t old = __atomic_load_n(u, __ATOMIC_SEQ_CST);
  while (true) {
    const uint32_t want = ::frugal::emu::to_bits(::frugal::emu::from_bits<float>(old) + v) &
                          0xffffffffu;
    if (__atomic_compare_exchange_n(u, &old, want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
      return ::frugal::emu::from_bits<float>(old);
  }
}
