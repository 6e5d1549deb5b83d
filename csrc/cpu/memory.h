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

// Marks the 2 MiB-aligned interior of a large tensor for transparent huge pages (honoured when
// the kernel's THP mode is "madvise" or "always"). A large fresh allocation is a new mapping on
// every call, and its first touch otherwise takes one page fault per 4 KiB: milliseconds for
// tens of MiB. The hint changes no value.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes < kHugeOutputBytes) return;
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty with the huge-page hint.
inline at::Tensor empty_hinted(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  advise_huge_pages(out);
  return out;
}

}  // namespace frugal::cpu
