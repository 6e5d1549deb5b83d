// int8 GEMMs on the CPU: int8_mm, int8_scaled_mm (+ packed weight), int8_dynamic_linear_packed
// (Int8Linear's W8A8 forward) and int8_weight_only_mm.
//
// Every int8 GEMM of more than int8_stream_max_m rows (a knob, csrc/cpu/knobs.h; default and
// at most kStreamMaxRows = 4) runs on the packed weight below (the unpacked ops pack each group
// of b as they reach it; fewer rows stream b as it is), one format for every ISA path, so a
// buffer packed under one ISA level works under any other. The rows of a are first written as
// the tiles read them (the fused op quantizes float rows straight into that form). The work is
// split into tasks of up to int8_task_groups (default 4) groups of 64 columns times a block of
// rows; for each block of K, every row tile of the task
// runs a register tile against each group, and after the last block the int32 tile, still in
// cache, goes to the epilogue, which dequantizes and stores it. All paths are bit-identical: the int32 sums are exact, and the
// epilogue does the same fp32 operations in the same order with the same rounding (no FMA).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>



#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "cpu/isa.h"
#include "cpu/knobs.h"
#include "cpu/memory.h"
#include "cpu/int8_matmul_kernels.h"
#include "cpu/quantize.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if FRUGAL_X86
#include <immintrin.h>
#endif

namespace frugal::cpu {
namespace {

using namespace int8_kernels;

// ---------------------------------------------------------------------------------------------
// Packed weight (int8_pack_weight), a 1-D int8 tensor:
//   bytes [0, 64)            header: "frgi8w01", int64 N, int64 K, zero padding
//   int32 comp[Npad]         comp[n] = -128 * sum_k b[n, k] (the VNNI path's a + 128
//                            correction), 0 for padding columns
//   groups of 64 columns     group g holds columns [64g, 64g + W_g), W_g = min(64, Npad - 64g),
//                            as [K4][W_g][4] bytes: (k4, c, j) = b[64g + c, 4 k4 + j]
// with Npad = N rounded up to 16, K4 = ceil(K / 4), and zeros beyond N and K; in all
// 64 + 4 Npad + 4 Npad K4 bytes.
// ---------------------------------------------------------------------------------------------
constexpr char kMagic[8] = {'f', 'r', 'g', 'i', '8', 'w', '0', '1'};
constexpr int64_t kHeaderBytes = 64;
// vpdpbusd sums K products of up to 128 * 128 in int32: K * 2^14 < 2^31 needs K <= 131071.
constexpr int64_t kMaxK = 131071;

// For a >= 0, b > 0, without the overflow of (a + b - 1) / b near INT64_MAX.
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

struct PackedDims {
  int64_t N, K, K4, Npad, bytes;
};

// The dims of a packed N x K weight (N >= 0, 0 <= K <= kMaxK) and its size in bytes, checked to
// fit in int64: a corrupt header, or an empty b [N, 0] with a huge N, can ask for more.
PackedDims packed_dims(const char* op, int64_t N, int64_t K) {
  PackedDims d{N, K, ceil_div(K, 4), 0, 0};
  int64_t words = 0;  // int32 comp[Npad] and the [Npad][K4] 4-byte steps
  const bool overflow = c10::mul_overflows(ceil_div(N, 16), int64_t{16}, &d.Npad) ||
                        c10::mul_overflows(d.Npad, d.K4 + 1, &words) ||
                        c10::mul_overflows(words, int64_t{4}, &d.bytes) ||
                        c10::add_overflows(d.bytes, kHeaderBytes, &d.bytes);
  TORCH_CHECK(!overflow, op, ": a packed int8 weight of N = ", N, ", K = ", K,
              " would take more than 2^63 bytes");
  return d;
}

// The weight of a GEMM: an int8_pack_weight buffer, or the rows of b [N, K], which the GEMM
// packs group by group as its tasks reach them, into a per-thread buffer that stays in cache.
struct Weight {
  PackedDims d;
  const int32_t* comp = nullptr;  // packed: comp[Npad] and the groups; null for rows
  const int8_t* data = nullptr;
  const int8_t* rows = nullptr;  // rows: row stride ldb
  int64_t ldb = 0;
};

Weight packed_weight(const PackedDims& d, const int8_t* buf) {
  Weight w;
  w.d = d;
  w.comp = reinterpret_cast<const int32_t*>(buf + kHeaderBytes);
  w.data = buf + kHeaderBytes + 4 * d.Npad;
  return w;
}

Weight row_weight(const char* op, const at::Tensor& b) {
  Weight w;
  w.d = packed_dims(op, b.size(0), b.size(1));
  w.rows = b.const_data_ptr<int8_t>();
  w.ldb = b.stride(0);
  return w;
}

// Packing 16 rows of b (a null row is zeros) as a 16-column block of a group of width W:
// dst[(k4 * W + i) * 4 + j] = rows[i][4 k4 + j], and sums[i] = sum_k rows[i][k]. A block's
// k4 step is one 64-byte line, written whole before moving on. The vector loops transpose
// 4 x 4 int32 blocks (4 k4 steps of 4 rows) within each 128-bit lane, and sum the bytes with
// psadbw: sum(b) = sum(b ^ 0x80) - 128 per byte.
constexpr int kBlockRows = 16;

// The k4 steps from k4 on, one at a time.
void pack_block_tail(const int8_t* const rows[kBlockRows], int64_t K, int64_t K4, int64_t W,
                     int64_t k4, int8_t* dst, int64_t sums[kBlockRows]) {
  for (; k4 < K4; ++k4) {
    const int64_t bytes = std::min<int64_t>(4, K - 4 * k4);
    for (int i = 0; i < kBlockRows; ++i) {
      int8_t v[4] = {0, 0, 0, 0};
      if (rows[i] != nullptr) std::memcpy(v, rows[i] + 4 * k4, bytes);
      std::memcpy(dst + (k4 * W + i) * 4, v, 4);
      sums[i] += v[0] + v[1] + v[2] + v[3];
    }
  }
}

#if FRUGAL_X86

FRUGAL_TARGET_AVX512 void pack_block_avx512(const int8_t* const rows[kBlockRows], int64_t ldb,
                                            int64_t K, int64_t K4, int64_t W, int8_t* dst,
                                            int64_t sums[kBlockRows]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc[kBlockRows];
  for (int i = 0; i < kBlockRows; ++i) acc[i] = _mm512_setzero_si512();
  int64_t k4 = 0;
  for (; 4 * k4 + 64 <= K; k4 += 16) {
    for (int q = 0; q < kBlockRows; q += 4) {
      __m512i r[4];
      for (int i = 0; i < 4; ++i) {
        const int8_t* row = rows[q + i];
        r[i] = row == nullptr ? _mm512_setzero_si512() : _mm512_loadu_si512(row + 4 * k4);
        // Each row is a short stream (often one page, where hardware prefetchers stop): fetch
        // the same line of the row one block further on (a bad address is ignored).
        _mm_prefetch(reinterpret_cast<const char*>(row + ldb * kBlockRows + 4 * k4), _MM_HINT_T1);
        acc[q + i] = _mm512_add_epi64(
            acc[q + i], _mm512_sad_epu8(_mm512_xor_si512(r[i], flip), _mm512_setzero_si512()));
      }
      const __m512i t0 = _mm512_unpacklo_epi32(r[0], r[1]);
      const __m512i t1 = _mm512_unpacklo_epi32(r[2], r[3]);
      const __m512i t2 = _mm512_unpackhi_epi32(r[0], r[1]);
      const __m512i t3 = _mm512_unpackhi_epi32(r[2], r[3]);
      const __m512i o[4] = {_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1),
                            _mm512_unpacklo_epi64(t2, t3), _mm512_unpackhi_epi64(t2, t3)};
      // 128-bit lane l of o[j] holds step k4 + 4 l + j.
      for (int j = 0; j < 4; ++j) {
        int8_t* out = dst + (k4 + j) * W * 4 + q * 4;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_castsi512_si128(o[j]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * W),
                         _mm512_extracti32x4_epi32(o[j], 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * W),
                         _mm512_extracti32x4_epi32(o[j], 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 48 * W),
                         _mm512_extracti32x4_epi32(o[j], 3));
      }
    }
  }
  for (int i = 0; i < kBlockRows; ++i) {
    sums[i] = rows[i] == nullptr ? 0 : _mm512_reduce_add_epi64(acc[i]) - 128 * 4 * k4;
  }
  pack_block_tail(rows, K, K4, W, k4, dst, sums);
}

