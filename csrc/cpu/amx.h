// Intel AMX tile operations for the int8 GEMM (csrc/cpu/int8_matmul_kernels.h), two ways:
//   AmxHw   the instructions (tileloadd, tdpbssd, ...), for CPUs with AMX-INT8 whose kernel
//           granted this process the tile state (cpu/isa.cpp asks for it);
//   AmxEmu  the same operations in plain C++ on a per-thread tile file, as the Intel SDM
//           defines them (rows and bytes beyond a tile's configured shape read as zero; the
//           shape rules whose violation faults are checked), so the tile code that the
//           hardware runs is also run, and tested, on any CPU.
// The tile kernels use one fixed register plan (amx_plan below), so each operation names its
// registers as literals: GCC's tile intrinsics are inline assembly that pastes the register
// number into the instruction text.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>

#include "cpu/isa.h"

#if FRUGAL_X86
#include <immintrin.h>
#endif

namespace frugal::cpu::amx {

// The 64-byte operand of ldtilecfg (palette 1: 8 tiles of up to 16 rows of 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

constexpr int kRows = 16;   // rows of a tile
constexpr int kColsb = 64;  // bytes of a tile row: 16 int32 sums, or 16 k4 steps of 4 bytes

// The register plan of the GEMM tile for MR rows of a (1..16) against 16 * NB columns:
//   tmm0..3  int32 sums of columns [16 j, 16 j + 16), MR rows of 64 bytes
//   tmm4     a: MR rows of 16 k4 steps (64 bytes)
//   tmm5..7  b: 16 k4 steps of 16 columns x 4 bytes; column block j goes to tmm(5 + j % 3)
inline TileConfig gemm_config(int mr) {
  TileConfig c;
  for (int t = 0; t < 5; ++t) {
    c.rows[t] = static_cast<uint8_t>(mr);
    c.colsb[t] = kColsb;
  }
  for (int t = 5; t < 8; ++t) {
    c.rows[t] = kRows;
    c.colsb[t] = kColsb;
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Emulation
// ---------------------------------------------------------------------------------------------

struct AmxEmu {
  struct File {
    bool configured = false;
    TileConfig cfg;
    alignas(64) uint8_t t[8][kRows][kColsb];
  };
  static File& file() {
    thread_local File f;
    return f;
  }
  static void check_tile(const File& f, int t, const char* what) {
    TORCH_CHECK(f.configured, "AMX emulation: ", what, " on an unconfigured tile file (#UD)");
    TORCH_CHECK(f.cfg.rows[t] >= 1 && f.cfg.rows[t] <= kRows && f.cfg.colsb[t] >= 1 &&
                    f.cfg.colsb[t] <= kColsb,
                "AMX emulation: ", what, " on tile ", t, " configured as ",
                int(f.cfg.rows[t]), " rows x ", f.cfg.colsb[t], " bytes (#UD)");
  }
  static void config(const TileConfig& c) {
    TORCH_CHECK(c.palette == 1 && c.start_row == 0,
                "AMX emulation: ldtilecfg with palette ", int(c.palette), " start_row ",
                int(c.start_row), " (#GP)");
    for (int t = 0; t < 8; ++t) {
      TORCH_CHECK(c.rows[t] <= kRows && c.colsb[t] <= kColsb && (c.rows[t] == 0) == (c.colsb[t] == 0),
                  "AMX emulation: ldtilecfg tile ", t, " of ", int(c.rows[t]), " rows x ",
                  c.colsb[t], " bytes (#GP)");
    }
    File& f = file();
    f.cfg = c;
    f.configured = true;
    std::memset(f.t, 0, sizeof(f.t));  // ldtilecfg zeroes every tile
  }
  static void release() { file().configured = false; }
  template <int T>
  static void zero() {
    File& f = file();
    check_tile(f, T, "tilezero");
    std::memset(f.t[T], 0, sizeof(f.t[T]));
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
    File& f = file();
    check_tile(f, T, "tileloadd");
    std::memset(f.t[T], 0, sizeof(f.t[T]));
    for (int r = 0; r < f.cfg.rows[T]; ++r) {
      std::memcpy(f.t[T][r], static_cast<const uint8_t*>(base) + r * stride, f.cfg.colsb[T]);
    }
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    File& f = file();
    check_tile(f, T, "tilestored");
    for (int r = 0; r < f.cfg.rows[T]; ++r) {
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, f.t[T][r], f.cfg.colsb[T]);
    }
  }
  // tdpbssd C, A, B: C[m][n] += sum_k sum_i A[m][4k + i] * B[k][4n + i], signed bytes, int32
  // sums that wrap.
  template <int C, int A, int B>
  static void dpbssd() {
    File& f = file();
    check_tile(f, C, "tdpbssd dst");
    check_tile(f, A, "tdpbssd a");
    check_tile(f, B, "tdpbssd b");
    const TileConfig& c = f.cfg;
    TORCH_CHECK(c.rows[C] == c.rows[A] && c.colsb[A] / 4 == c.rows[B] &&
                    c.colsb[C] == c.colsb[B] && c.colsb[A] % 4 == 0 && c.colsb[C] % 4 == 0,
                "AMX emulation: tdpbssd shapes dst ", int(c.rows[C]), "x", c.colsb[C], ", a ",
                int(c.rows[A]), "x", c.colsb[A], ", b ", int(c.rows[B]), "x", c.colsb[B],
                " (#UD)");
    for (int m = 0; m < c.rows[C]; ++m) {
      for (int n = 0; n < c.colsb[C] / 4; ++n) {
        int32_t d;
        std::memcpy(&d, &f.t[C][m][4 * n], 4);
        uint32_t acc = static_cast<uint32_t>(d);
        for (int k = 0; k < c.colsb[A] / 4; ++k) {
          int32_t s = 0;
          for (int i = 0; i < 4; ++i) {
            s += static_cast<int8_t>(f.t[A][m][4 * k + i]) * static_cast<int8_t>(f.t[B][k][4 * n + i]);
          }
          acc += static_cast<uint32_t>(s);
        }
        d = static_cast<int32_t>(acc);
        std::memcpy(&f.t[C][m][4 * n], &d, 4);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Hardware
// ---------------------------------------------------------------------------------------------

#if FRUGAL_X86
#define FRUGAL_TARGET_AMX __attribute__((target("amx-tile,amx-int8")))
#define FRUGAL_AMX_INLINE FRUGAL_TARGET_AMX __attribute__((always_inline)) static inline

// Expands OP(t, args...) with t the literal equal to the template parameter T (0..7).
#define FRUGAL_AMX_TILE_LITERAL(OP, ...)                 \
  if constexpr (T == 0) OP(0, __VA_ARGS__);              \
  else if constexpr (T == 1) OP(1, __VA_ARGS__);         \
  else if constexpr (T == 2) OP(2, __VA_ARGS__);         \
  else if constexpr (T == 3) OP(3, __VA_ARGS__);         \
  else if constexpr (T == 4) OP(4, __VA_ARGS__);         \
  else if constexpr (T == 5) OP(5, __VA_ARGS__);         \
  else if constexpr (T == 6) OP(6, __VA_ARGS__);         \
  else OP(7, __VA_ARGS__)

// GCC's tile intrinsics are asm statements without a memory clobber: nothing tells the compiler
// that tileloadd and ldtilecfg read memory or that tilestored writes it. A compiler barrier
// before each load and after each store keeps every C++ access to those buffers in order.
#define FRUGAL_AMX_MEMORY_BARRIER() __asm__ __volatile__("" ::: "memory")

struct AmxHw {
  FRUGAL_AMX_INLINE void config(const TileConfig& c) {
    FRUGAL_AMX_MEMORY_BARRIER();
    _tile_loadconfig(&c);
  }
  FRUGAL_AMX_INLINE void release() { _tile_release(); }
  template <int T>
  FRUGAL_AMX_INLINE void zero() {
    static_assert(T >= 0 && T < 8);
    if constexpr (T == 0) _tile_zero(0);
    else if constexpr (T == 1) _tile_zero(1);
    else if constexpr (T == 2) _tile_zero(2);
    else if constexpr (T == 3) _tile_zero(3);
    else if constexpr (T == 4) _tile_zero(4);
    else if constexpr (T == 5) _tile_zero(5);
    else if constexpr (T == 6) _tile_zero(6);
    else _tile_zero(7);
  }
  template <int T>
  FRUGAL_AMX_INLINE void load(const void* base, int64_t stride) {
    static_assert(T >= 0 && T < 8);
    FRUGAL_AMX_MEMORY_BARRIER();
    FRUGAL_AMX_TILE_LITERAL(_tile_loadd, base, stride);
  }
  template <int T>
  FRUGAL_AMX_INLINE void store(void* base, int64_t stride) {
    static_assert(T >= 0 && T < 8);
    FRUGAL_AMX_TILE_LITERAL(_tile_stored, base, stride);
    FRUGAL_AMX_MEMORY_BARRIER();
  }
  // The plan's four products only (see gemm_config).
  template <int C, int A, int B>
  FRUGAL_AMX_INLINE void dpbssd() {
    static_assert(A == 4, "the plan keeps a in tmm4");
    if constexpr (C == 0 && B == 5) _tile_dpbssd(0, 4, 5);
    else if constexpr (C == 1 && B == 6) _tile_dpbssd(1, 4, 6);
    else if constexpr (C == 2 && B == 7) _tile_dpbssd(2, 4, 7);
    else if constexpr (C == 3 && B == 5) _tile_dpbssd(3, 4, 5);
    else static_assert(C < 0, "not a product of the plan");
  }
};
#undef FRUGAL_AMX_TILE_LITERAL
#undef FRUGAL_AMX_MEMORY_BARRIER
#endif

}  // namespace frugal::cpu::amx
