// frugal._cuda_emu: the CUDA kernels of csrc/cuda compiled for the host through the emulation
// of csrc/cuda_emu/emu.h, registered as torch ops on CPU tensors so the test suite runs them:
// torch.ops.frugal_emu.paged_attention / paged_prefill_attention / paged_append (and the _lse
// variants of the attention ops) / sparse_attention_fwd take exactly the arguments of frugal's
// ops (their schemas are copied from the frugal:: ones at import, so they cannot drift) and go
// through the same glue (csrc/cuda/paged_attention_glue.h, sparse_attention_glue.h), plan and
// launchers as the GPU build. Python-level knobs: configure() (SM count, resident blocks per
// SM and minimum partition of the split plan; the emulator's schedule and host threads),
// last_plan() (the split plan of the last decode call), kernel_configs() (threads and dynamic
// shared memory of every kernel, for frugal.build_info's occupancy report) and emu_selftest
// (tests of the emulator itself).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <sstream>
#include <string>

#include "cuda/kernel_configs_py.h"
#include "cuda/paged_attention_glue.h"
#include "cuda/sparse_attention_glue.h"
#include "cuda_emu/control.h"

namespace frugal::emu {
namespace {

std::atomic<int> g_num_sms{132};
std::atomic<int64_t> g_min_partition{512};
thread_local cuda::PagedAttentionPlan tl_last_plan{};

struct EmuBackend {
  static constexpr const char* kDevice = "CPU";
  static bool on_device(const at::Tensor& t, const at::Tensor&) { return t.is_cpu(); }
  struct Guard {
    explicit Guard(c10::Device) {}
  };
  static cudaStream_t stream() { return nullptr; }
  static cuda::PlanKnobs knobs(const at::Tensor&) {
    return {g_num_sms.load(), g_min_partition.load()};
  }
  static void on_plan(const cuda::PagedAttentionPlan& plan) { tl_last_plan = plan; }
  static const char* error_string(cudaError_t) { return last_error(); }
};

at::Tensor emu_selftest(c10::string_view name, const at::Tensor& x, int64_t arg) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu(), "emu_selftest: x must be a float32 CPU "
              "tensor; got ", x.scalar_type(), " on ", x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::zeros({4096}, x.options());
  int64_t n = 0;
  const std::string s(name);
  const int rc = run_selftest(s.c_str(), xc.const_data_ptr<float>(), xc.numel(), arg,
                              out.data_ptr<float>(), out.numel(), &n);
  TORCH_CHECK(rc != -1, "emu_selftest: unknown kernel '", s, "'");
  TORCH_CHECK(rc == 0, "emu_selftest(", s, "): ", last_error());
  return out.narrow(0, 0, n).clone();
}

std::unique_ptr<torch::Library> g_def, g_impl;

// Defines frugal_emu::<name> with frugal::<name>'s schema (frugal._C must be loaded).
void def_like_frugal(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({std::string("frugal::") + name, ""});
  TORCH_CHECK(handle.has_value(), "frugal._cuda_emu: frugal::", name,
              " is not registered; import frugal (which loads frugal._C) first");
  std::ostringstream schema;
  schema << handle->schema();
  std::string text = schema.str();
  const std::string prefix = "frugal::";
  TORCH_CHECK(text.rfind(prefix, 0) == 0, "frugal._cuda_emu: unexpected schema ", text);
  g_def->def(text.substr(prefix.size()).c_str());
}

void register_ops() {
  g_def = std::make_unique<torch::Library>(torch::Library::DEF, "frugal_emu", std::nullopt,
                                           __FILE__, __LINE__);
  for (const char* name : {"paged_attention", "paged_prefill_attention", "paged_append",
                           "paged_attention_lse", "paged_prefill_attention_lse",
                           "sparse_attention_fwd"}) {
    def_like_frugal(name);
  }
  g_def->def("emu_selftest(str name, Tensor x, int arg) -> Tensor");
  g_impl = std::make_unique<torch::Library>(torch::Library::IMPL, "frugal_emu",
                                            c10::DispatchKey::CPU, __FILE__, __LINE__);
  g_impl->impl("paged_attention", &cuda::glue::paged_attention<EmuBackend>);
  g_impl->impl("paged_prefill_attention", &cuda::glue::paged_prefill_attention<EmuBackend>);
  g_impl->impl("paged_append", &cuda::glue::paged_append<EmuBackend>);
  g_impl->impl("paged_attention_lse", &cuda::glue::paged_attention_lse<EmuBackend>);
  g_impl->impl("paged_prefill_attention_lse",
               &cuda::glue::paged_prefill_attention_lse<EmuBackend>);
  g_impl->impl("sparse_attention_fwd", &cuda::sparse_glue::sparse_attention_fwd<EmuBackend>);
  g_impl->impl("emu_selftest", &emu_selftest);
}

const char* schedule_name(Schedule s) {
  switch (s) {
    case Schedule::kReverse: return "reverse";
    case Schedule::kShuffle: return "shuffle";
    default: return "forward";
  }
}

// configure(num_sms=None, blocks_per_sm=None, min_partition=None, schedule=None, seed=None,
// host_threads=None) -> dict of the settings now in force (None leaves one as it is).
PyObject* configure(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"num_sms", "blocks_per_sm", "min_partition", "schedule",
                                "seed",    "host_threads",  nullptr};
  PyObject* o[6] = {Py_None, Py_None, Py_None, Py_None, Py_None, Py_None};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|OOOOOO", const_cast<char**>(names), &o[0],
                                   &o[1], &o[2], &o[3], &o[4], &o[5])) {
    return nullptr;
  }
  long long v[6] = {0, 0, 0, 0, 0, 0};
  for (int i : {0, 1, 2, 4, 5}) {
    if (o[i] == Py_None) continue;
    v[i] = PyLong_AsLongLong(o[i]);
    if (v[i] == -1 && PyErr_Occurred()) return nullptr;
    if (v[i] < (i == 4 || i == 5 ? 0 : 1)) {
      PyErr_Format(PyExc_ValueError, "configure: %s must be >= %d; got %lld", names[i],
                   i == 4 || i == 5 ? 0 : 1, v[i]);
      return nullptr;
    }
  }
  Schedule sched = schedule();
  if (o[3] != Py_None) {
    const char* s = PyUnicode_AsUTF8(o[3]);
    if (s == nullptr) return nullptr;
    const std::string name(s);
    if (name == "forward") {
      sched = Schedule::kForward;
    } else if (name == "reverse") {
      sched = Schedule::kReverse;
    } else if (name == "shuffle") {
      sched = Schedule::kShuffle;
    } else {
      PyErr_Format(PyExc_ValueError,
                   "configure: schedule must be 'forward', 'reverse' or 'shuffle'; got '%s'", s);
      return nullptr;
    }
  }
  if (o[0] != Py_None) g_num_sms.store(static_cast<int>(v[0]));
  if (o[1] != Py_None) set_blocks_per_sm(static_cast<int>(v[1]));
  if (o[2] != Py_None) g_min_partition.store(v[2]);
  set_schedule(sched, o[4] != Py_None ? static_cast<uint64_t>(v[4]) : schedule_seed());
  if (o[5] != Py_None) set_host_threads(static_cast<int>(v[5]));
  return Py_BuildValue("{s:i,s:i,s:L,s:s,s:K,s:i}", "num_sms", g_num_sms.load(), "blocks_per_sm",
                       blocks_per_sm(), "min_partition",
                       static_cast<long long>(g_min_partition.load()), "schedule",
                       schedule_name(schedule()), "seed",
                       static_cast<unsigned long long>(schedule_seed()), "host_threads",
                       host_threads());
}