#endif  // FRUGAL_X86

void pack_block(const int8_t* const rows[kBlockRows], int64_t ldb, int64_t K, int64_t K4,
                int64_t W, int8_t* dst, int64_t sums[kBlockRows]) {
#if FRUGAL_X86
  if (current_isa() >= Isa::kAvx512) return pack_block_avx512(rows, ldb, K, K4, W, dst, sums);
  // SSE2 is part of x86-64.
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  __m128i acc[kBlockRows];
  for (int i = 0; i < kBlockRows; ++i) acc[i] = _mm_setzero_si128();
  int64_t k4 = 0;
  for (; 4 * k4 + 16 <= K; k4 += 4) {
    for (int q = 0; q < kBlockRows; q += 4) {
      __m128i r[4];
      for (int i = 0; i < 4; ++i) {
        const int8_t* row = rows[q + i];
        r[i] = row == nullptr ? _mm_setzero_si128()
                              : _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 4 * k4));
        if (k4 % 16 == 0) {
          _mm_prefetch(reinterpret_cast<const char*>(row + ldb * kBlockRows + 4 * k4), _MM_HINT_T1);
        }
        acc[q + i] = _mm_add_epi64(acc[q + i],
                                   _mm_sad_epu8(_mm_xor_si128(r[i], flip), _mm_setzero_si128()));
      }
      const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpacklo_epi32(r[2], r[3]);
      const __m128i t2 = _mm_unpackhi_epi32(r[0], r[1]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
      const __m128i o[4] = {_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1),
                            _mm_unpacklo_epi64(t2, t3), _mm_unpackhi_epi64(t2, t3)};
      for (int j = 0; j < 4; ++j) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (k4 + j) * W * 4 + q * 4), o[j]);
      }
    }
  }
  for (int i = 0; i < kBlockRows; ++i) {
    const int64_t total =
        _mm_cvtsi128_si64(acc[i]) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(acc[i], acc[i]));
    sums[i] = rows[i] == nullptr ? 0 : total - 128 * 4 * k4;
  }
  pack_block_tail(rows, K, K4, W, k4, dst, sums);
#else
  for (int i = 0; i < kBlockRows; ++i) sums[i] = 0;
  pack_block_tail(rows, K, K4, W, 0, dst, sums);
#endif
}

// Packs group g of b (rows of K bytes, row stride ldb): its [K4][W][4] bytes into data and
// its W compensation terms into comp.
void pack_group(const int8_t* b, int64_t ldb, const PackedDims& d, int64_t g, int8_t* data,
                int32_t* comp) {
  const int64_t W = std::min<int64_t>(kGroupCols, d.Npad - g * kGroupCols);
  for (int64_t c = 0; c < W; c += kBlockRows) {
    const int8_t* rows[kBlockRows];
    for (int i = 0; i < kBlockRows; ++i) {
      const int64_t n = g * kGroupCols + c + i;
      rows[i] = n < d.N ? b + n * ldb : nullptr;
    }
    int64_t sums[kBlockRows];
    pack_block(rows, ldb, d.K, d.K4, W, data + c * 4, sums);
    // |sum| <= 128 * 131071, so -128 * sum fits in int32.
    for (int i = 0; i < kBlockRows; ++i) comp[c + i] = static_cast<int32_t>(-128 * sums[i]);
  }
}

