"""Builds frugal._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA build of torch
are present (a GPU is not needed to build).

Environment:
  FRUGAL_NO_CUDA=1        skip the CUDA sources (frugal._cuda_emu, the host-emulated build of
                          the same kernels the tests run, needs only the CUDA headers and is
                          built whenever they are found)
  FRUGAL_SANITIZE=1       CPU sources only, with AddressSanitizer and UndefinedBehaviorSanitizer
                          (objects in build/sanitize/temp; `make sanitize` builds and tests it)
  TORCH_CUDA_ARCH_LIST    CUDA targets (default "8.0;9.0a")
  CUDA_HOME               CUDA toolkit root (default: /usr/local/cuda when it has headers)
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
SANITIZE = os.environ.get("FRUGAL_SANITIZE", "0") == "1"
# -fno-wrapv undoes the -fwrapv of CPython's flags, which defines signed overflow and so hides it.
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-wrapv",
                  "-fno-omit-frame-pointer", "-O1", "-g"]


def _find_cuda_home():
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script in /usr/local/bin would
    # make that /usr/local, where no CUDA headers are. Resolve the real toolkit first.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            os.environ["CUDA_HOME"] = home
            return


_find_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def _with_cuda():
    if os.environ.get("FRUGAL_NO_CUDA", "0") == "1":
        return False, "FRUGAL_NO_CUDA=1"
    if SANITIZE:
        return False, "FRUGAL_SANITIZE=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda}, nvcc in {CUDA_HOME}"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    with_cuda, why = _with_cuda()
    # -Wno-maybe-uninitialized: GCC 12 false positives inside its own AVX-512 intrinsics.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas",
           "-Wno-maybe-uninitialized"]
    sources = ["csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    print(f"frugal: CUDA kernels {'on' if with_cuda else 'off'} ({why})")
    if not with_cuda:
        link = ["-fopenmp"]
        if SANITIZE:
            cxx = [f for f in cxx if f != "-O3"] + SANITIZE_FLAGS
            link += SANITIZE_FLAGS[:1]
            define_macros.append(("FRUGAL_SANITIZED", "1"))
        return CppExtension(
            "frugal._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    # Without a GPU torch cannot detect an arch and would build for every arch it knows.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    print(f"frugal: CUDA archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    # The pip CUDA wheels of torch ship the CUDA library headers here.
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    include_dirs += sorted(glob.glob(os.path.join(nvidia, "cu*", "include")))
    define_macros.append(("FRUGAL_WITH_CUDA", "1"))
    nvcc = [
        "-O3",
        "-std=c++17",
        "--expt-relaxed-constexpr",
        "-Xptxas=-warn-spills,-warn-lmem-usage",
        "-lineinfo",
    ]
    return CUDAExtension(
        "frugal._C",
        sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=["-fopenmp"],
    )


def _cuda_headers():
    """A directory with cuda_fp16.h (CUDA_HOME's, or the pip CUDA wheels torch brings), or None."""
    nvidia = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
    for d in [os.path.join(CUDA_HOME or "/usr/local/cuda", "include")] + sorted(
            glob.glob(os.path.join(nvidia, "cu*", "include"))):
        if os.path.exists(os.path.join(d, "cuda_fp16.h")):
            return d
    return None


def _emu_extension():
    """frugal._cuda_emu: csrc/cuda kernels compiled by g++ through csrc/cuda_emu/emu.h."""
    headers = _cuda_headers()
    print(f"frugal: emulated CUDA kernels {'on' if headers else 'off (no cuda_fp16.h found)'}")
    if headers is None:
        return []
    cxx = ["-O2", "-fopenmp", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas",
           "-Wno-attributes", "-DFRUGAL_CUDA_EMU=1"]
    link = ["-fopenmp"]
    if SANITIZE:  # the CUDA device code runs under the sanitizers too: an out-of-bounds index shows
        cxx = [f for f in cxx if f != "-O2"] + SANITIZE_FLAGS
        link += SANITIZE_FLAGS[:1]
    return [CppExtension("frugal._cuda_emu", _sources("csrc/cuda_emu/*.cpp"),
                         include_dirs=[os.path.join(ROOT, "csrc"), headers],
                         extra_compile_args={"cxx": cxx}, extra_link_args=link)]


class BuildExt(BuildExtension):
    """Compiles into ./build/temp (sanitized: ./build/sanitize/temp), kept between builds, so
    ninja rebuilds only what changed. (pip's editable builds otherwise use a fresh temporary
    directory every time.)"""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", *(["sanitize"] if SANITIZE else []), "temp")


setup(
    packages=["frugal", "frugal.bench", "frugal.integrations", "frugal.integrations.transformers",
              "frugal.kernels", "frugal.kernels.configs"],
    package_dir={
        "frugal": "python/frugal",
        "frugal.bench": "python/frugal/bench",
        "frugal.integrations": "python/frugal/integrations",
        "frugal.integrations.transformers": "python/frugal/integrations/transformers",
        "frugal.kernels": "kernels",
        "frugal.kernels.configs": "kernels/configs",
    },
    package_data={"frugal.kernels.configs": ["*.json"]},
    ext_modules=[_extension()] + _emu_extension(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