// last_plan() -> dict: the split plan of this thread's last paged_attention call.
PyObject* last_plan(PyObject*, PyObject*) {
  const cuda::PagedAttentionPlan& p = tl_last_plan;
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:i}", "units", static_cast<long long>(p.units),
                       "splits", static_cast<long long>(p.splits), "partition",
                       static_cast<long long>(p.partition), "ws_o_floats",
                       static_cast<long long>(p.ws_o_floats), "ws_lse_floats",
                       static_cast<long long>(p.ws_lse_floats), "blocks_per_sm", p.blocks_per_sm);
}

PyObject* kernel_configs(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  for (const cuda::KernelLaunchConfig* table :
       {cuda::paged_attention_kernel_configs(), cuda::sparse_attention_kernel_configs()}) {
    if (!cuda::append_kernel_configs(list, table)) {
      Py_DECREF(list);
      return nullptr;
    }
  }
  return list;
}

PyMethodDef methods[] = {
    {"configure", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(configure)),
     METH_VARARGS | METH_KEYWORDS,
     "configure(num_sms=None, blocks_per_sm=None, min_partition=None, schedule=None, seed=None, "
     "host_threads=None) -> dict: the split plan's inputs and the emulator's schedule "
     "('forward', 'reverse', 'shuffle' with seed) and host threads (0: OpenMP's default)."},
    {"last_plan", last_plan, METH_NOARGS,
     "last_plan() -> dict: the split-KV plan of this thread's last paged_attention call."},
    {"kernel_configs", kernel_configs, METH_NOARGS,
     "kernel_configs() -> list of {kernel, threads, dynamic_smem} for the paged and sparse "
     "attention kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cuda_emu",
                      "frugal's CUDA kernels compiled for the host (emulated)", -1, methods};

}  // namespace
}  // namespace frugal::emu

PyMODINIT_FUNC PyInit__cuda_emu() {
  try {
    frugal::emu::register_ops();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return PyModule_Create(&frugal::emu::module);
}
