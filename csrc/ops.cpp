// Every op schema of frugal, in one place, and the Python module frugal._C.
// Kernels register their implementations with TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda;
// fake (meta) implementations and the Triton and PyTorch backends live in python/frugal.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "cpu/knobs.h"
#include "cpu/memory.h"
#include "cpu/paged_checks.h"
#if defined(FRUGAL_WITH_CUTLASS)
#include "cuda/kernel_configs_py.h"
#endif

TORCH_LIBRARY(frugal, m) {
  // Symmetric per-row int8 quantization over the last dim: scale = absmax / 127,
  // q = round_half_even(x / scale) clamped to [-127, 127]. A row of zeros gives scale 0 and
  // zeros; a row holding inf or NaN gives scale NaN and zeros.
  m.def("quantize_per_token(Tensor x) -> (Tensor q, Tensor scale)");

  // int8 GEMM in nn.Linear layout: a int8 [M, K], b int8 [N, K] -> int32 [M, N] = a @ b^T,
  // exact (int32 accumulation; K <= 131071 so no int8 input can overflow it).
  m.def("int8_mm(Tensor a, Tensor b) -> Tensor");
  // (a @ b^T) * a_scale[:, None] * b_scale[None, :] + bias, dequantized in the epilogue.
  // a_scale fp32 [M] or [1]; b_scale fp32 [N] or [1]; bias [N] (any float dtype) or None.
  m.def(
      "int8_scaled_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, "
      "ScalarType out_dtype) -> Tensor");
  // b int8 [N, K] repacked once into the CPU kernel's layout (opaque int8 buffer) for
  // int8_scaled_mm_packed, which takes b_scale fp32 [N] (N is read from it).
  m.def("int8_pack_weight(Tensor b) -> Tensor");
  m.def(
      "int8_scaled_mm_packed(Tensor a, Tensor b_packed, Tensor a_scale, Tensor b_scale, "
      "Tensor? bias, ScalarType out_dtype) -> Tensor");
  // Int8Linear's dynamic (W8A8) forward in one op: x float [M, K] quantized per token as
  // quantize_per_token does, then int8_scaled_mm_packed with out_dtype = x's dtype (the same
  // bits as the two ops in turn, without the int8 copy of x in between).
  m.def(
      "int8_dynamic_linear_packed(Tensor x, Tensor b_packed, Tensor b_scale, Tensor? bias) "
      "-> Tensor");
  // Weight-only int8: x float [M, K] (fp32/fp16/bf16) @ (b int8 [N, K] * b_scale[:, None])^T
  // + bias, in x's dtype.
  m.def("int8_weight_only_mm(Tensor x, Tensor b, Tensor b_scale, Tensor? bias) -> Tensor");

  // Paged KV-cache, one layer: caches [num_blocks, block_size, Hkv, D]; int8 caches carry
  // fp32 scales [num_blocks, block_size, Hkv]. Tables int32 [B, max_blocks], -1 padded;
  // position p of sequence b is at offset p % block_size of block block_tables[b, p / bs].
  // Decode: q [B, Hq, D] at position seq_lens[b] - 1 attends to positions
  // (seq_lens[b] - 1 - window, seq_lens[b]) (all when window <= 0); q head h reads kv head
  // h / (Hq / Hkv); seq_len 0 gives zeros. Result in q's dtype. Score modifiers
  // (frugal/score_mods.py): softcap > 0 caps each scaled score s to softcap * tanh(s /
  // softcap) (0: none); alibi_slopes fp32 [B, Hq] contiguous (or None) then subtracts
  // slope * (q_pos - k_pos), the query at q_pos = seq_lens[b] - 1.
  m.def(
      "paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int window, Tensor? k_scale, Tensor? v_scale, "
      "float softcap=0., Tensor? alibi_slopes=None) -> Tensor");
  // Chunked prefill: q [N, Hq, D] packed, sequence b owning rows [cu_seqlens_q[b],
  // cu_seqlens_q[b + 1]) (int32 [B + 1], cu_seqlens_q[0] = 0, cu_seqlens_q[B] = N), at positions
  // [seq_lens[b] - n_b, seq_lens[b]); the chunk is already in the cache. The query at position p
  // attends to positions (p - window, p] (all up to p when window <= 0). Result [N, Hq, D].
  // softcap and alibi_slopes [B, Hq] as in decode, the query's q_pos its position p.
  m.def(
      "paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, Tensor cu_seqlens_q, float scale, int window, Tensor? k_scale, "
      "Tensor? v_scale, float softcap=0., Tensor? alibi_slopes=None) -> Tensor");
  // The same two ops, also returning lse fp32 [B, Hq] (decode) / [N, Hq] (prefill): the natural
  // log of the sum of exp of each row's scaled (and modified) scores (-inf for a sequence of
  // length 0, whose out is 0), for merging partial attention states
  // (frugal.merge_attention_states).
  m.def(
      "paged_attention_lse(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, int window, Tensor? k_scale, Tensor? v_scale, "
      "float softcap=0., Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def(
      "paged_prefill_attention_lse(Tensor q, Tensor k_cache, Tensor v_cache, "
      "Tensor block_tables, Tensor seq_lens, Tensor cu_seqlens_q, float scale, int window, "
      "Tensor? k_scale, Tensor? v_scale, float softcap=0., Tensor? alibi_slopes=None) "
      "-> (Tensor out, Tensor lse)");
  // Merges attention states in place: row rows[i] of (out [R, D], lse [R] fp32) becomes the
  // merge of itself with row rows_b[i] of (out_b [R_b, D], lse_b [R_b] fp32) (None: row i);
  // out and out_b float32/float16/bfloat16, one dtype, unit stride along D; rows int64.
  // frugal.merge_attention_states's rule (frugal/reference.py); the cascade decode's merge.
  m.def(
      "merge_attention_states_(Tensor(a!) out, Tensor(b!) lse, Tensor out_b, Tensor lse_b, "
      "Tensor? rows, Tensor? rows_b) -> ()");
  // Writes k, v [N, Hkv, D] into cache slots slot_mapping [N] (int32/int64; slot = block * bs +
  // offset; a negative slot is padding and is skipped); int8 caches quantize per token and head.
  m.def(
      "paged_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor slot_mapping, Tensor(c!)? k_scale, Tensor(d!)? v_scale) -> ()");

  // Block-sparse attention over a SparseLayout (docs/block_mask_format.md): q [B, Hq, Nq, D],
  // k/v [B, Hkv, Nk, D] (same dtype), layout tensors int32 already expanded to [B, Hq, ...]
  // (stride-0 views allowed), flags 1=band 2=prefix 4=doc 8=bits with lo/hi/prefix the band.
  // Forward: out [B, Hq, Nq, D] in q's dtype and lse [B, Hq, Nq] fp32 (natural log; an empty
  // row gives out 0, lse -inf). Backward (FA2, fp32 compute): dq, dk, dv in the input dtype,
  // dk/dv summed over the query heads of each kv head.
  // layout / layout_ints: the SparseLayout's lists in the orders of csrc/sparse_layout.h
  // (SparseLayout.TENSORS / .INTS, e.g. kv_num, kv_idx, ..., and BQ, BK, flags, lo, hi, prefix).
  // softcap / alibi_slopes: the score modifiers of python/frugal/score_mods.py (softcap > 0
  // caps the scaled scores, 0 is off; alibi_slopes fp32 [B, Hq] contiguous on q's device, query
  // i at position i + Nk - Nq), applied before the mask; lse is of the modified scores and the
  // backward scales dS by the softcap's derivative (the slopes get no gradient). They are call
  // arguments, not layout entries: the layout is the mask's (cached on the mask per device),
  // the modifiers are the model's.
  m.def(
      "sparse_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor[] layout, int[] layout_ints, "
      "float scale, float softcap=0., Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def(
      "sparse_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor[] layout, int[] layout_ints, float scale, float softcap=0., "
      "Tensor? alibi_slopes=None) -> (Tensor dq, Tensor dk, Tensor dv)");
}

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(frugal::cpu::isa_name(frugal::cpu::current_isa()));
}