// Writes the packed form of b (rows of K bytes, row stride ldb) into buf.
void pack_weight_into(const int8_t* b, int64_t ldb, const PackedDims& d, int8_t* buf) {
  std::memset(buf, 0, kHeaderBytes);
  std::memcpy(buf, kMagic, sizeof(kMagic));
  std::memcpy(buf + 8, &d.N, 8);
  std::memcpy(buf + 16, &d.K, 8);
  auto* comp = reinterpret_cast<int32_t*>(buf + kHeaderBytes);
  int8_t* data = buf + kHeaderBytes + 4 * d.Npad;
  const int64_t groups = ceil_div(d.Npad, kGroupCols);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(d.K4 * 256, 1));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      pack_group(b, ldb, d, g, data + g * d.K4 * kGroupCols * 4, comp + g * kGroupCols);
    }
  });
}

// Reads and checks the header of an int8_pack_weight buffer.
PackedDims read_header(const char* op, const at::Tensor& b_packed) {
  TORCH_CHECK(b_packed.scalar_type() == at::kChar && b_packed.dim() == 1, op,
              ": b_packed must be the 1-D int8 buffer int8_pack_weight returns; got a ",
              b_packed.dim(), "-D ", b_packed.scalar_type(), " tensor");
  TORCH_CHECK(b_packed.device().is_cpu(), op, ": b_packed must be on the CPU; got ",
              b_packed.device());
  TORCH_CHECK(b_packed.numel() >= kHeaderBytes, op,
              ": b_packed is not an int8_pack_weight buffer (", b_packed.numel(),
              " bytes, shorter than its ", kHeaderBytes, "-byte header)");
  const auto* buf = b_packed.const_data_ptr<int8_t>();
  TORCH_CHECK(b_packed.stride(0) == 1, op, ": b_packed must be contiguous; got stride ",
              b_packed.stride(0));
  TORCH_CHECK(std::memcmp(buf, kMagic, sizeof(kMagic)) == 0, op,
              ": b_packed is not an int8_pack_weight buffer (no 'frgi8w01' header)");
  int64_t N, K;
  std::memcpy(&N, buf + 8, 8);
  std::memcpy(&K, buf + 16, 8);
  TORCH_CHECK(N >= 0 && K >= 0 && K <= kMaxK, op, ": b_packed has a corrupt header (N = ", N,
              ", K = ", K, "; N must be >= 0 and K in [0, ", kMaxK, "])");
  const PackedDims d = packed_dims(op, N, K);
  TORCH_CHECK(b_packed.numel() == d.bytes, op, ": b_packed holds N = ", N, ", K = ", K,
              ", which take ", d.bytes, " bytes; got ", b_packed.numel(), " bytes");
  return d;
}

// ---------------------------------------------------------------------------------------------
// Memory: the packed rows of a, and the output.
// ---------------------------------------------------------------------------------------------

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<uint8_t[], FreeDeleter>;

Buffer aligned_buffer(int64_t bytes) {
  const int64_t rounded = ceil_div(std::max<int64_t>(bytes, 1), 64) * 64;
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, static_cast<size_t>(rounded)));
  TORCH_CHECK(p != nullptr, "int8 GEMM: out of memory allocating ", bytes, " bytes");
  return Buffer(p);
}

// The packed rows of a go to a buffer the calling thread keeps between calls, up to this size
// (M = 8192 rows at K = 4096): fresh memory would cost a page fault per 4 KiB on every call,
// several percent of a large GEMM. Larger buffers live for one call.
constexpr int64_t kKeptScratchBytes = int64_t{32} << 20;

uint8_t* a_scratch(int64_t bytes, Buffer& one_call) {
  if (bytes > kKeptScratchBytes) {
    one_call = aligned_buffer(bytes);
    return one_call.get();
  }
  thread_local Buffer kept;
  thread_local int64_t kept_bytes = 0;
  if (kept_bytes < bytes) {
    kept.reset();
    kept = aligned_buffer(bytes);
    kept_bytes = bytes;
  }
  return kept.get();
}

// A fresh [M, N] output, marked for huge pages when large (csrc/cpu/memory.h): for a 32 MiB
// output that saves milliseconds of first-touch page faults per call.
at::Tensor empty_output(int64_t M, int64_t N, const at::TensorOptions& options) {
  return empty_hinted({M, N}, options);
}

// ---------------------------------------------------------------------------------------------
// The GEMM driver.
// ---------------------------------------------------------------------------------------------

#if FRUGAL_X86
// Gives the tile state back (the kernel then saves none of it on a context switch).
FRUGAL_TARGET_AMX void amx_release() { amx::AmxHw::release(); }
#endif

struct IsaKernels {
  int mr;
  bool shifted_a;  // a packed as a + 128: the sums start at comp
  PackAFn pack_a;
  TileFn (*tile)(int mr, int nb);
  EpilogueFn epilogue;
  int64_t k4_align = 1;         // K blocks are multiples of this many k4 steps (the tile's depth)
  void (*finish)() = nullptr;   // called by each worker thread after its last tile
  TileFn (*tile_no_min)(int mr, int nb) = nullptr;  // the tile when a holds no -128 (packed)
};

// The register-tile kernels of a level below kAmx.
IsaKernels vector_kernels_for(Isa isa) {
#if FRUGAL_X86
  if (isa >= Isa::kAvx512Vnni) {
    return {kMrVnni, true, &pack_a_vnni, &tile_vnni, &epilogue_avx512};
  }
  if (isa >= Isa::kAvx512) {
    return {kMrAvx512, false, &pack_a_signed, &tile_avx512, &epilogue_avx512};
  }
  if (isa >= Isa::kAvx2) {
    return {kMrAvx2, false, &pack_a_signed, &tile_avx2, &epilogue_avx2, 1, nullptr,
            &tile_avx2_sign};
  }
#endif
  (void)isa;
  return {kMrScalar, false, &pack_a_signed, &tile_scalar, &epilogue_scalar};
}

