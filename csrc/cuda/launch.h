// Launchers of the CUDA kernels: plain pointers and a stream, so the .cu files compile without
// torch headers (fast builds); the torch-facing glue lives in csrc/cuda/*_op.cpp. The same
// declarations are implemented twice from the same sources: by nvcc into frugal._C, and by the
// host emulation into frugal._cuda_emu (csrc/cuda_emu), where the tests run them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace frugal::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3, kInt32 = 4 };

// x: M rows of K elements, row i at x + i * row_stride (elements), columns contiguous.
// q: [M, K] int8 contiguous; scale: [M] float32.
cudaError_t launch_quantize_per_token(DType dtype, const void* x, int64_t row_stride, int8_t* q,
                                      float* scale, int64_t M, int64_t K, cudaStream_t stream);

// ------------------------------------------------------------------------ paged KV-cache

// One layer's K or V cache [num_blocks, block_size, Hkv, D] (element strides, unit stride in
// D) and, for int8 caches, its fp32 scales [num_blocks, block_size, Hkv] (any strides). Only
// paged_append writes through it.
struct PagedCache {
  void* data;
  int64_t stride_block, stride_offset, stride_head;
  float* scale;  // nullptr unless int8
  int64_t scale_stride_block, scale_stride_offset, scale_stride_head;
};

// paged_attention (decode: rows = B, one query per sequence) and paged_prefill_attention
// (rows = N packed queries, cu_seqlens_q [B + 1]) share their arguments. Contents (seq_lens,
// table entries, cu_seqlens_q) are read on the device only: the caller validates them.
struct PagedAttentionArgs {
  DType q_dtype, cache_dtype;        // cache_dtype is q_dtype or kInt8
  const void* q;                     // [rows, Hq, D], unit stride in D
  int64_t q_stride_row, q_stride_head;
  void* out;                         // [rows, Hq, D] contiguous, q's dtype
  float* lse;                        // [rows, Hq] fp32, natural log, or nullptr: not wanted
  PagedCache k, v;
  const int32_t* block_tables;       // [B, table_width], unit stride along the row
  int64_t table_stride;
  const int32_t* seq_lens;           // [B]
  const int32_t* cu_seqlens_q;       // [B + 1], prefill only
  int64_t batch, rows, num_q_heads, num_kv_heads, head_dim, block_size, table_width;
  float scale;                       // softmax scale
  int64_t window;                    // <= 0: none
  float softcap;                     // > 0: scores s become softcap * tanh(s / softcap)
  const float* alibi_slopes;         // [B, Hq] contiguous, or nullptr: no ALiBi bias
};

// The split-KV plan of a decode launch (see csrc/cuda/paged_attention.cu): made on the host
// from shapes alone (the table width bounds every seq_len), so no device value is read.
struct PagedAttentionPlan {
  int64_t units;         // blocks per partition: B * Hkv * cdiv(G, 8)
  int64_t splits;        // partitions per sequence (1: no split, no merge launch)
  int64_t partition;     // positions per partition, a multiple of the 8-position tile
  int64_t ws_o_floats;   // workspace: partial outputs, fp32 [B, Hq, splits, D]
  int64_t ws_lse_floats; // workspace: partial log-sum-exps (base 2), fp32 [B, Hq, splits]
  int blocks_per_sm;     // what the plan assumed
};

struct PlanKnobs {
  int num_sms;            // SMs of the device
  int64_t min_partition;  // never split below this many positions per partition
};

PagedAttentionPlan plan_paged_attention(const PagedAttentionArgs& args, const PlanKnobs& knobs);

// Launches stage 1 and, when plan.splits > 1, the merge; ws_* as the plan sized them (unused
// and may be null when splits == 1).
cudaError_t launch_paged_attention(const PagedAttentionArgs& args, const PagedAttentionPlan& plan,
                                   float* ws_o, float* ws_lse, cudaStream_t stream);

cudaError_t launch_paged_prefill_attention(const PagedAttentionArgs& args, cudaStream_t stream);

// paged_append: k, v [N, Hkv, D] (unit stride in D) into slot slots[i] of the caches (slot =
// block * block_size + offset; negative: skipped). int8 caches store per-token, per-head
// scales beside the quantized rows.
struct PagedAppendArgs {
  DType x_dtype, cache_dtype;
  const void* k;
  const void* v;
  int64_t k_stride_token, k_stride_head, v_stride_token, v_stride_head;
  PagedCache k_cache, v_cache;
  const void* slots;  // [N] int32 or int64
  bool slots_int64;
  int64_t num_tokens, num_kv_heads, head_dim, block_size, num_slots;
};

cudaError_t launch_paged_append(const PagedAppendArgs& args, cudaStream_t stream);