PyObject* detected_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(frugal::cpu::isa_name(frugal::cpu::detected_isa()));
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  frugal::cpu::Isa isa;
  if (!frugal::cpu::parse_isa(name, &isa)) {
    PyErr_Format(PyExc_ValueError,
                 "isa: expected one of 'scalar', 'avx2', 'avx512', 'avx512_vnni', 'amx_int8'; "
                 "got '%s'",
                 name);
    return nullptr;
  }
  return PyUnicode_FromString(frugal::cpu::isa_name(frugal::cpu::set_isa(isa)));
}

PyObject* cpu_amx(PyObject*, PyObject*) {
  return Py_BuildValue("(ss)", frugal::cpu::amx_emulation() ? "emulated" : "",
                       frugal::cpu::amx_unavailable_reason());
}

PyObject* set_cpu_amx_emulation(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  const bool before = frugal::cpu::amx_emulation();
  frugal::cpu::set_amx_emulation(on != 0);
  return PyBool_FromLong(before);
}

// advise_huge_pages(address, nbytes) -> bool: see frugal::cpu::advise_huge_pages.
PyObject* advise_huge_pages(PyObject*, PyObject* args) {
  unsigned long long address = 0;
  long long nbytes = 0;
  if (!PyArg_ParseTuple(args, "KL", &address, &nbytes)) return nullptr;
  if (nbytes < 0) {
    PyErr_Format(PyExc_ValueError, "advise_huge_pages: nbytes must be >= 0; got %lld", nbytes);
    return nullptr;
  }
  const bool done = frugal::cpu::advise_huge_pages(
      reinterpret_cast<void*>(static_cast<uintptr_t>(address)), static_cast<int64_t>(nbytes));
  return PyBool_FromLong(done);
}

