// Torch-facing glue of the CUDA paged KV-cache kernels, written once for two backends: the GPU
// (csrc/cuda/paged_attention_op.cpp, TORCH_LIBRARY_IMPL(frugal, CUDA)) and the host emulation
// the tests run (csrc/cuda_emu/module.cpp, frugal_emu on the CPU key). Both check the same
// things, plan and allocate the same way and call the same launchers (launch.h), so the path
// the tests exercise is the one that ships; a Backend only says which device tensors must be
// on, which stream, how many SMs, and how to name an error.
//
// Backend requirements:
//   static constexpr const char* kDevice;                      "CUDA" / "CPU", for messages
//   static bool on_device(const at::Tensor& t, const at::Tensor& ref);
//   struct Guard { explicit Guard(c10::Device); };
//   static cudaStream_t stream();
//   static PlanKnobs knobs(const at::Tensor& q);
//   static void on_plan(const PagedAttentionPlan&);             sees each decode plan (tests)
//   static const char* error_string(cudaError_t);
//
// Contents (seq_lens, table entries, cu_seqlens_q, slots) are not read on the host (that would
// be a device sync per call): frugal's Python API validates them; the kernels clamp seq_lens to
// the table capacity and skip slots outside the cache so a bad value cannot read or write past
// those tensors.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>
#include <utility>

#include "cuda/launch.h"
#include "score_mods.h"

namespace frugal::cuda::glue {

inline const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

inline bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kInt8;
  }
}

template <class Backend>
void check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK(Backend::on_device(t, ref), op, ": ", name, " must be a ", Backend::kDevice,
              " tensor on ", ref.device(), "; got ", t.device());
}

// Caches [num_blocks, block_size, Hkv, D] of one float or int8 dtype, unit stride in D, D a
// multiple of 8 up to 256, block_size a power of two up to 256; int8 caches with fp32 scales
// [num_blocks, block_size, Hkv].
template <class Backend>
void check_caches(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const std::optional<at::Tensor>& k_scale,
                  const std::optional<at::Tensor>& v_scale, const at::Tensor& ref) {
  TORCH_CHECK(k_cache.dim() == 4, op,
              ": k_cache must be 4-d [num_blocks, block_size, num_kv_heads, head_dim]; got shape ",
              k_cache.sizes());
  const at::ScalarType ct = k_cache.scalar_type();
  TORCH_CHECK(is_float(ct) || ct == at::kChar, op,
              ": k_cache must be float32, float16, bfloat16 or int8; got ", dtype_name(ct));
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's shape ",
              k_cache.sizes(), "; got ", v_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == ct, op, ": v_cache must have k_cache's dtype ",
              dtype_name(ct), "; got ", dtype_name(v_cache.scalar_type()));
  check_device<Backend>(op, "k_cache", k_cache, ref);
  check_device<Backend>(op, "v_cache", v_cache, ref);
  TORCH_CHECK(k_cache.size(2) >= 1, op, ": num_kv_heads (k_cache.size(2)) must be >= 1; got ",
              k_cache.size(2));
  const int64_t D = k_cache.size(3), bs = k_cache.size(1);
  TORCH_CHECK(D >= 8 && D <= 256 && D % 8 == 0, op,
              ": the CUDA kernels need head_dim (k_cache.size(3)) a multiple of 8 from 8 to 256; "
              "got ",
              D);
  TORCH_CHECK(bs >= 1 && bs <= 256 && (bs & (bs - 1)) == 0, op,
              ": block_size (k_cache.size(1)) must be a power of two from 1 to 256; got ", bs);
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op,
              ": k_cache and v_cache must have unit stride along head_dim; got strides ",
              k_cache.strides(), " and ", v_cache.strides());
  const bool int8 = ct == at::kChar;
  for (const auto& [name, s] :
       {std::pair<const char*, const std::optional<at::Tensor>*>{"k_scale", &k_scale},
        {"v_scale", &v_scale}}) {
    if (!int8) {
      TORCH_CHECK(!s->has_value(), op, ": ", name, " is only for int8 caches; k_cache is ",
                  dtype_name(ct));
      continue;
    }
    TORCH_CHECK(s->has_value(), op, ": int8 caches need ", name,
                " (float32 [num_blocks, block_size, num_kv_heads]); got None");
    const at::Tensor& t = **s;
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32; got ",
                dtype_name(t.scalar_type()));
    TORCH_CHECK(t.dim() == 3 && t.sizes() == k_cache.sizes().slice(0, 3), op, ": ", name,
                " must have shape ", k_cache.sizes().slice(0, 3), " (k_cache.shape[:3]); got ",
                t.sizes());
    check_device<Backend>(op, name, t, ref);
  }
}

