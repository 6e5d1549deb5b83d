// merge_attention_states_ on the CPU: the in-place merge of partial attention states that the
// cascade (shared-prefix) decode runs after its two passes, with gather/scatter row indices so
// the folded prefix rows merge into the sequences' rows without a copy. One pass over the rows;
// it runs on the calling thread below kSerialElements elements, where a parallel region costs
// more than the work (on a loaded machine, a region waits for a descheduled worker).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

namespace frugal::cpu {
namespace {

constexpr int64_t kSerialElements = int64_t{1} << 20;

// The reference's rule, in float32: m = max(la, lb) (NaN if either is NaN), base = m or 0 when
// both are -inf, w = e^(l - base), out = sum over non-empty parts of out_x * (w_x / total),
// lse = base + log(total). A part with lse -inf weighs 0 and its out is not read.
template <typename T>
void merge_rows(T* out, int64_t out_s0, int64_t out_s1, float* lse, int64_t lse_s0,
                const T* ob, int64_t ob_s0, int64_t ob_s1, const float* lb, int64_t lb_s0,
                const int64_t* rows, const int64_t* rows_b, int64_t n, int64_t D) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const auto body = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = rows != nullptr ? rows[i] : i;
      const int64_t rb = rows_b != nullptr ? rows_b[i] : i;
      const float la = lse[r * lse_s0], l2 = lb[rb * lb_s0];
      const float m = (std::isnan(la) || std::isnan(l2)) ? std::numeric_limits<float>::quiet_NaN()
                                                          : std::max(la, l2);
      const float base = m == -kInf ? 0.0f : m;
      const float wa = std::exp(la - base), wb = std::exp(l2 - base);
      const float total = wa + wb;
      const float sa = wa / total, sb = wb / total;
      const bool use_a = la != -kInf, use_b = l2 != -kInf;
      T* o = out + r * out_s0;
      const T* p = ob + rb * ob_s0;
      for (int64_t d = 0; d < D; ++d) {
        const float xa = use_a ? static_cast<float>(o[d * out_s1]) * sa : 0.0f;
        const float xb = use_b ? static_cast<float>(p[d * ob_s1]) * sb : 0.0f;
        o[d * out_s1] = static_cast<T>(xa + xb);
      }
      lse[r * lse_s0] = base + std::log(total);
    }
  };
  if (n * D < kSerialElements) {
    body(0, n);
  } else {
    at::parallel_for(0, n, std::max<int64_t>(1, kSerialElements / 8 / std::max<int64_t>(D, 1)),
                     body);
  }
}

void check_rows(const char* name, const std::optional<at::Tensor>& rows, int64_t n, int64_t limit,
                const char* of) {
  if (!rows.has_value()) {
    TORCH_CHECK(n <= limit, "merge_attention_states_: ", name, " is None, so ", of,
                " must have at least ", n, " rows; got ", limit);
    return;
  }
  const at::Tensor& t = *rows;
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.device().is_cpu(),
              "merge_attention_states_: ", name, " must be a 1-d int64 CPU tensor; got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
  TORCH_CHECK(t.size(0) == n, "merge_attention_states_: ", name, " must have ", n,
              " entries; got ", t.size(0));
  const at::Tensor c = t.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < limit, "merge_attention_states_: ", name, "[", i,
                "] must be in [0, ", limit, ") (rows of ", of, "); got ", p[i]);
  }
}

void merge_attention_states_cpu(const at::Tensor& out, const at::Tensor& lse,
                                const at::Tensor& out_b, const at::Tensor& lse_b,
                                const std::optional<at::Tensor>& rows,
                                const std::optional<at::Tensor>& rows_b) {
  constexpr const char* op = "merge_attention_states_";
  TORCH_CHECK(out.dim() == 2 && out_b.dim() == 2 && out.size(1) == out_b.size(1), op,
              ": out and out_b must be [rows, D] with one D; got ", out.sizes(), " and ",
              out_b.sizes());
  TORCH_CHECK(out.scalar_type() == out_b.scalar_type(), op, ": out_b must have out's dtype ",
              out.scalar_type(), "; got ", out_b.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse_b.scalar_type() == at::kFloat, op,
              ": lse and lse_b must be float32; got ", lse.scalar_type(), " and ",
              lse_b.scalar_type());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == out.size(0) && lse_b.dim() == 1 &&
                  lse_b.size(0) == out_b.size(0),
              op, ": lse and lse_b must be [rows] of out and out_b; got ", lse.sizes(), " and ",
              lse_b.sizes());
  for (const auto* t : {&out, &lse, &out_b, &lse_b}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU; got ", t->device());
  }
  const int64_t n = rows.has_value() ? rows->size(0) : out.size(0);
  check_rows("rows", rows, n, out.size(0), "out");
  check_rows("rows_b", rows_b, n, out_b.size(0), "out_b");
  const at::Tensor r = rows.has_value() ? rows->contiguous() : at::Tensor();
  const at::Tensor rb = rows_b.has_value() ? rows_b->contiguous() : at::Tensor();
  const int64_t* rp = rows.has_value() ? r.data_ptr<int64_t>() : nullptr;
  const int64_t* rbp = rows_b.has_value() ? rb.data_ptr<int64_t>() : nullptr;
  const int64_t D = out.size(1);
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    merge_rows<T>(out.data_ptr<T>(), out.stride(0), out.stride(1), lse.data_ptr<float>(),
                  lse.stride(0), out_b.data_ptr<T>(), out_b.stride(0), out_b.stride(1),
                  lse_b.data_ptr<float>(), lse_b.stride(0), rp, rbp, n, D);
  };
  switch (out.scalar_type()) {
    case at::kFloat:
      return run(float{});
    case at::kHalf:
      return run(c10::Half{});
    case at::kBFloat16:
      return run(c10::BFloat16{});
    default:
      TORCH_CHECK(false, op, ": out must be float32, float16 or bfloat16; got ",
                  out.scalar_type());
  }
}

}  // namespace
}  // namespace frugal::cpu

TORCH_LIBRARY_IMPL(frugal, CPU, m) {
  m.impl("merge_attention_states_", &frugal::cpu::merge_attention_states_cpu);
}
