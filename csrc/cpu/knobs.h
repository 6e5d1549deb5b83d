// The tunable knobs of the C++ CPU kernels: work-split and blocking constants that change their
// speed, not their results. Each has a default (the value the kernels were measured with) and a
// valid range. A call sets them through frugal.cpu_knobs(...) (python/frugal/knobs.py),
// which `frugal tune` searches and `auto` applies from the tuned file; the override lives in
// the calling thread, so a kernel reads every knob it needs on that thread, before its
// at::parallel_for.
//
// A new knob is one X(name, default, lo, hi, doc) line here and a knob(Knob::name) read.
#pragma once

#include <cstdint>

#define FRUGAL_CPU_KNOBS(X)                                                                    \
  X(int8_block_k4, 1024, 16, 1 << 20,                                                          \
    "int8 GEMM: K is cut into blocks of at most this many 4-byte steps (the a tile in L1)")    \
  X(int8_task_groups, 4, 1, 64,                                                                \
    "int8 GEMM: the most 64-column weight groups one task takes (it reads a's rows once)")     \
  X(int8_task_block_bytes, 512 * 1024, 4096, 64 << 20,                                         \
    "int8 GEMM: a task's blocks of the weight stay within this many bytes (its L2 share)")     \
  X(int8_stream_max_m, 4, 0, 4,                                                                \
    "int8 GEMM: up to this many rows read a plain int8 weight as it is instead of packing it") \
  X(paged_partition_tokens, 512, 16, 1 << 20,                                                  \
    "paged decode: tokens per split-KV partition when sequences are too few for the threads")  \
  X(paged_min_items_per_thread, 4, 1, 256,                                                     \
    "paged decode: split KV until there are this many work items per thread")                  \
  X(paged_many_heads, 16, 1, 1 << 16,                                                          \
    "paged decode: with more query heads per kv head than this, split heads, not KV")          \
  X(paged_prefill_rows, 64, 1, 1 << 16,                                                        \
    "paged prefill: query rows per work item")

namespace frugal::cpu {

enum class Knob : int {
#define FRUGAL_KNOB_ENUM(name, def, lo, hi, doc) name,
  FRUGAL_CPU_KNOBS(FRUGAL_KNOB_ENUM)
#undef FRUGAL_KNOB_ENUM
  kCount
};

struct KnobInfo {
  const char* name;
  int64_t def, lo, hi;
  const char* doc;
};

// The knob's value on the calling thread: its override, else its default.
int64_t knob(Knob k);
// Every knob's name, default and range, in enum order.
const KnobInfo* knob_infos();
constexpr int kKnobCount = static_cast<int>(Knob::kCount);
// Sets (value >= 0, within the range) or clears (-1) the calling thread's override of knob i;
// returns the previous override (-1 for none). The caller checks the range.
int64_t set_knob_override(int i, int64_t value);

}  // namespace frugal::cpu