IsaKernels kernels_for(Isa isa) {
#if FRUGAL_X86
  if (amx_emulation()) {
    return {kMrAmx, false, &pack_a_signed, &tile_amx<amx::AmxEmu>,
            vector_kernels_for(isa).epilogue, 16, &amx::AmxEmu::release};
  }
  if (isa >= Isa::kAmx) {
    return {kMrAmx, false, &pack_a_signed, &tile_amx<amx::AmxHw>, &epilogue_avx512, 16,
            &amx_release};
  }
#endif
  return vector_kernels_for(isa);
}

// K is split into blocks of at most int8_block_k4 k4 steps (default 1024: 4 KB of each row),
// and a task takes as many groups (up to int8_task_groups, default 4) as keep its blocks of b
// within int8_task_block_bytes (default 512 KB): while every row tile of the task runs over
// them, a row tile's block of a (6 x 4 KB) stays in L1 and the blocks of b in L2. The int32
// sums wait in a per-thread buffer between K blocks. (Knobs: csrc/cpu/knobs.h.)
constexpr int64_t kMaxTaskGroups = 64;  // int8_task_groups' upper bound: a task's group array
// A task's multiply-adds: 2^28 take about 0.5 ms on a core that runs 2 vpdpbusd per cycle at
// 4 GHz. The threads finish within about one task of each other, and bringing a task's groups
// into L2 (512 KB) costs under 1% of it.
constexpr int64_t kMaxTaskMacs = int64_t{1} << 28;

// Writes rows [begin, end) of a, as the tiles read them (with pack_a), to dst, row stride
// ld_dst. Called on several threads at once, for disjoint rows.
using PackRowsFn =
    c10::function_ref<void(int64_t begin, int64_t end, PackAFn pack_a, uint8_t* dst,
                           int64_t ld_dst)>;

using StreamFn = void (*)(const int8_t* a, int64_t lda, int mw, const int8_t* b, int64_t ldb,
                         int nw, int64_t K, int32_t* sums);

#if FRUGAL_X86
template <template <int, int> class Tile>
void stream_tiles(const int8_t* a, int64_t lda, int mw, const int8_t* b, int64_t ldb, int nw,
                  int64_t K, int32_t* sums) {
  call_mw_nw<Tile, kStreamMaxRows>(mw, nw, a, lda, b, ldb, K, sums);
}
#endif

// gemm for M <= kStreamMaxRows rows of a over the rows of b [N, K] as they are: packing b
// would read and write it once more than the multiply-adds read it. The int32 sums are exact,
// and the same epilogue writes them, so the result is bit-identical to the packed path's.
void gemm_stream(int64_t M, const Weight& w, const Epilogue& epi, PackRowsFn pack_rows) {
  const PackedDims& d = w.d;
  const Isa isa = current_isa();
  const IsaKernels ker = kernels_for(isa);
  const int64_t lda = 4 * d.K4;
  std::vector<int8_t> a(std::max<int64_t>(M * lda, 1));
  pack_rows(0, M, &pack_a_signed, reinterpret_cast<uint8_t*>(a.data()), lda);
  StreamFn fn = &stream_scalar;
  uint32_t corr[kStreamMaxRows] = {};  // VNNI: 128 * sum_k a[m, k], subtracted (mod 2^32)
#if FRUGAL_X86
  if (isa >= Isa::kAvx512Vnni) {
    fn = &stream_tiles<StreamTileVnni>;
    for (int64_t m = 0; m < M; ++m) {
      int64_t s = 0;
      for (int64_t k = 0; k < d.K; ++k) s += a[m * lda + k];
      corr[m] = static_cast<uint32_t>(128 * s);
    }
  } else if (isa >= Isa::kAvx512) {
    fn = &stream_tiles<StreamTileAvx512>;
  } else if (isa >= Isa::kAvx2) {
    fn = &stream_tiles<StreamTileAvx2>;
  }
#endif
  const int64_t groups = ceil_div(d.N, kGroupCols);
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / (kGroupCols * std::max<int64_t>(d.K, 1)));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    alignas(64) int32_t tile[kStreamMaxRows * kGroupCols];
    int32_t sums[kStreamMaxRows * kStreamCols];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kGroupCols;
      const int nc = static_cast<int>(std::min<int64_t>(kGroupCols, d.N - n0));
      for (int c = 0; c < nc; c += kStreamCols) {
        const int nw = static_cast<int>(std::min<int64_t>(kStreamCols, nc - c));
        fn(a.data(), lda, static_cast<int>(M), w.rows + (n0 + c) * w.ldb, w.ldb, nw, d.K, sums);
        for (int64_t r = 0; r < M; ++r) {
          for (int j = 0; j < nw; ++j) {
            tile[r * kGroupCols + c + j] =
                static_cast<int32_t>(static_cast<uint32_t>(sums[r * nw + j]) - corr[r]);
          }
        }
      }
      ker.epilogue(tile, static_cast<int>(M), 0, n0, nc, epi);
    }
  });
}