// paged_tables_bad(table, rows, width, s0, s1, lens, ls, q_lens, qs, q_rows, num_blocks,
// block_size, window) -> bool: frugal::cpu::paged_tables_bad on int32 CPU buffers given by
// address and element strides (q_lens 0: none). The caller (frugal.paged_ops) has checked the
// tensors' dtypes, devices and shapes and keeps them alive.
PyObject* paged_tables_bad(PyObject*, PyObject* args) {
  unsigned long long table = 0, lens = 0, q_lens = 0;
  long long rows = 0, width = 0, s0 = 0, s1 = 0, ls = 0, qs = 0, q_rows = 0, num_blocks = 0,
            block_size = 0, window = 0;
  if (!PyArg_ParseTuple(args, "KLLLLKLKLLLLL", &table, &rows, &width, &s0, &s1, &lens, &ls,
                        &q_lens, &qs, &q_rows, &num_blocks, &block_size, &window)) {
    return nullptr;
  }
  if (table == 0 || lens == 0 || rows < 0 || width < 0 || block_size <= 0) {
    PyErr_SetString(PyExc_ValueError, "paged_tables_bad: null buffer or negative size");
    return nullptr;
  }
  frugal::cpu::PagedTables t{reinterpret_cast<const int32_t*>(static_cast<uintptr_t>(table)),
                             rows, width, s0, s1,
                             reinterpret_cast<const int32_t*>(static_cast<uintptr_t>(lens)), ls,
                             reinterpret_cast<const int32_t*>(static_cast<uintptr_t>(q_lens)),
                             qs, q_rows, num_blocks, block_size, window};
  return PyBool_FromLong(frugal::cpu::paged_tables_bad(t));
}

// cpu_knobs() -> list of (name, default, lo, hi, doc): csrc/cpu/knobs.h.
PyObject* cpu_knobs(PyObject*, PyObject*) {
  const frugal::cpu::KnobInfo* infos = frugal::cpu::knob_infos();
  PyObject* list = PyList_New(frugal::cpu::kKnobCount);
  if (list == nullptr) return nullptr;
  for (int i = 0; i < frugal::cpu::kKnobCount; ++i) {
    const auto& k = infos[i];
    PyObject* item = Py_BuildValue("(sLLLs)", k.name, static_cast<long long>(k.def),
                                   static_cast<long long>(k.lo), static_cast<long long>(k.hi),
                                   k.doc);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, item);
  }
  return list;
}

// cpu_knob_values() -> list of the knobs' values in force on the calling thread.
PyObject* cpu_knob_values(PyObject*, PyObject*) {
  PyObject* list = PyList_New(frugal::cpu::kKnobCount);
  if (list == nullptr) return nullptr;
  for (int i = 0; i < frugal::cpu::kKnobCount; ++i) {
    PyObject* v = PyLong_FromLongLong(frugal::cpu::knob(static_cast<frugal::cpu::Knob>(i)));
    if (v == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, v);
  }
  return list;
}

