// The runtime behind emu.h: fibers, the block scheduler, barriers, warp collectives, deferred
// cp.async copies and launch errors. See emu.h for what is modeled and what is not.
#include "cuda_emu/emu.h"

#include <omp.h>
#include <sys/mman.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace frugal::emu {
namespace detail {
thread_local const ThreadState* tl_self = nullptr;
}  // namespace detail

namespace {

// Each fiber's stack. Kernel frames are small (registers become locals); the guard page below
// turns an overflow into a fault rather than silent corruption of the neighbour's stack.
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;
constexpr int kRendezvousPerWarp = 8;  // collectives of one warp pending at once (divergence)
constexpr size_t kMaxDynamicSmem = 227 * 1024;  // sm_90's opt-in limit

// ------------------------------------------------------------------ context switch
#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp,
// and resumes the context saved at new_sp. Hand-written because swapcontext makes a
// sigprocmask system call on every switch: measured here, ~25 ns a switch against ~800 ns.
// MXCSR and the x87 control word are not saved (that cost ~15 ns more): the fibers of a host
// thread share one floating-point environment, which kernels never change.
extern "C" void frugal_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl frugal_emu_switch
  .hidden frugal_emu_switch
  .type frugal_emu_switch,@function
frugal_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size frugal_emu_switch,.-frugal_emu_switch
)");
#endif

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes, src_bytes;
  int64_t group;
};

struct Fiber {
  ThreadState ts;
  int linear = 0;
  bool done = false;
  unsigned char* stack = nullptr;  // mapping, guard page first
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  std::vector<Copy> copies;  // cp.async issued, not yet waited for
  int64_t committed = 0;     // cp.async groups committed so far
};

enum class Kind : int { kSync, kShuffle, kBallot, kMma16, kMma8, kLdmatrix };

// One warp collective: the lanes of `mask` meet, the last to arrive computes everyone's result.
struct Rendezvous {
  bool used = false, complete = false;
  Kind kind = Kind::kSync;
  unsigned mask = 0, arrived = 0, readers = 0;
  bool bf16 = false;
  uint64_t value[kWarpSize];
  int arg[kWarpSize], width[kWarpSize], shfl[kWarpSize];
  uint64_t result[kWarpSize];
  uint32_t a[kWarpSize][4], b[kWarpSize][2];
  float c[kWarpSize][4], d[kWarpSize][4];
  uint32_t frag[kWarpSize][4];  // ldmatrix results
};

struct Warp {
  unsigned exited = 0;
  Rendezvous pool[kRendezvousPerWarp];
};

struct Barrier {
  int arrived = 0, live = 0;
  uint64_t gen = 0;
  int any = 0, all = 1, count = 0;                 // accumulating
  int last_any = 0, last_all = 1, last_count = 0;  // of the last completed generation

  // Every live thread has arrived: publish the reductions and let them through.
  void release() {
    last_any = any;
    last_all = all;
    last_count = count;
    any = 0;
    all = 1;
    count = 0;
    arrived = 0;
    ++gen;
  }
};

std::atomic<int> g_schedule{0};
std::atomic<uint64_t> g_seed{0};
std::atomic<int> g_host_threads{0};
std::atomic<int> g_blocks_per_sm{2};

uint64_t mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Runs blocks on one host thread.
struct Runner {
  std::vector<Fiber> fibers;
  int nthreads = 0;
  Fiber* current = nullptr;
#if defined(__x86_64__)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_ctx;
#endif
  KernelBody body = nullptr;
  void* ctx = nullptr;
  Barrier barrier;
  std::vector<Warp> warps;
  std::unique_ptr<unsigned char, void (*)(void*)> smem{nullptr, std::free};
  size_t smem_capacity = 0;
  size_t smem_bytes = 0;  // of the running launch
  uint64_t progress = 0;
  bool failed = false;
  std::string error;

  ~Runner() {
    for (Fiber& f : fibers) {
      if (f.stack != nullptr) munmap(f.stack, kStackBytes + kGuardBytes);
    }
  }

  void run_block(dim3 grid, dim3 block, uint3 block_idx, size_t smem_bytes);
  void start(Fiber& f);
  void resume(Fiber& f);
  void yield();
  [[noreturn]] void fail(std::string message);
  void exit_current();
};

