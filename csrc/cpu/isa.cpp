#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace frugal::cpu {
namespace {

const char* g_amx_reason = "";

// Linux hands out the AMX tile state (8 KB of xsave area per thread) only to a process that asks
// for it; a tile instruction without it raises SIGILL.
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

Isa detect() {
#if FRUGAL_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512vnni")) {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) {
      g_amx_reason = "this CPU has no AMX-INT8";
    } else if (!amx_permitted()) {
      g_amx_reason = "the kernel refused this process the AMX tile state (arch_prctl)";
    } else if (!int8_amx_self_check()) {
      g_amx_reason = "the AMX int8 tile disagreed with the AVX-512 tile in its self-check";
    } else {
      return Isa::kAmx;
    }
    return Isa::kAvx512Vnni;
  }
  g_amx_reason = "this CPU has no AVX-512 VNNI / AMX-INT8";
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  g_amx_reason = "not an x86-64 CPU";
  return Isa::kScalar;
}

// FRUGAL_CPU_AMX_EMULATION=1 turns the emulation on from the start (a whole test run on it).
std::atomic<bool> g_amx_emulation{[] {
  const char* env = std::getenv("FRUGAL_CPU_AMX_EMULATION");
  return env != nullptr && std::strcmp(env, "1") == 0;
}()};

Isa initial() {
  Isa isa = detected_isa();
  const char* env = std::getenv("FRUGAL_CPU_ISA");
  Isa wanted;
  if (env != nullptr && *env != '\0' && parse_isa(env, &wanted) && wanted < isa) isa = wanted;
  return isa;
}

std::atomic<int>& level() {
  static std::atomic<int> value{static_cast<int>(initial())};
  return value;
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa current_isa() { return static_cast<Isa>(level().load(std::memory_order_relaxed)); }

Isa set_isa(Isa isa) {
  if (isa > detected_isa()) isa = detected_isa();
  level().store(static_cast<int>(isa));
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAmx: return "amx_int8";
  }
  return "unknown";
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni, Isa::kAmx}) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

const char* amx_unavailable_reason() {
  detected_isa();
  return g_amx_reason;
}

bool amx_emulation() { return g_amx_emulation.load(std::memory_order_relaxed); }
void set_amx_emulation(bool on) { g_amx_emulation.store(on); }

}  // namespace frugal::cpu
