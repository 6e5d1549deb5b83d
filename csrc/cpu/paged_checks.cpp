#include "paged_checks.h"

#include <algorithm>

namespace frugal::cpu {

bool paged_tables_bad(const PagedTables& t) {
  const int64_t capacity = t.width * t.block_size;
  int64_t q_sum = 0;
  for (int64_t b = 0; b < t.rows; ++b) {
    const int64_t len = t.lens[b * t.ls];
    if (len < 0 || len > capacity) return true;
    int64_t n = 1;
    if (t.q_lens != nullptr) {
      n = t.q_lens[b * t.qs];
      if (n < 0 || n > len) return true;
      q_sum += n;
    }
    // Positions read: [lo, len), lo the first query's window start.
    const int64_t lo = t.window > 0 ? std::max<int64_t>(len - n - t.window + 1, 0) : 0;
    const int32_t* row = t.table + b * t.s0;
    for (int64_t j = 0; j < t.width; ++j) {
      const int64_t e = row[j * t.s1];
      if (e < -1 || e >= t.num_blocks) return true;
      const int64_t start = j * t.block_size;
      if (e < 0 && start < len && start + t.block_size > lo) return true;
    }
  }
  return t.q_lens != nullptr && q_sum != t.q_rows;
}

}  // namespace frugal::cpu
