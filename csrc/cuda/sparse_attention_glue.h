// Torch-facing glue of the CUDA block-sparse attention forward (csrc/cuda/sparse_attention.cu),
// written once for the GPU (csrc/cuda/sparse_attention_op.cpp, frugal::sparse_attention_fwd on
// the CUDA key) and the host emulation the tests run (csrc/cuda_emu/module.cpp,
// frugal_emu::sparse_attention_fwd on CPU tensors), as paged_attention_glue.h is: the same
// checks, copies and launcher either way; a Backend says which device, which stream and how to
// name an error (see paged_attention_glue.h for its members; knobs / on_plan are not used here).
//
// The lists' contents (indices, counts, bitmask rows) are not read on the host (a device sync
// per call): frugal's BlockMask builds and validates them, and the kernel trusts them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/launch.h"
#include "score_mods.h"
#include "sparse_layout.h"

namespace frugal::cuda::sparse_glue {

constexpr int64_t kFlagBand = 1, kFlagPrefix = 2, kFlagDoc = 4, kFlagBits = 8;
constexpr int64_t kInf = int64_t{1} << 30;  // an unbounded band side (block_mask.INF)

template <class Backend>
void check_on(const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(Backend::on_device(t, ref), "sparse_attention_fwd: ", name, " must be a ",
              Backend::kDevice, " tensor on ", ref.device(), "; got ", t.device());
}

// An int32 layout tensor of the expected shape with unit stride in its last dim (a copy when it
// has another), as the kernel reads it.
template <class Backend>
at::Tensor layout_tensor(const char* name, const at::Tensor& t, std::vector<int64_t> shape,
                         const at::Tensor& ref, bool any_last) {
  TORCH_CHECK(t.scalar_type() == at::kInt, "sparse_attention_fwd: ", name,
              " must be int32; got ", t.scalar_type());
  check_on<Backend>(name, t, ref);
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) {
    ok = (any_last && i + 1 == shape.size()) ? t.size(i) >= 1 : t.size(i) == shape[i];
  }
  if (any_last) shape.back() = -1;
  TORCH_CHECK(ok, "sparse_attention_fwd: ", name, " must have shape ", c10::IntArrayRef(shape),
              (any_last ? " (-1: any width >= 1)" : ""), "; got ", t.sizes());
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

inline LayoutTensor view(const at::Tensor& t) {
  const int64_t n = t.dim();
  return {t.const_data_ptr<int32_t>(), t.stride(0), t.stride(1), n == 4 ? t.stride(2) : 0};
}

// q / k / v as the kernel reads them: unit stride in D, the other strides multiples of 8
// elements and a 16-byte aligned base (cp.async moves 16-byte chunks); a copy otherwise.
inline at::Tensor aligned(const at::Tensor& t) {
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int i = 0; ok && i < 3; ++i) ok = t.size(i) <= 1 || t.stride(i) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

inline int clamp_int(int64_t x) {
  return static_cast<int>(x < -kInf * 2 ? -kInf * 2 : x > kInf * 2 - 1 ? kInf * 2 - 1 : x);
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> sparse_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::TensorList layout,
    at::IntArrayRef layout_ints, double scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  constexpr const char* op = "sparse_attention_fwd";
  // The forward's lists (the q-side lists are the backward's); names as in csrc/sparse_layout.h.
  const SparseLayoutArgs L = SparseLayoutArgs::from(op, layout, layout_ints);
  const int64_t BQ = L.BQ, BK = L.BK, flags = L.flags;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": q, k, v must be 4-d [batch, heads, tokens, head_dim]; got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, op,
              ": the CUDA kernel takes float16 or bfloat16 q, k, v; got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, op,
              ": q, k and v must have one dtype; got ", dt, ", ", k.scalar_type(), ", ",
              v.scalar_type());
  check_on<Backend>("q", q, q);
  check_on<Backend>("k", k, q);
  check_on<Backend>("v", v, q);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D, op,
              ": k and v must be [", B, ", Hkv, Nk, ", D, "] (q's batch and head_dim); got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": q's head count ", Hq,
              " must be a multiple of k's ", Hkv);
  TORCH_CHECK(D >= 8 && D <= 256 && D % 8 == 0, op,
              ": head_dim must be a multiple of 8 in [8, 256]; got ", D);
  TORCH_CHECK((BQ == 64 || BQ == 128) && (BK == 64 || BK == 128), op,
              ": the CUDA kernel takes mask blocks of 64 or 128; got BQ=", BQ, ", BK=", BK);
  TORCH_CHECK(flags >= 0 && flags <= 15, op, ": flags must be in [0, 15]; got ", flags);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite; got ", scale);
  check_score_mods(op, softcap, alibi_slopes, B, Hq);
  TORCH_CHECK(Nq < (int64_t{1} << 31) && Nk < (int64_t{1} << 31), op,
              ": Nq and Nk must be < 2**31; got ", Nq, ", ", Nk);
  const int64_t nQB = (Nq + BQ - 1) / BQ;
  const bool has_doc = flags & kFlagDoc, has_bits = flags & kFlagBits;
  const at::Tensor kv_num_c = layout_tensor<Backend>("kv_num", L.kv_num, {B, Hq, nQB}, q, false);
  const at::Tensor kv_idx_c = layout_tensor<Backend>("kv_idx", L.kv_idx, {B, Hq, nQB, 1}, q, true);
  const at::Tensor full_num_c =
      layout_tensor<Backend>("full_num", L.full_num, {B, Hq, nQB}, q, false);
  const at::Tensor full_idx_c =
      layout_tensor<Backend>("full_idx", L.full_idx, {B, Hq, nQB, 1}, q, true);
  at::Tensor kv_bits_c, q_doc_c, kv_doc_c, bits_c;
  if (has_bits) {
    TORCH_CHECK(BK % 32 == 0, op, ": a bitmask needs BK a multiple of 32; got ", BK);
    kv_bits_c = layout_tensor<Backend>("kv_bits", L.kv_bits, {B, Hq, nQB, L.kv_idx.size(-1)},
                                       q, false);
    const int64_t nbits = L.bits.dim() == 3 ? L.bits.size(0) : 1;
    bits_c = layout_tensor<Backend>("bits", L.bits, {nbits, BQ, BK / 32}, q, false);
  }
  if (alibi_slopes.has_value()) check_on<Backend>("alibi_slopes", *alibi_slopes, q);
  if (has_doc) {
    q_doc_c = layout_tensor<Backend>("q_doc", L.q_doc, {B, Nq}, q, false);
    kv_doc_c = layout_tensor<Backend>("kv_doc", L.kv_doc, {B, Nk}, q, false);
  }

  at::Tensor out =
      at::empty({B, Hq, Nq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, Hq, Nq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const typename Backend::Guard guard(q.device());
  const at::Tensor qa = aligned(q), ka = aligned(k), va = aligned(v);

  SparseAttentionFwdArgs a{};
  a.dtype = dt == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  a.q = qa.const_data_ptr();
  a.k = ka.const_data_ptr();
  a.v = va.const_data_ptr();
  a.q_stride_b = qa.stride(0);
  a.q_stride_h = qa.stride(1);
  a.q_stride_n = qa.stride(2);
  a.k_stride_b = ka.stride(0);
  a.k_stride_h = ka.stride(1);
  a.k_stride_n = ka.stride(2);
  a.v_stride_b = va.stride(0);
  a.v_stride_h = va.stride(1);
  a.v_stride_n = va.stride(2);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.kv_num = view(kv_num_c);
  a.kv_idx = view(kv_idx_c);
  a.full_num = view(full_num_c);
  a.full_idx = view(full_idx_c);
  a.kv_bits = has_bits ? view(kv_bits_c) : LayoutTensor{nullptr, 0, 0, 0};
  a.q_doc = has_doc ? q_doc_c.const_data_ptr<int32_t>() : nullptr;
  a.q_doc_sb = has_doc ? q_doc_c.stride(0) : 0;
  a.kv_doc = has_doc ? kv_doc_c.const_data_ptr<int32_t>() : nullptr;
  a.kv_doc_sb = has_doc ? kv_doc_c.stride(0) : 0;
  a.bits = has_bits ? bits_c.const_data_ptr<int32_t>() : nullptr;
  a.bits_si = has_bits ? bits_c.stride(0) : 0;
  a.bits_sr = has_bits ? bits_c.stride(1) : 0;
  a.B = B;
  a.Hq = Hq;
  a.Hkv = Hkv;
  a.Nq = Nq;
  a.Nk = Nk;
  a.D = D;
  a.BQ = BQ;
  a.BK = BK;
  // The band test always runs (docs/block_mask_format.md: a flag that is off allows all).
  const bool band = flags & kFlagBand;
  a.lo = band ? clamp_int(L.lo) : static_cast<int>(-kInf);
  a.hi = band ? clamp_int(L.hi) : static_cast<int>(kInf);
  a.prefix = band && (flags & kFlagPrefix) ? clamp_int(L.prefix < 0 ? 0 : L.prefix) : 0;
  a.scale = static_cast<float>(scale);
  a.softcap = static_cast<float>(softcap);
  a.alibi = alibi_slopes.has_value() ? alibi_slopes->const_data_ptr<float>() : nullptr;
  const cudaError_t err = launch_sparse_attention_fwd(a, Backend::stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", Backend::error_string(err));
  return {out, lse};
}

}  // namespace frugal::cuda::sparse_glue
