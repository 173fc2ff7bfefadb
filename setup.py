"""Builds the native extension ``ppoison_ext._C``.

The kernels use only PyTorch's stable ABI (``torch/csrc/stable``, targeting torch
``TORCH_TARGET``) and Python's limited API, so one build, and one abi3 wheel
(``pip wheel --no-build-isolation --no-deps .``), loads into every torch from that version on and
every Python from 3.10. The C++ CPU kernels are always compiled (``-O3 -g0``).
The CUDA kernels are compiled when nvcc and a CUDA build of torch are present and a GPU
is visible, or when ``PPOISON_FORCE_CUDA=1`` (e.g. a compile check on a machine without a
GPU). ``PPOISON_CPU_ONLY=1`` turns CUDA off. ``DEBUG=1`` builds with ``-O0 -g``.

Defaults this sets itself when they are missing (see DEVELOPERS.md):
  * ``CUDA_HOME``: the toolkit folder that holds ``bin/nvcc`` and ``include/cuda_runtime.h``
    (``/usr/local/bin/nvcc`` may be a wrapper script, so the folder above it is not it);
  * ``TORCH_CUDA_ARCH_LIST=9.0`` when no GPU is visible (H100/H200);
  * the include folders of torch's ``nvidia`` wheels (cusparse.h, cublas_v2.h, ...), which
    torch's CUDA headers include but a bare toolkit may lack.
"""

import glob
import os
import os.path as osp
import shutil
import site
import sys

from setuptools import setup

ROOT = osp.dirname(osp.abspath(__file__))
# The oldest torch whose stable ABI has what the kernels use (parallel_for, the dispatcher
# calls, DeviceGuard): 2.11. Keep in step with pyproject.toml's torch>=.
TORCH_TARGET = (2, 11)
PY_LIMITED = "cp310"  # Python's limited API from 3.10 (requires-python; torch defines Py_LIMITED_API)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _is_toolkit(folder: str) -> bool:
    return osp.isfile(osp.join(folder, "bin", "nvcc")) and osp.isfile(
        osp.join(folder, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(osp.dirname(osp.dirname(osp.realpath(nvcc))))
        try:  # a wrapper script: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, "rb") as f:
                text = f.read(8192).decode("utf-8", "ignore")
            candidates += [osp.dirname(osp.dirname(t)) for t in text.split() if t.endswith("/bin/nvcc")]
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and _is_toolkit(c):
            return c
    return None


def nvidia_wheel_includes():
    roots = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        roots += glob.glob(osp.join(sp, "nvidia", "*", "include"))
    return sorted(set(r for r in roots if osp.isdir(r)))


cuda_home = None if _env_flag("PPOISON_CPU_ONLY") else find_cuda_home()
if cuda_home and not os.environ.get("CUDA_HOME"):
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    if _env_flag("PPOISON_CPU_ONLY"):
        return False
    force = _env_flag("PPOISON_FORCE_CUDA")
    have = torch.version.cuda is not None and cuda_home is not None
    if force and not have:
        sys.exit(
            "PPOISON_FORCE_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={cuda_home!r} "
            "(set CUDA_HOME to the folder holding bin/nvcc and include/cuda_runtime.h)"
        )
    return have and (force or torch.cuda.is_available())


def extensions():
    """``ppoison_ext._C`` (schemas and CPU kernels) and, for a CUDA build, ``ppoison_ext._C_cuda``
    (the CUDA kernels, apart so that ``_C`` loads into a CPU build of torch)."""
    debug = _env_flag("DEBUG")
    with_cuda = want_cuda()
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # Hidden by default: the stable ABI's types are, and only PyInit_* is a module's interface.
    cxx += ["-fvisibility=hidden"]
    # no contraction of a*b + c into FMAs on the host either (aarch64 GCC contracts by default),
    # so host and device code (--fmad=false below) round alike
    cxx += ["-ffp-contract=off"]
    target = f"0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"
    # TORCH_TARGET_VERSION also makes every non-stable torch header an #error; py_limited_api
    # makes torch define Py_LIMITED_API (3.10).
    common = dict(include_dirs=[osp.join(ROOT, "csrc")], py_limited_api=True)
    cpu_sources = sorted(glob.glob(osp.join("csrc", "*.cpp")) + glob.glob(osp.join("csrc", "cpu", "*.cpp")))
    exts = [CppExtension("ppoison_ext._C", cpu_sources, define_macros=[("TORCH_TARGET_VERSION", target)],
                         extra_compile_args={"cxx": cxx}, **common)]
    print(f"ppoison_ext: building {'CPU + CUDA' if with_cuda else 'CPU'} kernels", file=sys.stderr)
    if not with_cuda:
        return exts
    nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-Xcompiler=-g0"]
    nvcc += ["-Xcompiler=-fvisibility=hidden", "-Xcompiler=-ffp-contract=off"]
    # --fmad=false: nvcc would contract a*b + c into FMAs (one rounding instead of two),
    # which the host compiler does not do, so the host/device math of csrc/*.h would round
    # differently on the two backends; without contraction a row gives the same bits on the
    # CPU and the GPU (up to libm's log), and the CPU tests check the GPU's arithmetic.
    nvcc += ["--expt-relaxed-constexpr", "--fmad=false"]
    nvcc += os.environ.get("NVCC_FLAGS", "").split()
    cuda = osp.join("csrc", "cuda")
    common["include_dirs"] += nvidia_wheel_includes()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    cuda_sources = sorted(glob.glob(osp.join(cuda, "*.cu")) + glob.glob(osp.join(cuda, "*.cpp")))
    # USE_CUDA also opens the stable headers' CUDA shims.
    exts.append(CUDAExtension("ppoison_ext._C_cuda", cuda_sources,
                              define_macros=[("TORCH_TARGET_VERSION", target), ("USE_CUDA", None)],
                              extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common))
    return exts

setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED}},
)
