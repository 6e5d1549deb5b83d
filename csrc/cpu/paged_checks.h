// The host check of paged block tables on CPU tensors (frugal.paged_ops._cpu_tables_bad): one
// pass over the int32 tables and lengths, called with their addresses and strides from Python
// (a few hundred ns, where the numpy version took about 10 us of a 9 us decode). The caller
// has checked dtypes (int32), devices (CPU) and shapes; on True it finds and names the problem
// in Python.
#pragma once

#include <cstdint>

namespace frugal::cpu {

struct PagedTables {
  const int32_t* table;  // [rows, width] at strides (s0, s1)
  int64_t rows, width, s0, s1;
  const int32_t* lens;  // [rows] at stride ls
  int64_t ls;
  const int32_t* q_lens;  // [rows] at stride qs, or null (one query per sequence)
  int64_t qs;
  int64_t q_rows;  // q's rows (the sum q_lens must have)
  int64_t num_blocks, block_size;
  int64_t window;  // <= 0: none
};

// True when an entry is outside [-1, num_blocks), an entry the op reads is -1, a length is
// outside [0, width * block_size], or (prefill) a q_len is outside [0, seq_len] or they do not
// sum to q_rows.
bool paged_tables_bad(const PagedTables& t);

}  // namespace frugal::cpu