// set_cpu_knob(index, value) -> previous override (-1: none); value -1 clears the override.
// The calling thread's only (frugal.cpu_knobs).
PyObject* set_cpu_knob(PyObject*, PyObject* args) {
  int index = 0;
  long long value = 0;
  if (!PyArg_ParseTuple(args, "iL", &index, &value)) return nullptr;
  if (index < 0 || index >= frugal::cpu::kKnobCount) {
    PyErr_Format(PyExc_IndexError, "set_cpu_knob: index must be in [0, %d); got %d",
                 frugal::cpu::kKnobCount, index);
    return nullptr;
  }
  const auto& k = frugal::cpu::knob_infos()[index];
  if (value != -1 && (value < k.lo || value > k.hi)) {
    PyErr_Format(PyExc_ValueError, "set_cpu_knob: %s must be in [%lld, %lld] (or -1: the "
                 "default); got %lld", k.name, static_cast<long long>(k.lo),
                 static_cast<long long>(k.hi), value);
    return nullptr;
  }
  return PyLong_FromLongLong(frugal::cpu::set_knob_override(index, value));
}

// cuda_kernel_configs() -> list of {kernel, threads, dynamic_smem}: the CUTLASS kernels' launch
// configurations (frugal.build_info's occupancy report; the binary records neither).
PyObject* cuda_kernel_configs(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
#if defined(FRUGAL_WITH_CUTLASS)
  if (!frugal::cuda::append_kernel_configs(list, frugal::cuda::int8_gemm_kernel_configs())) {
    Py_DECREF(list);
    return nullptr;
  }
#endif
  return list;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "CPU instruction set the C++ kernels use now."},
    {"detected_cpu_isa", detected_cpu_isa, METH_NOARGS, "Widest instruction set this CPU has."},
    {"set_cpu_isa", set_cpu_isa, METH_O,
     "Use a narrower instruction set (clamped to the CPU's); returns the one in force."},
    {"cpu_amx", cpu_amx, METH_NOARGS,
     "cpu_amx() -> (emulation, why_not): 'emulated' while the AMX emulation is on (else ''), "
     "and why this CPU's widest level is not amx_int8 ('' when it is)."},
    {"set_cpu_amx_emulation", set_cpu_amx_emulation, METH_O,
     "Test hook: the int8 GEMMs run the AMX tile code on an emulation of the tiles, at any "
     "level; returns the previous setting."},
    {"advise_huge_pages", advise_huge_pages, METH_VARARGS,
     "advise_huge_pages(address, nbytes) -> bool: mark the 2 MiB-aligned interior of a CPU "
     "buffer of at least 8 MiB for transparent huge pages (Linux madvise); True if marked."},
    {"paged_tables_bad", paged_tables_bad, METH_VARARGS,
     "paged_tables_bad(table, rows, width, s0, s1, lens, ls, q_lens, qs, q_rows, num_blocks, "
     "block_size, window) -> bool: the paged ops' host check of CPU block tables."},
    {"cpu_knobs", cpu_knobs, METH_NOARGS,
     "cpu_knobs() -> list of (name, default, lo, hi, doc): the C++ CPU kernels' tunable knobs."},
    {"cpu_knob_values", cpu_knob_values, METH_NOARGS,
     "cpu_knob_values() -> the knobs' values in force on the calling thread, in cpu_knobs() "
     "order."},
    {"set_cpu_knob", set_cpu_knob, METH_VARARGS,
     "set_cpu_knob(index, value) -> previous override (-1: none) of the calling thread; "
     "value -1 clears it."},
    {"cuda_kernel_configs", cuda_kernel_configs, METH_NOARGS,
     "cuda_kernel_configs() -> list of {kernel, threads, dynamic_smem} of the CUTLASS kernels "
     "(empty in a build without them)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "frugal's compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef FRUGAL_WITH_CUDA
  PyModule_AddIntConstant(m, "with_cuda", 1);
#else
  PyModule_AddIntConstant(m, "with_cuda", 0);
#endif
#ifdef FRUGAL_SANITIZED  // built by `make sanitize` (ASan + UBSan)
  PyModule_AddIntConstant(m, "sanitized", 1);
#else
  PyModule_AddIntConstant(m, "sanitized", 0);
#endif
  return m;
}