thread_local std::unique_ptr<Runner> tl_runner;

Runner& runner() {
  if (!tl_runner) tl_runner = std::make_unique<Runner>();
  return *tl_runner;
}

std::string lane_name(const Fiber& f) {
  const ThreadState& t = f.ts;
  return "thread (" + std::to_string(t.thread_idx.x) + "," + std::to_string(t.thread_idx.y) +
         "," + std::to_string(t.thread_idx.z) + ") of block (" + std::to_string(t.block_idx.x) +
         "," + std::to_string(t.block_idx.y) + "," + std::to_string(t.block_idx.z) + ")";
}

[[noreturn]] void fiber_entry() {
  Runner& r = runner();
  detail::tl_self = &r.current->ts;
  r.body(r.ctx);
  r.exit_current();
  r.yield();  // never resumed: the fiber is done
  std::abort();
}

#if !defined(__x86_64__)
void fiber_entry_c() { fiber_entry(); }
#endif

void Runner::start(Fiber& f) {
  if (f.stack == nullptr) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "frugal cuda_emu: cannot map a fiber stack\n");
      std::abort();
    }
    mprotect(m, kGuardBytes, PROT_NONE);
    f.stack = static_cast<unsigned char*>(m);
#if defined(__SANITIZE_ADDRESS__)
    // The mapping may reuse the addresses of a finished thread's stack, whose shadow ASan can
    // leave poisoned. (Sanitized builds only, as below.)
    ASAN_UNPOISON_MEMORY_REGION(f.stack + kGuardBytes, kStackBytes);
#endif
  }
#if defined(__SANITIZE_ADDRESS__)
  // A fiber's earlier run never returns from fiber_entry (it switches away): that frame's
  // redzones stay poisoned near the top, where the first frame is written now.
  ASAN_UNPOISON_MEMORY_REGION(f.stack + kGuardBytes + kStackBytes - 16384, 16384);
#endif
  unsigned char* top = f.stack + kGuardBytes + kStackBytes;
#if defined(__x86_64__)
  // The frame frugal_emu_switch pops: r15..rbp, then a return into fiber_entry, which sees
  // the stack as after a call (rsp = 8 mod 16) with a null return address.
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t{15});
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack + kGuardBytes;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry_c, 0);
#endif
}

void Runner::resume(Fiber& f) {
  current = &f;
  detail::tl_self = &f.ts;
#if defined(__x86_64__)
  frugal_emu_switch(&scheduler_sp, f.sp);
#else
  swapcontext(&scheduler_ctx, &f.ctx);
#endif
  current = nullptr;
  detail::tl_self = nullptr;
}

void Runner::yield() {
  Fiber& f = *current;
#if defined(__x86_64__)
  frugal_emu_switch(&f.sp, scheduler_sp);
#else
  swapcontext(&f.ctx, &scheduler_ctx);
#endif
  detail::tl_self = &f.ts;
}

void Runner::fail(std::string message) {
  if (!failed) {
    failed = true;
    error = lane_name(*current) + ": " + std::move(message);
  }
  while (true) yield();  // the scheduler stops the block and never resumes this fiber
}

void Runner::exit_current() {
  Fiber& f = *current;
  f.done = true;
  f.copies.clear();
  ++progress;
  const int w = f.linear / kWarpSize, lane = f.linear % kWarpSize;
  warps[w].exited |= 1u << lane;
  for (Rendezvous& rv : warps[w].pool) {
    if (rv.used && !rv.complete && (rv.mask >> lane & 1u)) {
      fail("returned while lanes " + std::to_string(rv.arrived) +
           " wait for it in a warp collective with mask " + std::to_string(rv.mask));
    }
  }
  // A barrier counts only the threads that have not returned.
  --barrier.live;
  if (barrier.arrived > 0 && barrier.arrived == barrier.live) barrier.release();
}