template <class Backend>
void check_query_and_tables(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            int64_t B) {
  const at::ScalarType qt = q.scalar_type(), ct = k_cache.scalar_type();
  TORCH_CHECK(is_float(qt), op, ": q must be float32, float16 or bfloat16; got ", dtype_name(qt));
  TORCH_CHECK(ct == at::kChar || ct == qt, op, ": q must have k_cache's dtype ", dtype_name(ct),
              " (any float q only over an int8 cache); got ", dtype_name(qt));
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(D == k_cache.size(3), op, ": q's head_dim (last dim) must be k_cache's ",
              k_cache.size(3), "; got ", D);
  TORCH_CHECK(Hq % Hkv == 0, op, ": q's head count ", Hq,
              " must be a multiple of k_cache's num_kv_heads ", Hkv);
  TORCH_CHECK(block_tables.scalar_type() == at::kInt, op, ": block_tables must be int32; got ",
              dtype_name(block_tables.scalar_type()));
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B, op, ": block_tables must be [",
              B, ", max_blocks] (one row per sequence); got shape ", block_tables.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt, op, ": seq_lens must be int32; got ",
              dtype_name(seq_lens.scalar_type()));
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, op, ": seq_lens must have shape (", B,
              ",); got ", seq_lens.sizes());
  check_device<Backend>(op, "block_tables", block_tables, q);
  check_device<Backend>(op, "seq_lens", seq_lens, q);
}

// The call's score modifiers, checked (alibi_slopes on q's device): the slopes' pointer or
// nullptr.
template <class Backend>
const float* check_mods(const char* op, double softcap,
                        const std::optional<at::Tensor>& alibi_slopes, int64_t B, int64_t Hq,
                        const at::Tensor& q) {
  check_score_mods(op, softcap, alibi_slopes, B, Hq);
  if (!alibi_slopes.has_value()) return nullptr;
  check_device<Backend>(op, "alibi_slopes", *alibi_slopes, q);
  return alibi_slopes->const_data_ptr<float>();
}

inline PagedCache cache_view(const at::Tensor& c, const std::optional<at::Tensor>& s) {
  PagedCache v{c.data_ptr(), c.stride(0), c.stride(1), c.stride(2), nullptr, 0, 0, 0};
  if (s.has_value()) {
    v.scale = s->data_ptr<float>();
    v.scale_stride_block = s->stride(0);
    v.scale_stride_offset = s->stride(1);
    v.scale_stride_head = s->stride(2);
  }
  return v;
}

// Arguments shared by decode and prefill; q_c is q with unit stride in D, tables_c the tables
// with unit stride along a row.
inline PagedAttentionArgs attention_args(const at::Tensor& q_c, const at::Tensor& out,
                                         const at::Tensor& k_cache, const at::Tensor& v_cache,
                                         const at::Tensor& tables_c, const at::Tensor& lens_c,
                                         double scale, int64_t window,
                                         const std::optional<at::Tensor>& k_scale,
                                         const std::optional<at::Tensor>& v_scale,
                                         double softcap, const float* alibi_slopes) {
  PagedAttentionArgs a{};
  a.q_dtype = dtype_of(q_c.scalar_type());
  a.cache_dtype = dtype_of(k_cache.scalar_type());
  a.q = q_c.const_data_ptr();
  a.q_stride_row = q_c.stride(0);
  a.q_stride_head = q_c.stride(1);
  a.out = out.data_ptr();
  a.k = cache_view(k_cache, k_scale);
  a.v = cache_view(v_cache, v_scale);
  a.block_tables = tables_c.const_data_ptr<int32_t>();
  a.table_stride = tables_c.stride(0);
  a.seq_lens = lens_c.const_data_ptr<int32_t>();
  a.batch = tables_c.size(0);
  a.rows = q_c.size(0);
  a.num_q_heads = q_c.size(1);
  a.num_kv_heads = k_cache.size(2);
  a.head_dim = q_c.size(2);
  a.block_size = k_cache.size(1);
  a.table_width = tables_c.size(1);
  a.scale = static_cast<float>(scale);
  a.window = window;
  a.softcap = static_cast<float>(softcap);
  a.alibi_slopes = alibi_slopes;
  return a;
}

inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// Decode; with `with_lse`, also the fp32 [B, Hq] log-sum-exp of each row (natural log; -inf
// for a sequence of length 0), else an undefined tensor.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> paged_attention_impl(
    const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    double softcap, const std::optional<at::Tensor>& alibi_slopes, bool with_lse) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-d [batch, num_heads, head_dim]; got shape ",
              q.sizes());
  check_device<Backend>(op, "q", q, q);
  check_caches<Backend>(op, k_cache, v_cache, k_scale, v_scale, q);
  const int64_t B = q.size(0);
  check_query_and_tables<Backend>(op, q, k_cache, block_tables, seq_lens, B);
  const float* slopes = check_mods<Backend>(op, softcap, alibi_slopes, B, q.size(1), q);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse;
  if (with_lse) lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    if (with_lse) lse.fill_(-__builtin_huge_valf());
    return {out, lse};
  }
  const typename Backend::Guard guard(q.device());
  const at::Tensor q_c = unit_last_stride(q), tables_c = unit_last_stride(block_tables);
  const at::Tensor lens_c = seq_lens.contiguous();
  PagedAttentionArgs args = attention_args(q_c, out, k_cache, v_cache, tables_c, lens_c, scale,
                                           window, k_scale, v_scale, softcap, slopes);
  args.lse = with_lse ? lse.data_ptr<float>() : nullptr;
  const PagedAttentionPlan plan = plan_paged_attention(args, Backend::knobs(q));
  Backend::on_plan(plan);
  at::Tensor ws_o, ws_lse;
  if (plan.splits > 1) {
    ws_o = at::empty({plan.ws_o_floats}, q.options().dtype(at::kFloat));
    ws_lse = at::empty({plan.ws_lse_floats}, q.options().dtype(at::kFloat));
  }
  const cudaError_t err = launch_paged_attention(
      args, plan, plan.splits > 1 ? ws_o.data_ptr<float>() : nullptr,
      plan.splits > 1 ? ws_lse.data_ptr<float>() : nullptr, Backend::stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", Backend::error_string(err));
  return {out, lse};
}

template <class Backend>
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& seq_lens, double scale, int64_t window,
                           const std::optional<at::Tensor>& k_scale,
                           const std::optional<at::Tensor>& v_scale, double softcap,
                           const std::optional<at::Tensor>& alibi_slopes) {
  return std::get<0>(paged_attention_impl<Backend>("paged_attention", q, k_cache, v_cache,
                                                   block_tables, seq_lens, scale, window,
                                                   k_scale, v_scale, softcap, alibi_slopes,
                                                   false));
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> paged_attention_lse(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale, int64_t window,
    const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  return paged_attention_impl<Backend>("paged_attention_lse", q, k_cache, v_cache, block_tables,
                                       seq_lens, scale, window, k_scale, v_scale, softcap,
                                       alibi_slopes, true);
}

// Chunked prefill; with `with_lse`, also the fp32 [N, Hq] log-sum-exp of each query row.
template <class Backend>
std::tuple<at::Tensor, at::Tensor> paged_prefill_attention_impl(
    const char* op, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
    double scale, int64_t window, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool with_lse) {
  TORCH_CHECK(q.dim() == 3, op, ": q must be 3-d [num_tokens, num_heads, head_dim]; got shape ",
              q.sizes());
  check_device<Backend>(op, "q", q, q);
  check_caches<Backend>(op, k_cache, v_cache, k_scale, v_scale, q);
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt, op, ": cu_seqlens_q must be int32; got ",
              dtype_name(cu_seqlens_q.scalar_type()));
  TORCH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, op,
              ": cu_seqlens_q must be 1-d [batch + 1]; got shape ", cu_seqlens_q.sizes());
  check_device<Backend>(op, "cu_seqlens_q", cu_seqlens_q, q);
  const int64_t B = cu_seqlens_q.size(0) - 1;
  check_query_and_tables<Backend>(op, q, k_cache, block_tables, seq_lens, B);
  const float* slopes = check_mods<Backend>(op, softcap, alibi_slopes, B, q.size(1), q);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse;
  if (with_lse) lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || B == 0) return {out, lse};
  const typename Backend::Guard guard(q.device());
  const at::Tensor q_c = unit_last_stride(q), tables_c = unit_last_stride(block_tables);
  const at::Tensor lens_c = seq_lens.contiguous(), cu_c = cu_seqlens_q.contiguous();
  PagedAttentionArgs args = attention_args(q_c, out, k_cache, v_cache, tables_c, lens_c, scale,
                                           window, k_scale, v_scale, softcap, slopes);
  args.cu_seqlens_q = cu_c.const_data_ptr<int32_t>();
  args.lse = with_lse ? lse.data_ptr<float>() : nullptr;
  const cudaError_t err = launch_paged_prefill_attention(args, Backend::stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", Backend::error_string(err));
  return {out, lse};
}