// out[m, n] = epilogue((a @ b^T)[m, n]) for the M rows of a that pack_rows writes.
void gemm(int64_t M, const Weight& w, const Epilogue& epi, PackRowsFn pack_rows) {
  // The knobs, read on the calling thread (their overrides are its own).
  const int64_t stream_max_m = std::min<int64_t>(knob(Knob::int8_stream_max_m), kStreamMaxRows);
  const int64_t max_block_k4 = knob(Knob::int8_block_k4);
  const int64_t task_groups = knob(Knob::int8_task_groups);
  const int64_t task_block_bytes = knob(Knob::int8_task_block_bytes);
  if (w.rows != nullptr && M <= stream_max_m) return gemm_stream(M, w, epi, pack_rows);
  const PackedDims& d = w.d;
  const IsaKernels ker = kernels_for(current_isa());
  const int64_t K4 = d.K4;
  const int64_t mr = ker.mr;
  const int64_t tiles = ceil_div(M, mr);

  // a as the tiles read it: rows of 4 * K4 bytes, one cache line apart more for the AMX tile,
  // whose 16 rows at a stride of a multiple of 4 KB would share one L1 set (12 ways).
  const int64_t lda_p = 4 * K4 + (ker.k4_align > 1 ? 64 : 0);
  Buffer one_call;
  uint8_t* ap = a_scratch(M * lda_p, one_call);
  const int64_t pack_grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(lda_p, 1));
  std::atomic<bool> a_has_min{false};  // a byte -128 in a (signed packing): see tile_no_min
  at::parallel_for(0, M, pack_grain, [&](int64_t begin, int64_t end) {
    pack_rows(begin, end, ker.pack_a, ap + begin * lda_p, lda_p);
    if (ker.tile_no_min == nullptr) return;
    for (int64_t m = begin; m < end && !a_has_min.load(std::memory_order_relaxed); ++m) {
      if (std::memchr(ap + m * lda_p, 0x80, 4 * K4) != nullptr) a_has_min = true;
    }
  });
  const auto tile_for = ker.tile_no_min != nullptr && !a_has_min ? ker.tile_no_min : ker.tile;

  // Tasks: (set of consecutive groups, block of rows), in weight order. A task reads its rows
  // of a once for all its groups. Rows are split when there are too few groups to feed every
  // thread, and into tasks of at most about kMaxTaskMacs. Threads take chunks of tasks from a
  // shared counter: a thread that runs slower (a core shared with another process) takes fewer.
  // Blocks of a multiple of the tile's depth (AMX: 16 k4 steps, which may take a block up to
  // 15 steps past the knob), so that only the last block has a tail.
  const int64_t block_k4 =
      ceil_div(ceil_div(K4, std::max<int64_t>(1, ceil_div(K4, max_block_k4))), ker.k4_align) *
      ker.k4_align;
  const int64_t k_blocks = std::max<int64_t>(1, ceil_div(K4, std::max<int64_t>(block_k4, 1)));
  const int64_t groups = ceil_div(d.N, kGroupCols);
  const int64_t threads = at::get_num_threads();
  const int64_t group_block_bytes = kGroupCols * 4 * std::max<int64_t>(block_k4, 1);
  const int64_t set_size =
      w.data == nullptr  // rows of b packed per call take a buffer per group: one per task
          ? 1
          : std::clamp<int64_t>(
                std::min(groups / (4 * threads), task_block_bytes / group_block_bytes), 1,
                task_groups);
  const int64_t sets = ceil_div(groups, set_size);
  const int64_t set_macs = set_size * kGroupCols * 4 * std::max<int64_t>(K4, 1) * M;
  const int64_t row_blocks = std::min(
      tiles, std::max({int64_t{1}, ceil_div(4 * threads, sets), ceil_div(set_macs, kMaxTaskMacs)}));
  const int64_t tiles_per_block = ceil_div(tiles, row_blocks);
  const int64_t tasks = sets * row_blocks;
  const int64_t work_per_task =
      set_size * tiles_per_block * mr * kGroupCols * std::max<int64_t>(K4, 1);
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 20) / work_per_task);
  const int64_t workers = std::min(threads, ceil_div(tasks, chunk));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    alignas(64) int32_t packed_comp[kGroupCols];
    std::vector<int8_t> packed_data(w.data == nullptr ? d.K4 * kGroupCols * 4 : 0);
    int64_t packed_group = -1;
    // The int32 sums of every tile of a task wait here between K blocks; with one K block, a
    // tile's sums go straight to the epilogue and one tile's worth of space is reused.
    const int64_t sum_tiles = k_blocks == 1 ? 1 : set_size * tiles_per_block;
    std::vector<int32_t> sums(sum_tiles * mr * kGroupCols);
    struct Group {
      const int8_t* data;
      const int32_t* comp;
      int64_t W, n0;
      int nc;
    } set[kMaxTaskGroups];
    for (;;) {
      const int64_t first = next.fetch_add(chunk, std::memory_order_relaxed);
      if (first >= tasks) break;
      for (int64_t task = first; task < std::min(tasks, first + chunk); ++task) {
        const int64_t g0 = task / row_blocks * set_size;
        const int64_t ng = std::min(set_size, groups - g0);
        for (int64_t i = 0; i < ng; ++i) {
          const int64_t g = g0 + i;
          Group& grp = set[i];
          grp.W = std::min<int64_t>(kGroupCols, d.Npad - g * kGroupCols);
          grp.n0 = g * kGroupCols;
          grp.nc = static_cast<int>(std::min<int64_t>(kGroupCols, d.N - grp.n0));
          if (w.data != nullptr) {
            grp.data = w.data + g * K4 * kGroupCols * 4;
            grp.comp = w.comp + grp.n0;
          } else {
            if (packed_group != g) pack_group(w.rows, w.ldb, d, g, packed_data.data(), packed_comp);
            packed_group = g;
            grp.data = packed_data.data();
            grp.comp = packed_comp;
          }
        }
        const int64_t t_begin = task % row_blocks * tiles_per_block;
        const int64_t t_end = std::min(tiles, t_begin + tiles_per_block);
        for (int64_t kb = 0; kb < k_blocks; ++kb) {
          const int64_t k0 = kb * block_k4;
          const int64_t kc = std::min(block_k4, K4 - k0);
          for (int64_t t = t_begin; t < t_end; ++t) {
            const int64_t m0 = t * mr;
            const int rows = static_cast<int>(std::min(mr, M - m0));
            const uint8_t* a_tile = ap + m0 * lda_p + 4 * k0;
            for (int64_t i = 0; i < ng; ++i) {
              const Group& grp = set[i];
              const TileFn fn = tile_for(rows, static_cast<int>(grp.W / 16));
              const int64_t slot = k_blocks == 1 ? 0 : i * tiles_per_block + t - t_begin;
              int32_t* acc = sums.data() + slot * mr * kGroupCols;
              if (kb == 0) {
                fn(a_tile, lda_p, grp.data, kc, ker.shifted_a ? grp.comp : nullptr, 0, acc);
              } else {
                fn(a_tile, lda_p, grp.data + k0 * grp.W * 4, kc, acc, kGroupCols, acc);
              }
              if (kb == k_blocks - 1) ker.epilogue(acc, rows, m0, grp.n0, grp.nc, epi);
            }
          }
        }
      }
    }
    if (ker.finish != nullptr) ker.finish();
  });
}

