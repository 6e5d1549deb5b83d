// The layout arguments of sparse_attention_fwd / sparse_attention_bwd: `Tensor[] layout` and
// `int[] layout_ints`, in the orders of frugal.block_mask.SparseLayout.TENSORS and .INTS, which
// define them (tests/test_sparse_attention_cpu.py checks that these lists match). A new rule or
// modifier is one more X(name) here and one more name there; kernels read it by name.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#define FRUGAL_SPARSE_LAYOUT_TENSORS(X)                                                   \
  X(kv_num) X(kv_idx) X(kv_bits) X(full_num) X(full_idx) X(q_num) X(q_idx) X(q_bits) \
  X(full_q_num) X(full_q_idx) X(q_doc) X(kv_doc) X(bits)
#define FRUGAL_SPARSE_LAYOUT_INTS(X) X(BQ) X(BK) X(flags) X(lo) X(hi) X(prefix)

namespace frugal {

struct SparseLayoutArgs {
#define FRUGAL_FIELD_T(n) at::Tensor n;
#define FRUGAL_FIELD_I(n) int64_t n = 0;
  FRUGAL_SPARSE_LAYOUT_TENSORS(FRUGAL_FIELD_T)
  FRUGAL_SPARSE_LAYOUT_INTS(FRUGAL_FIELD_I)
#undef FRUGAL_FIELD_T
#undef FRUGAL_FIELD_I

  // The named fields of one call's lists; a list of the wrong length is a clear error.
  static SparseLayoutArgs from(const char* op, at::TensorList tensors, c10::IntArrayRef ints) {
#define FRUGAL_COUNT(n) +1
#define FRUGAL_NAME(n) " " #n
    constexpr int64_t kTensors = 0 FRUGAL_SPARSE_LAYOUT_TENSORS(FRUGAL_COUNT);
    constexpr int64_t kInts = 0 FRUGAL_SPARSE_LAYOUT_INTS(FRUGAL_COUNT);
    TORCH_CHECK(static_cast<int64_t>(tensors.size()) == kTensors, op, ": layout must hold ",
                kTensors, " tensors (" FRUGAL_SPARSE_LAYOUT_TENSORS(FRUGAL_NAME) " ); got ",
                tensors.size());
    TORCH_CHECK(static_cast<int64_t>(ints.size()) == kInts, op, ": layout_ints must hold ", kInts,
                " ints (" FRUGAL_SPARSE_LAYOUT_INTS(FRUGAL_NAME) " ); got ", ints.size());
#undef FRUGAL_COUNT
#undef FRUGAL_NAME
    SparseLayoutArgs a;
    size_t t = 0, i = 0;
#define FRUGAL_TAKE_T(n) a.n = tensors[t++];
#define FRUGAL_TAKE_I(n) a.n = ints[i++];
    FRUGAL_SPARSE_LAYOUT_TENSORS(FRUGAL_TAKE_T)
    FRUGAL_SPARSE_LAYOUT_INTS(FRUGAL_TAKE_I)
#undef FRUGAL_TAKE_T
#undef FRUGAL_TAKE_I
    return a;
  }
};

}  // namespace frugal