void Runner::run_block(dim3 grid, dim3 block, uint3 block_idx, size_t smem_bytes) {
  nthreads = static_cast<int>(block.x * block.y * block.z);
  if (static_cast<int>(fibers.size()) < nthreads) fibers.resize(nthreads);
  const int nwarps = (nthreads + kWarpSize - 1) / kWarpSize;
  warps.assign(nwarps, Warp{});
  barrier = Barrier{};
  barrier.live = nthreads;
  // Lanes past the last thread of a partial warp never arrive anywhere.
  if (nthreads % kWarpSize != 0) warps[nwarps - 1].exited = ~0u << (nthreads % kWarpSize);
  if (smem_bytes > smem_capacity) {
    const size_t bytes = (smem_bytes + 127) / 128 * 128;
    smem.reset(static_cast<unsigned char*>(std::aligned_alloc(128, bytes)));
    smem_capacity = smem_bytes;
  }
  if (smem_bytes > 0) std::memset(smem.get(), 0xff, smem_bytes);
  this->smem_bytes = smem_bytes;
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = fibers[i];
    f.linear = i;
    f.done = false;
    f.copies.clear();
    f.committed = 0;
    f.ts.thread_idx = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    f.ts.block_idx = block_idx;
    f.ts.block_dim = block;
    f.ts.grid_dim = grid;
    start(f);
  }
  const Schedule sched = static_cast<Schedule>(g_schedule.load());
  const uint64_t seed = g_seed.load() ^ mix((uint64_t(block_idx.z) << 42) ^
                                            (uint64_t(block_idx.y) << 21) ^ block_idx.x);
  std::vector<int> order(nthreads);
  int finished = 0;
  for (uint64_t pass = 0; finished < nthreads && !failed; ++pass) {
    for (int i = 0; i < nthreads; ++i) {
      order[i] = sched == Schedule::kReverse ? nthreads - 1 - i : i;
    }
    if (sched == Schedule::kShuffle) {
      uint64_t s = mix(seed + pass);
      for (int i = nthreads - 1; i > 0; --i) {
        s = mix(s);
        std::swap(order[i], order[s % uint64_t(i + 1)]);
      }
    }
    const uint64_t before = progress;
    for (int i : order) {
      Fiber& f = fibers[i];
      if (f.done) continue;
      resume(f);
      if (failed) break;
      if (f.done) ++finished;
    }
    if (!failed && finished < nthreads && progress == before) {
      failed = true;
      error = "deadlock in block (" + std::to_string(block_idx.x) + "," +
              std::to_string(block_idx.y) + "," + std::to_string(block_idx.z) +
              "): no thread can proceed (a barrier or warp collective that some threads never "
              "reach, or mismatched masks)";
    }
  }
}

Fiber& me() { return *runner().current; }

// Waits until pred() holds, counting the wait as progress only once it does.
template <typename Pred>
void wait_until(Runner& r, Pred pred) {
  while (!pred()) r.yield();
  ++r.progress;
}

Rendezvous& join(Runner& r, Kind kind, unsigned mask) {
  Fiber& f = *r.current;
  const int w = f.linear / kWarpSize, lane = f.linear % kWarpSize;
  Warp& warp = r.warps[w];
  if (!(mask >> lane & 1u)) {
    r.fail("warp collective with mask " + std::to_string(mask) + " that does not name lane " +
           std::to_string(lane) + " itself");
  }
  if (mask & warp.exited) {
    r.fail("warp collective with mask " + std::to_string(mask) + " names lanes " +
           std::to_string(mask & warp.exited) + " that have returned (or do not exist)");
  }
  ++r.progress;
  for (Rendezvous& rv : warp.pool) {
    if (rv.used && !rv.complete && rv.mask == mask && rv.kind == kind &&
        !(rv.arrived >> lane & 1u)) {
      rv.arrived |= 1u << lane;
      return rv;
    }
  }
  for (Rendezvous& rv : warp.pool) {
    if (!rv.used) {
      rv.used = true;
      rv.complete = false;
      rv.kind = kind;
      rv.mask = mask;
      rv.arrived = 1u << lane;
      rv.readers = 0;
      return rv;
    }
  }
  r.fail("more than " + std::to_string(kRendezvousPerWarp) +
         " warp collectives pending at once in one warp");
}