// ---------------------------------------------------------------------------------------------
// Input checks and the ops.
// ---------------------------------------------------------------------------------------------

void check_int8_matrix(const char* op, const char* name, const at::Tensor& t, const char* shape) {
  TORCH_CHECK(t.scalar_type() == at::kChar, op, ": ", name, " must be int8; got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", shape, "; got a ", t.dim(),
              "-D tensor of shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU; got ", t.device());
}

// x: a 2-D float32, float16 or bfloat16 activation [M, K] on the CPU.
void check_float_matrix(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float16 or bfloat16; got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K]; got a ", x.dim(),
              "-D tensor of shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU; got ", x.device());
}

void check_k(const char* op, int64_t K) {
  TORCH_CHECK(K <= kMaxK, op, ": K must be <= ", kMaxK,
              " (larger K can overflow the int32 accumulator); got K = ", K);
}

void check_same_k(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.size(1) == b.size(1), op,
              ": a [M, K] and b [N, K] must have the same K; got a.size(1) = ", a.size(1),
              ", b.size(1) = ", b.size(1));
}

// A float32 scale with `want` elements (or 1 when allow_one), as a contiguous 1-D tensor.
at::Tensor check_scale(const char* op, const char* name, const at::Tensor& s, int64_t want,
                       const char* dim_name, bool allow_one) {
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " must be float32; got ",
              s.scalar_type());
  TORCH_CHECK(s.device().is_cpu(), op, ": ", name, " must be on the CPU; got ", s.device());
  if (allow_one) {
    TORCH_CHECK(s.numel() == want || s.numel() == 1, op, ": ", name, " must have ", dim_name,
                " = ", want, " or 1 elements; got ", s.numel(), " (shape ", s.sizes(), ")");
  } else {
    TORCH_CHECK(s.numel() == want, op, ": ", name, " must have ", dim_name, " = ", want,
                " elements; got ", s.numel(), " (shape ", s.sizes(), ")");
  }
  return s.reshape({-1}).contiguous();
}

// bias [N] in any float dtype as contiguous float32, or an undefined tensor.
at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return {};
  const at::Tensor& t = *bias;
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              op, ": bias must be float32, float16 or bfloat16; got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N, op, ": bias must have shape [N] = [", N,
              "]; got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": bias must be on the CPU; got ", t.device());
  return t.to(at::kFloat).contiguous();
}

void check_out_dtype(const char* op, at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16; got ", out_dtype);
}

at::Tensor k_contiguous(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

// gemm's rows of an int8 a [M, K] with unit stride along K.
auto int8_rows(const at::Tensor& a) {
  const int8_t* ap = a.const_data_ptr<int8_t>();
  const int64_t lda = a.stride(0), K = a.size(1), K4 = ceil_div(K, 4);
  return [=](int64_t begin, int64_t end, PackAFn pack_a, uint8_t* dst, int64_t ld_dst) {
    for (int64_t m = begin; m < end; ++m) pack_a(ap + m * lda, K, K4, dst + (m - begin) * ld_dst);
  };
}

// The GEMM with the float epilogue into a new [M, N] tensor of out_dtype, on the rows that
// `rows` writes; a_scale holds M scales (stride 1) or one (stride 0), read once every row is
// packed. Scales and bias already checked.
at::Tensor scaled_gemm(int64_t M, const Weight& w, const float* a_scale, int64_t a_scale_stride,
                       const at::Tensor& b_scale, const at::Tensor& bias,
                       at::ScalarType out_dtype, const at::TensorOptions& options,
                       PackRowsFn rows) {
  const int64_t N = w.d.N;
  at::Tensor out = empty_output(M, N, options.dtype(out_dtype));
  if (M == 0 || N == 0) return out;
  const at::Tensor bs = b_scale.numel() == N ? b_scale : b_scale.expand({N}).contiguous();
  Epilogue epi;
  epi.out = out.data_ptr();
  epi.ldo = N;
  epi.out_type = out_dtype == at::kFloat ? OutType::kFloat
                 : out_dtype == at::kHalf ? OutType::kHalf
                                          : OutType::kBFloat16;
  epi.a_scale = a_scale;
  epi.a_scale_stride = a_scale_stride;
  epi.b_scale = bs.const_data_ptr<float>();
  epi.bias = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  gemm(M, w, epi, rows);
  return out;
}

// scaled_gemm for an int8 a [M, K] and a_scale [M] or [1].
at::Tensor scaled_gemm(const at::Tensor& a, const Weight& w, const at::Tensor& a_scale,
                       const at::Tensor& b_scale, const at::Tensor& bias,
                       at::ScalarType out_dtype) {
  const at::Tensor ac = k_contiguous(a);
  return scaled_gemm(a.size(0), w, a_scale.const_data_ptr<float>(), a_scale.numel() == 1 ? 0 : 1,
                     b_scale, bias, out_dtype, a.options(), int8_rows(ac));
}

at::Tensor int8_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "int8_mm";
  check_int8_matrix(op, "a", a, "[M, K]");
  check_int8_matrix(op, "b", b, "[N, K]");
  check_same_k(op, a, b);
  check_k(op, a.size(1));
  const int64_t M = a.size(0), N = b.size(0);
  at::Tensor out = empty_output(M, N, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  Epilogue epi;
  epi.out = out.data_ptr();
  epi.ldo = N;
  epi.out_type = OutType::kInt32;
  const at::Tensor ac = k_contiguous(a);
  const at::Tensor bc = k_contiguous(b);
  gemm(M, row_weight(op, bc), epi, int8_rows(ac));
  return out;
}

at::Tensor int8_scaled_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                              const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype) {
  constexpr const char* op = "int8_scaled_mm";
  check_int8_matrix(op, "a", a, "[M, K]");
  check_int8_matrix(op, "b", b, "[N, K]");
  check_same_k(op, a, b);
  check_k(op, a.size(1));
  const int64_t M = a.size(0), N = b.size(0);
  const at::Tensor as = check_scale(op, "a_scale", a_scale, M, "M", true);
  const at::Tensor bs = check_scale(op, "b_scale", b_scale, N, "N", true);
  const at::Tensor bias_f = check_bias(op, bias, N);
  check_out_dtype(op, out_dtype);
  const at::Tensor bc = k_contiguous(b);
  return scaled_gemm(a, row_weight(op, bc), as, bs, bias_f, out_dtype);
}

