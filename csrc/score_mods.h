// The score modifiers of the paged attention ops (frugal/score_mods.py) as the C++ entry points
// take them, checked: softcap finite and >= 0 (0: none); alibi_slopes None or float32 [B, Hq],
// contiguous (the Python ops expand a [Hq] one; the caller checks its device). Shared by the
// CPU kernels and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace frugal {

inline void check_score_mods(const char* op, double softcap,
                             const std::optional<at::Tensor>& alibi_slopes, int64_t B,
                             int64_t Hq) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op,
              ": softcap must be a finite float >= 0 (0: no cap); got ", softcap);
  if (!alibi_slopes.has_value()) return;
  const at::Tensor& a = *alibi_slopes;
  TORCH_CHECK(a.scalar_type() == at::kFloat, op, ": alibi_slopes must be float32; got ",
              c10::toString(a.scalar_type()));
  TORCH_CHECK(a.dim() == 2 && a.size(0) == B && a.size(1) == Hq, op, ": alibi_slopes must be [",
              B, ", ", Hq, "] ([batch, num_heads]); got shape ", a.sizes());
  TORCH_CHECK(a.is_contiguous(), op, ": alibi_slopes must be contiguous; got strides ",
              a.strides());
}

}  // namespace frugal