// Blocks until every lane of rv has arrived; the last one runs finish(rv).
template <typename Finish>
void meet(Runner& r, Rendezvous& rv, Finish finish) {
  if (rv.arrived == rv.mask) {
    finish(rv);
    rv.complete = true;
    rv.readers = rv.mask;
  } else {
    wait_until(r, [&] { return rv.complete; });
  }
}

void leave(Rendezvous& rv, int lane) {
  rv.readers &= ~(1u << lane);
  if (rv.readers == 0) rv.used = false;
}

float half_bits_to_float(uint16_t u, bool bf16) {
  if (bf16) {
    const uint32_t w = uint32_t(u) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  __half_raw h;
  h.x = u;
  return __half2float(__half(h));
}

// D = A B + C for m16n8kK with the PTX fragment layouts (see device.h): lane = 4 * group + t.
void mma_all(Rendezvous& rv, int K) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    const auto lo = [&](uint32_t x) { return half_bits_to_float(uint16_t(x & 0xffffu), rv.bf16); };
    const auto hi = [&](uint32_t x) { return half_bits_to_float(uint16_t(x >> 16), rv.bf16); };
    const uint32_t* a = rv.a[lane];
    A[g][2 * t] = lo(a[0]);
    A[g][2 * t + 1] = hi(a[0]);
    A[g + 8][2 * t] = lo(a[1]);
    A[g + 8][2 * t + 1] = hi(a[1]);
    B[2 * t][g] = lo(rv.b[lane][0]);
    B[2 * t + 1][g] = hi(rv.b[lane][0]);
    if (K == 16) {
      A[g][2 * t + 8] = lo(a[2]);
      A[g][2 * t + 9] = hi(a[2]);
      A[g + 8][2 * t + 8] = lo(a[3]);
      A[g + 8][2 * t + 9] = hi(a[3]);
      B[2 * t + 8][g] = lo(rv.b[lane][1]);
      B[2 * t + 9][g] = hi(rv.b[lane][1]);
    }
    C[g][2 * t] = rv.c[lane][0];
    C[g][2 * t + 1] = rv.c[lane][1];
    C[g + 8][2 * t] = rv.c[lane][2];
    C[g + 8][2 * t + 1] = rv.c[lane][3];
  }
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
      float acc = C[rows[i]][cols[i]];
      for (int k = 0; k < K; ++k) acc += A[rows[i]][k] * B[k][cols[i]];  // products are exact
      rv.d[lane][i] = acc;
    }
  }
}

}  // namespace

// ------------------------------------------------------------------ primitives

int sync_threads(int kind, int predicate) {
  Runner& r = runner();
  Barrier& b = r.barrier;
  ++r.progress;
  b.any |= predicate != 0;
  b.all &= predicate != 0;
  b.count += predicate != 0;
  const uint64_t gen = b.gen;
  if (++b.arrived == b.live) {
    b.release();
  } else {
    wait_until(r, [&] { return b.gen != gen; });
  }
  switch (kind) {
    case 1: return b.last_any;
    case 2: return b.last_all;
    case 3: return b.last_count;
    default: return 0;
  }
}

void sync_warp(unsigned mask) {
  Runner& r = runner();
  Rendezvous& rv = join(r, Kind::kSync, mask);
  meet(r, rv, [](Rendezvous&) {});
  leave(rv, r.current->linear % kWarpSize);
}

unsigned char* dynamic_smem() { return runner().smem.get(); }

uint64_t shuffle(unsigned mask, uint64_t value, Shfl kind, int arg, int width) {
  Runner& r = runner();
  const int lane = r.current->linear % kWarpSize;
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    r.fail("shuffle width must be a power of two in [1, 32]; got " + std::to_string(width));
  }
  Rendezvous& rv = join(r, Kind::kShuffle, mask);
  rv.value[lane] = value;
  rv.arg[lane] = arg;
  rv.width[lane] = width;
  rv.shfl[lane] = static_cast<int>(kind);
  meet(r, rv, [](Rendezvous& v) {
    for (int l = 0; l < kWarpSize; ++l) {
      if (!(v.mask >> l & 1u)) continue;
      const int w = v.width[l], a = v.arg[l], first = l & ~(w - 1), last = first + w - 1;
      int src = l;
      switch (static_cast<Shfl>(v.shfl[l])) {
        case Shfl::kIdx: src = first + (a & (w - 1)); break;
        case Shfl::kUp: src = l - a < first ? l : l - a; break;
        case Shfl::kDown: src = l + a > last ? l : l + a; break;
        case Shfl::kXor: src = (l ^ a) > last ? l : (l ^ a); break;
      }
      // Reading a lane outside the mask is undefined in CUDA: give garbage, not a neighbour.
      v.result[l] = (v.mask >> src & 1u) ? v.value[src] : ~uint64_t{0};
    }
  });
  const uint64_t out = rv.result[lane];
  leave(rv, lane);
  return out;
}

