// A launch configuration table (launch.h, KernelLaunchConfig rows up to a nullptr one) as Python
// dicts {kernel, threads, dynamic_smem}, for the modules that report them to frugal.build_info
// (frugal._C: the CUTLASS kernels; frugal._cuda_emu: the attention kernels).
#pragma once

#include <Python.h>

#include "cuda/launch.h"

namespace frugal::cuda {

// Appends the table's rows to list; false (a Python error set) on failure.
inline bool append_kernel_configs(PyObject* list, const KernelLaunchConfig* c) {
  for (; c->kernel != nullptr; ++c) {
    PyObject* row = Py_BuildValue("{s:s,s:i,s:i}", "kernel", c->kernel, "threads", c->threads,
                                  "dynamic_smem", c->dynamic_smem);
    const bool ok = row != nullptr && PyList_Append(list, row) == 0;
    Py_XDECREF(row);
    if (!ok) return false;
  }
  return true;
}

}  // namespace frugal::cuda