at::Tensor int8_pack_weight_cpu(const at::Tensor& b) {
  constexpr const char* op = "int8_pack_weight";
  check_int8_matrix(op, "b", b, "[N, K]");
  check_k(op, b.size(1));
  const at::Tensor bc = k_contiguous(b);
  const PackedDims d = packed_dims(op, bc.size(0), bc.size(1));
  // A weight of 8 MiB or more on 2 MiB pages: the GEMV of a few rows streams it from memory,
  // and read through 4 KiB pages it ran 1.2-1.3x slower (N = 11008, K = 4096, Zen 4).
  at::Tensor buf = empty_hinted({d.bytes}, bc.options());
  pack_weight_into(bc.const_data_ptr<int8_t>(), bc.stride(0), d, buf.data_ptr<int8_t>());
  return buf;
}

// Checks b_packed and b_scale [N] against each other and against the activation `a_name`
// [M, K] (already checked to be 2-D); returns the packed weight's dims.
PackedDims check_packed(const char* op, const at::Tensor& b_packed, const at::Tensor& b_scale,
                        const char* a_name, const at::Tensor& a) {
  const PackedDims d = read_header(op, b_packed);
  TORCH_CHECK(b_scale.dim() == 1, op, ": b_scale must be 1-D [N] (N is read from it); got shape ",
              b_scale.sizes());
  const int64_t N = b_scale.size(0);
  TORCH_CHECK(d.N == N, op, ": b_packed holds a weight with N = ", d.N,
              "; b_scale has N = ", N, " elements");
  TORCH_CHECK(d.K == a.size(1), op, ": b_packed holds a weight with K = ", d.K, "; ", a_name,
              " has K = ", a_name, ".size(1) = ", a.size(1));
  return d;
}

at::Tensor int8_scaled_mm_packed_cpu(const at::Tensor& a, const at::Tensor& b_packed,
                                     const at::Tensor& a_scale, const at::Tensor& b_scale,
                                     const std::optional<at::Tensor>& bias,
                                     at::ScalarType out_dtype) {
  constexpr const char* op = "int8_scaled_mm_packed";
  check_int8_matrix(op, "a", a, "[M, K]");
  const PackedDims d = check_packed(op, b_packed, b_scale, "a", a);
  const int64_t M = a.size(0), N = d.N;
  const at::Tensor as = check_scale(op, "a_scale", a_scale, M, "M", true);
  const at::Tensor bs = check_scale(op, "b_scale", b_scale, N, "N", false);
  const at::Tensor bias_f = check_bias(op, bias, N);
  check_out_dtype(op, out_dtype);
  return scaled_gemm(a, packed_weight(d, b_packed.const_data_ptr<int8_t>()), as, bs, bias_f,
                     out_dtype);
}

// gemm's rows of x [M, K] (unit stride along K) quantized per row as quantize_per_token does,
// with the row scales written to scale[M].
template <typename T>
auto quantized_rows(const at::Tensor& x, float* scale) {
  const T* xp = x.const_data_ptr<T>();
  const int64_t ldx = x.stride(0), K = x.size(1), K4 = ceil_div(K, 4);
  const Isa isa = current_isa();
  return [=](int64_t begin, int64_t end, PackAFn pack_a, uint8_t* dst, int64_t ld_dst) {
    std::vector<int8_t> q(std::max<int64_t>(K, 1));
    for (int64_t m = begin; m < end; ++m) {
      scale[m] = quantize_row(xp + m * ldx, q.data(), K, isa);
      pack_a(q.data(), K, K4, dst + (m - begin) * ld_dst);
    }
  };
}

at::Tensor int8_dynamic_linear_packed_cpu(const at::Tensor& x, const at::Tensor& b_packed,
                                          const at::Tensor& b_scale,
                                          const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int8_dynamic_linear_packed";
  check_float_matrix(op, x);
  const PackedDims d = check_packed(op, b_packed, b_scale, "x", x);
  const int64_t M = x.size(0), N = d.N;
  const at::Tensor bs = check_scale(op, "b_scale", b_scale, N, "N", false);
  const at::Tensor bias_f = check_bias(op, bias, N);
  const Weight w = packed_weight(d, b_packed.const_data_ptr<int8_t>());
  const at::Tensor xc = k_contiguous(x);
  std::vector<float> scale(M);
  const auto run = [&](auto rows) {
    return scaled_gemm(M, w, scale.data(), 1, bs, bias_f, x.scalar_type(), x.options(), rows);
  };
  switch (x.scalar_type()) {
    case at::kFloat: return run(quantized_rows<float>(xc, scale.data()));
    case at::kHalf: return run(quantized_rows<c10::Half>(xc, scale.data()));
    default: return run(quantized_rows<c10::BFloat16>(xc, scale.data()));
  }
}