unsigned ballot(unsigned mask, int predicate) {
  Runner& r = runner();
  const int lane = r.current->linear % kWarpSize;
  Rendezvous& rv = join(r, Kind::kBallot, mask);
  rv.value[lane] = predicate != 0;
  meet(r, rv, [](Rendezvous& v) {
    unsigned bits = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      if ((v.mask >> l & 1u) && v.value[l]) bits |= 1u << l;
    }
    for (int l = 0; l < kWarpSize; ++l) v.result[l] = bits;
  });
  const unsigned out = static_cast<unsigned>(rv.result[lane]);
  leave(rv, lane);
  return out;
}

void mma(int k, bool bf16, float d[4], const uint32_t* a, const uint32_t* b, const float c[4]) {
  Runner& r = runner();
  const int lane = r.current->linear % kWarpSize;
  Rendezvous& rv = join(r, k == 16 ? Kind::kMma16 : Kind::kMma8, 0xffffffffu);
  for (int i = 0; i < k / 4; ++i) rv.a[lane][i] = a[i];
  for (int i = 0; i < k / 8; ++i) rv.b[lane][i] = b[i];
  for (int i = 0; i < 4; ++i) rv.c[lane][i] = c[i];
  rv.bf16 = bf16;
  meet(r, rv, [k](Rendezvous& v) { mma_all(v, k); });
  for (int i = 0; i < 4; ++i) d[i] = rv.d[lane][i];
  leave(rv, lane);
}

void ldmatrix(int num, bool trans, uint32_t* r, const void* row) {
  Runner& rn = runner();
  const int lane = rn.current->linear % kWarpSize;
  Rendezvous& rv = join(rn, Kind::kLdmatrix, 0xffffffffu);
  rv.value[lane] = reinterpret_cast<uintptr_t>(row);
  rv.arg[lane] = num;
  rv.width[lane] = trans ? 1 : 0;
  meet(rn, rv, [&rn](Rendezvous& v) {
    const int n = v.arg[0];
    const bool tr = v.width[0] != 0;
    for (int l = 1; l < kWarpSize; ++l) {
      if (v.arg[l] != n || (v.width[l] != 0) != tr) {
        rn.fail("ldmatrix lanes disagree on the shape: lane 0 loads x" + std::to_string(n) +
                (tr ? ".trans" : "") + ", lane " + std::to_string(l) + " x" +
                std::to_string(v.arg[l]) + (v.width[l] ? ".trans" : ""));
      }
    }
    // Row r of matrix i comes from lane 8i + r's address.
    const uintptr_t lo = reinterpret_cast<uintptr_t>(rn.smem.get());
    uint16_t m[4][8][8];
    for (int i = 0; i < n; ++i) {
      for (int row = 0; row < 8; ++row) {
        const int src = 8 * i + row;
        const uintptr_t a = static_cast<uintptr_t>(v.value[src]);
        if (a % 16 != 0 || a < lo || a + 16 > lo + rn.smem_bytes) {
          rn.fail("ldmatrix: lane " + std::to_string(src) + "'s row address is " +
                  (a % 16 != 0 ? "not 16-byte aligned"
                               : "outside the block's dynamic shared memory (" +
                                     std::to_string(rn.smem_bytes) + " bytes)"));
        }
        std::memcpy(m[i][row], reinterpret_cast<const void*>(a), 16);
      }
    }
    for (int l = 0; l < kWarpSize; ++l) {
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < n; ++i) {
        const uint16_t e0 = tr ? m[i][2 * t][g] : m[i][g][2 * t];
        const uint16_t e1 = tr ? m[i][2 * t + 1][g] : m[i][g][2 * t + 1];
        v.frag[l][i] = uint32_t(e0) | (uint32_t(e1) << 16);
      }
    }
  });
  for (int i = 0; i < num; ++i) r[i] = rv.frag[lane][i];
  leave(rv, lane);
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  Fiber& f = me();
  if ((bytes != 4 && bytes != 8 && bytes != 16) || src_bytes < 0 || src_bytes > bytes) {
    runner().fail("cp.async of " + std::to_string(bytes) + " bytes (src " +
                  std::to_string(src_bytes) + "): expected 4, 8 or 16 and src <= size");
  }
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0)) {
    runner().fail("cp.async of " + std::to_string(bytes) + " bytes from a misaligned address");
  }
  f.copies.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src),
                      bytes, src_bytes, f.committed});
}

