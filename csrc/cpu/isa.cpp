#include "cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace frugal::cpu {
namespace {

Isa detect() {
#if FRUGAL_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512vnni")) return Isa::kAvx512Vnni;
  if (avx512) return Isa::kAvx512;
  if (avx2) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa initial() {
  Isa isa = detect();
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
  }
  return "unknown";
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni}) {
    if (std::strcmp(name, isa_name(isa)) == 0) {
      *out = isa;
      return true;
    }
  }
  return false;
}

}  // namespace frugal::cpu
