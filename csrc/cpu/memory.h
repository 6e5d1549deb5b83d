// Memory helpers shared by the CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace frugal::cpu {

// From this size on, fresh outputs are marked for transparent huge pages.
constexpr int64_t kHugeOutputBytes = int64_t{8} << 20;

// Marks the 2 MiB-aligned interior of [p, p + bytes) for transparent huge pages (honoured when
// the kernel's THP mode is "madvise" or "always"); returns whether a range was marked. Regions
// under kHugeOutputBytes are left alone. The hint changes no value. Two uses:
// - A large fresh output is a new mapping on every call, and its first touch otherwise takes
//   one page fault per 4 KiB: milliseconds for tens of MiB.
// - A KV-cache marked before its first touch (frugal.PagedKVCache) is read through 2 MiB
//   pages: fewer TLB misses for decode, which reads it in scattered blocks.
inline bool advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugeOutputBytes) return false;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t begin = (a + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (a + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  return end > begin && madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

inline void advise_huge_pages(const at::Tensor& t) {
  (void)advise_huge_pages(t.data_ptr(), t.numel() * static_cast<int64_t>(t.element_size()));
}

// at::empty with the huge-page hint.
inline at::Tensor empty_hinted(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);
  return out;
}

}  // namespace frugal::cpu