at::Tensor int8_weight_only_mm_cpu(const at::Tensor& x, const at::Tensor& b,
                                   const at::Tensor& b_scale,
                                   const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int8_weight_only_mm";
  check_float_matrix(op, x);
  check_int8_matrix(op, "b", b, "[N, K]");
  TORCH_CHECK(x.size(1) == b.size(1), op,
              ": x [M, K] and b [N, K] must have the same K; got x.size(1) = ", x.size(1),
              ", b.size(1) = ", b.size(1));
  const int64_t M = x.size(0), N = b.size(0), K = x.size(1);
  at::Tensor bs = check_scale(op, "b_scale", b_scale, N, "N", true);
  if (bs.numel() != N) bs = bs.expand({N}).contiguous();
  const at::Tensor bias_f = check_bias(op, bias, N);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* bias_p = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;

  if (M > kWeightOnlyMaxStreamRows) {
    // Compute-bound: dequantize blocks of b to fp32 (exact) and let at::mm do the FLOPs.
    const int64_t rows =
        std::min(N, std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(K, 1)));
    at::Tensor y = at::empty({M, rows}, xf.options());
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
      const int64_t nb = std::min(rows, N - n0);
      const at::Tensor w = b.narrow(0, n0, nb).to(at::kFloat);
      at::Tensor yb = y.narrow(1, 0, nb);
      at::mm_out(yb, xf, w.t());
      yb.mul_(bs.narrow(0, n0, nb));
      if (bias_p != nullptr) yb.add_(bias_f.narrow(0, n0, nb));
      out.narrow(1, n0, nb).copy_(yb);
    }
    return out;
  }

  const at::Tensor bc = k_contiguous(b);
  WeightOnlyArgs args;
  args.x = xf.const_data_ptr<float>();
  args.ldx = K;
  args.M = M;
  args.K = K;
  args.b = bc.const_data_ptr<int8_t>();
  args.ldb = bc.stride(0);
  args.scale = bs.const_data_ptr<float>();
  args.bias = bias_p;
  args.out = out.data_ptr();
  args.ldo = N;
  args.out_type = x.scalar_type() == at::kFloat ? OutType::kFloat
                  : x.scalar_type() == at::kHalf ? OutType::kHalf
                                                 : OutType::kBFloat16;
  const Isa isa = current_isa();
  WeightOnlyFn fn = &weight_only_scalar;
#if FRUGAL_X86
  if (isa >= Isa::kAvx512) {
    fn = &weight_only_avx512;
  } else if (isa >= Isa::kAvx2) {
    fn = &weight_only_avx2;
  }
#endif
  (void)isa;
  const int64_t blocks = ceil_div(N, kWeightOnlyRows);
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / (kWeightOnlyRows * std::max<int64_t>(K, 1)));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    fn(args, begin * kWeightOnlyRows, std::min(N, end * kWeightOnlyRows));
  });
  return out;
}

}  // namespace

// The AMX tile on the instructions against the AVX-512 tile, on fixed pseudo-random bytes:
// every row count, every column-block count, and a depth with whole tiles and a tail (2 x 16
// + 7 k4 steps), from zero and from int32 sums. Run once, by cpu/isa.cpp's detection, on a CPU
// with AMX-INT8 whose kernel granted the tile state.
bool int8_amx_self_check() {
#if FRUGAL_X86
  constexpr int64_t K4 = 39, lda = 4 * K4 + 12;
  std::vector<uint8_t> a(kMrAmx * lda);
  std::vector<int8_t> b(K4 * kGroupCols * 4);
  std::vector<int32_t> init(kMrAmx * kGroupCols);
  uint32_t x = 12345;
  const auto next = [&x] {
    x = x * 1664525u + 1013904223u;
    return static_cast<uint8_t>(x >> 24);
  };
  for (auto& v : a) v = next();
  for (auto& v : b) v = static_cast<int8_t>(next());
  for (auto& v : init) v = static_cast<int32_t>(next()) * 65599 - (1 << 22);
  std::vector<int32_t> got(kMrAmx * kGroupCols), want(kMrAmx * kGroupCols);
  bool ok = true;
  for (int nb = 1; nb <= 4 && ok; ++nb) {
    const int8_t* group = b.data();  // a group of width 16 nb: the first 4 * 16 nb * K4 bytes
    for (int mr = 1; mr <= kMrAmx && ok; ++mr) {
      const int32_t* starts[] = {nullptr, init.data()};
      for (const int32_t* from : starts) {
        std::fill(got.begin(), got.end(), -1);
        std::fill(want.begin(), want.end(), -2);
        tile_amx<amx::AmxHw>(mr, nb)(a.data(), lda, group, K4, from, kGroupCols, got.data());
        for (int r = 0; r < mr; r += kMrAvx512) {
          const int rows = std::min<int>(kMrAvx512, mr - r);
          tile_avx512(rows, nb)(a.data() + r * lda, lda, group, K4,
                                from == nullptr ? nullptr : from + r * kGroupCols, kGroupCols,
                                want.data() + r * kGroupCols);
        }
        for (int r = 0; r < mr; ++r) {
          ok = ok && std::equal(got.begin() + r * kGroupCols,
                                got.begin() + r * kGroupCols + 16 * nb,
                                want.begin() + r * kGroupCols);
        }
      }
    }
  }
  amx_release();
  if (!ok) {
    TORCH_WARN("frugal: the AMX int8 tile disagreed with the AVX-512 tile in its self-check; "
               "the int8 GEMMs use AVX-512 VNNI on this CPU");
  }
  return ok;
#else
  return false;
#endif
}

}  // namespace frugal::cpu

TORCH_LIBRARY_IMPL(frugal, CPU, m) {
  m.impl("int8_mm", &frugal::cpu::int8_mm_cpu);
  m.impl("int8_scaled_mm", &frugal::cpu::int8_scaled_mm_cpu);
  m.impl("int8_pack_weight", &frugal::cpu::int8_pack_weight_cpu);
  m.impl("int8_scaled_mm_packed", &frugal::cpu::int8_scaled_mm_packed_cpu);
  m.impl("int8_dynamic_linear_packed", &frugal::cpu::int8_dynamic_linear_packed_cpu);
  m.impl("int8_weight_only_mm", &frugal::cpu::int8_weight_only_mm_cpu);
}