// One row per compiled kernel of this file: its name as the compiler mangles it would be
// demangled (base<args>), threads per block and dynamic shared memory per block, for the
// occupancy report of frugal.build_info (the binary holds registers and static shared memory
// only). Terminated by a row with kernel == nullptr.
struct KernelLaunchConfig {
  const char* kernel;
  int threads;
  int dynamic_smem;
};
const KernelLaunchConfig* paged_attention_kernel_configs();

// ------------------------------------------------------------------------ block-sparse attention

// An int32 tensor of a SparseLayout (docs/block_mask_format.md) read as p[b * sb + h * sh +
// r * sr + i] (unit stride in its last dim; broadcast dims have stride 0); p == nullptr: absent.
struct LayoutTensor {
  const int32_t* p;
  int64_t sb, sh, sr;
};

// Forward of sparse_attention (csrc/cuda/sparse_attention.cu), fp16 / bf16: q [B, Hq, Nq, D],
// k, v [B, Hkv, Nk, D] (unit stride in D, other strides multiples of 8 elements, 16-byte aligned
// bases), out [B, Hq, Nq, D] contiguous and lse [B, Hq, Nq] fp32. The lists are the forward
// ones (kv_num, kv_idx, kv_bits, full_num, full_idx: the counts read as [b, h, qb]); q_doc /
// kv_doc [B, N] (stride sb; nullptr without document ids), bits [nbits, BQ, BK / 32] (strides
// bits_si, bits_sr; nullptr without a bitmask). The band test always runs: lo / hi / prefix
// that allow everything (-2**30, 2**30, 0) when the layout has none. BQ, BK in {64, 128}.
struct SparseAttentionFwdArgs {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride_b, q_stride_h, q_stride_n;
  int64_t k_stride_b, k_stride_h, k_stride_n;
  int64_t v_stride_b, v_stride_h, v_stride_n;
  void* out;
  float* lse;
  LayoutTensor kv_num, kv_idx, kv_bits, full_num, full_idx;
  const int32_t* q_doc;
  int64_t q_doc_sb;
  const int32_t* kv_doc;
  int64_t kv_doc_sb;
  const int32_t* bits;
  int64_t bits_si, bits_sr;
  int64_t B, Hq, Hkv, Nq, Nk, D, BQ, BK;
  int lo, hi, prefix;
  float scale;
  // Score modifiers (python/frugal/score_mods.py): softcap > 0 caps the scaled scores (0: off);
  // alibi fp32 [B, Hq] contiguous slopes (nullptr: off), query i at position i + Nk - Nq.
  float softcap;
  const float* alibi;
};

cudaError_t launch_sparse_attention_fwd(const SparseAttentionFwdArgs& args, cudaStream_t stream);
const KernelLaunchConfig* sparse_attention_kernel_configs();

// ------------------------------------------------------------------------ int8 GEMMs (CUTLASS)

// Scratch memory a launcher may need (stream-K partial accumulators): alloc(ctx, bytes) returns
// device memory that stays valid until the launch's work on the stream is done, or nullptr.
struct Workspace {
  void* (*alloc)(void* ctx, size_t bytes);
  void* ctx;
};

// D [M, N] = epilogue(A [M, K] x B^T), B int8 [N, K] (nn.Linear's layout), all with unit stride
// along their last dim, leading dimensions in elements:
//   a_dtype kInt8, out kInt32:           D = A B^T (int8_mm), scales and bias unused;
//   a_dtype kInt8, out kFloat32/16/BF16: D = acc * a_scale[m] * b_scale[n] + bias[n];
//   a_dtype kFloat16/kBFloat16, out = a_dtype (weight-only): D = acc * b_scale[n] + bias[n].
// a_scale [M], b_scale [N] and bias [N] are fp32 (bias may be null). The kernels read A and B
// in 16-byte vectors and write D 4 elements at a time: K, lda and ldb multiples of
// 16 / sizeof(A element) (16 for int8), N and ldd multiples of 4, pointers 16-byte aligned; a
// call that breaks this returns cudaErrorInvalidValue.
struct Int8GemmArgs {
  DType a_dtype, out_dtype;
  const void* a;
  int64_t lda;
  const int8_t* b;
  int64_t ldb;
  void* out;
  int64_t ldd;
  const float* a_scale;
  const float* b_scale;
  const float* bias;
  int64_t M, N, K;
};

// W8A8 on CUTLASS 3.x kernels (wgmma, TMA; sm_90a only; a_dtype kInt8). The CUTLASS 2.x
// launchers (mma.sync; sm_80 and newer) are declared where they are chosen
// (int8_matmul_op.cpp).
cudaError_t launch_int8_gemm_sm90(const Int8GemmArgs& args, const Workspace& ws,
                                  cudaStream_t stream);
// Threads and dynamic shared memory of every CUTLASS kernel in the build, named as
// frugal.build_info names them; ends with a nullptr row (see paged_attention_kernel_configs).
const KernelLaunchConfig* int8_gemm_kernel_configs();

}  // namespace frugal::cuda