void cp_async_commit() { ++me().committed; }

void cp_async_wait(int pending) {
  Fiber& f = me();
  const int64_t done = f.committed - pending;  // groups [0, done) must have landed
  size_t keep = 0;
  for (size_t i = 0; i < f.copies.size(); ++i) {
    Copy& c = f.copies[i];
    if (c.group < done) {
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(c.dst + c.src_bytes, 0, c.bytes - c.src_bytes);
    } else {
      f.copies[keep++] = c;
    }
  }
  f.copies.resize(keep);
}

// ------------------------------------------------------------------ launch

namespace {
thread_local std::string tl_last_error;

cudaError_t launch_error(cudaError_t code, std::string message) {
  tl_last_error = std::move(message);
  return code;
}
}  // namespace

const char* last_error() { return tl_last_error.c_str(); }

cudaError_t run_grid(dim3 grid, dim3 block, size_t smem_bytes, KernelBody body, void* ctx) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535 || threads == 0 || threads > kMaxThreads || block.z > 64) {
    return launch_error(cudaErrorInvalidConfiguration,
                        "invalid launch configuration: grid (" + std::to_string(grid.x) + "," +
                            std::to_string(grid.y) + "," + std::to_string(grid.z) +
                            "), block (" + std::to_string(block.x) + "," +
                            std::to_string(block.y) + "," + std::to_string(block.z) + ")");
  }
  if (smem_bytes > kMaxDynamicSmem) {
    return launch_error(cudaErrorInvalidValue,
                        "dynamic shared memory of " + std::to_string(smem_bytes) +
                            " bytes exceeds the " + std::to_string(kMaxDynamicSmem) +
                            " bytes any target allows");
  }
  const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::string first_error;
  const int host_threads =
      g_host_threads.load() > 0 ? g_host_threads.load() : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(host_threads)
  for (int64_t i = 0; i < nblocks; ++i) {
    if (stop.load(std::memory_order_relaxed)) continue;
    Runner& r = runner();
    r.body = body;
    r.ctx = ctx;
    r.failed = false;
    r.error.clear();
    const uint3 idx = make_uint3(unsigned(i % grid.x), unsigned((i / grid.x) % grid.y),
                                 unsigned(i / (int64_t(grid.x) * grid.y)));
    r.run_block(grid, block, idx, smem_bytes);
    if (r.failed) {
      std::lock_guard<std::mutex> lock(mu);
      if (!stop.exchange(true)) first_error = r.error;
    }
  }
  if (stop.load()) return launch_error(cudaErrorLaunchFailure, "kernel failed: " + first_error);
  tl_last_error.clear();
  return cudaSuccess;
}

void set_schedule(Schedule s, uint64_t seed) {
  g_schedule.store(static_cast<int>(s));
  g_seed.store(seed);
}
Schedule schedule() { return static_cast<Schedule>(g_schedule.load()); }
uint64_t schedule_seed() { return g_seed.load(); }
void set_host_threads(int n) { g_host_threads.store(n < 0 ? 0 : n); }
int host_threads() { return g_host_threads.load(); }
void set_blocks_per_sm(int n) { g_blocks_per_sm.store(n < 1 ? 1 : n); }
int blocks_per_sm() { return g_blocks_per_sm.load(); }

}  // namespace frugal::emu