template <class Backend>
at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                   const at::Tensor& v_cache, const at::Tensor& block_tables,
                                   const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                                   double scale, int64_t window,
                                   const std::optional<at::Tensor>& k_scale,
                                   const std::optional<at::Tensor>& v_scale, double softcap,
                                   const std::optional<at::Tensor>& alibi_slopes) {
  return std::get<0>(paged_prefill_attention_impl<Backend>(
      "paged_prefill_attention", q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
      scale, window, k_scale, v_scale, softcap, alibi_slopes, false));
}

template <class Backend>
std::tuple<at::Tensor, at::Tensor> paged_prefill_attention_lse(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
    double scale, int64_t window, const std::optional<at::Tensor>& k_scale,
    const std::optional<at::Tensor>& v_scale, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  return paged_prefill_attention_impl<Backend>("paged_prefill_attention_lse", q, k_cache,
                                               v_cache, block_tables, seq_lens, cu_seqlens_q,
                                               scale, window, k_scale, v_scale, softcap,
                                               alibi_slopes, true);
}

template <class Backend>
void paged_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                  const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                  const std::optional<at::Tensor>& k_scale,
                  const std::optional<at::Tensor>& v_scale) {
  constexpr const char* op = "paged_append";
  check_device<Backend>(op, "k", k, k);
  check_caches<Backend>(op, k_cache, v_cache, k_scale, v_scale, k);
  TORCH_CHECK(is_float(k.scalar_type()), op, ": k must be float32, float16 or bfloat16; got ",
              dtype_name(k.scalar_type()));
  TORCH_CHECK(v.scalar_type() == k.scalar_type(), op, ": v must have k's dtype ",
              dtype_name(k.scalar_type()), "; got ", dtype_name(v.scalar_type()));
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), "; got ",
              v.sizes());
  TORCH_CHECK(k.dim() == 3 && k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), op,
              ": k must be [num_tokens, ", k_cache.size(2), ", ", k_cache.size(3),
              "] ([num_tokens, num_kv_heads, head_dim] of k_cache); got ", k.sizes());
  check_device<Backend>(op, "v", v, k);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong,
              op, ": slot_mapping must be int32 or int64; got ",
              dtype_name(slot_mapping.scalar_type()));
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), op,
              ": slot_mapping must have shape (", k.size(0), ",) (one slot per token); got ",
              slot_mapping.sizes());
  check_device<Backend>(op, "slot_mapping", slot_mapping, k);
  if (k.numel() == 0) return;
  const typename Backend::Guard guard(k.device());
  const at::Tensor k_c = unit_last_stride(k), v_c = unit_last_stride(v);
  const at::Tensor slots = slot_mapping.contiguous();
  PagedAppendArgs a{};
  a.x_dtype = dtype_of(k.scalar_type());
  a.cache_dtype = dtype_of(k_cache.scalar_type());
  a.k = k_c.const_data_ptr();
  a.v = v_c.const_data_ptr();
  a.k_stride_token = k_c.stride(0);
  a.k_stride_head = k_c.stride(1);
  a.v_stride_token = v_c.stride(0);
  a.v_stride_head = v_c.stride(1);
  a.k_cache = cache_view(k_cache, k_scale);
  a.v_cache = cache_view(v_cache, v_scale);
  a.slots = slots.const_data_ptr();
  a.slots_int64 = slots.scalar_type() == at::kLong;
  a.num_tokens = k.size(0);
  a.num_kv_heads = k.size(1);
  a.head_dim = k.size(2);
  a.block_size = k_cache.size(1);
  a.num_slots = k_cache.size(0) * k_cache.size(1);
  const cudaError_t err = launch_paged_append(a, Backend::stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", Backend::error_string(err));
}

}  // namespace frugal::cuda::glue
