// Runtime CPU instruction-set dispatch. One build of frugal._C runs on any x86-64: kernels for
// wider ISAs are compiled with per-function target attributes (never file-wide flags, so no
// inline function from a shared header is ever compiled for an ISA the CPU may lack), and the
// widest level the CPU supports is chosen at run time.
#pragma once

#include <cstdint>

namespace frugal::cpu {

// kAmx: AVX-512 VNNI plus AMX-INT8 tiles, taken only when the kernel grants this process the
// tile state and the AMX int8 tile passes its self-check against the AVX-512 one (the int8
// GEMMs use the tiles; every other kernel takes its AVX-512 VNNI path).
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAmx = 4 };

// The level kernels use now: the widest the CPU supports, or lower when FRUGAL_CPU_ISA
// (scalar, avx2, avx512, avx512_vnni, amx_int8) or set_isa() asks for it.
Isa current_isa();
// Widest level this CPU supports.
Isa detected_isa();
// Sets the level (clamped to detected_isa()); returns the level now in force.
Isa set_isa(Isa isa);
const char* isa_name(Isa isa);
// Parses a name as accepted by FRUGAL_CPU_ISA; returns false for an unknown name.
bool parse_isa(const char* name, Isa* out);
// Why this CPU's widest level is not kAmx ("" when it is): no AMX-INT8, the kernel refused the
// tile state, or the self-check failed.
const char* amx_unavailable_reason();

// Test hook: the int8 GEMMs run the AMX tile code on an emulation of the tiles (csrc/cpu/amx.h)
// whatever the level, so that code is tested on any CPU. Off unless FRUGAL_CPU_AMX_EMULATION=1.
bool amx_emulation();
void set_amx_emulation(bool on);

// Defined by the int8 GEMM (csrc/cpu/int8_matmul.cpp): runs the AMX tile on the instructions
// against the AVX-512 tile on fixed inputs; true when every sum agrees.
bool int8_amx_self_check();

}  // namespace frugal::cpu

#if defined(__x86_64__) || defined(_M_X64)
#define FRUGAL_X86 1
#define FRUGAL_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FRUGAL_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define FRUGAL_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#else
#define FRUGAL_X86 0
#endif
