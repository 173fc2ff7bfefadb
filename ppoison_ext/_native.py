"""Loads the native kernels (``ppoison_ext._C``) into ``torch.ops.ppoison``, or records why not.

When the library is missing or fails to load (no build, another platform, a CUDA version that
does not match torch's, or ``PPOISON_NO_NATIVE=1`` in the environment), :data:`HAS_OPS` is False,
one warning names the cause and the command that builds (or, for a library built for another torch
or platform, rebuilds) it, and :mod:`ppoison_ext.ops` runs the pure-PyTorch twins of
:mod:`ppoison_ext.reference` instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Optional

import torch

BUILD_COMMAND = "pip install --no-build-isolation -e ."
#: Rebuilds against the torch of the running environment, and keeps that torch.
REBUILD_COMMAND = "pip install --no-build-isolation ."
ENV_NO_NATIVE = "PPOISON_NO_NATIVE"
# What the dynamic loader says when a library built for another torch (or a CUDA build of torch in
# a CPU one, or another libc/libstdc++, or another architecture) is loaded.
_MISMATCH_SIGNS = ("undefined symbol", "cannot open shared object file", "version `", "ELF")
MISMATCH_HINT = f"built for another torch or platform: rebuild with `{REBUILD_COMMAND}`"


def _cuda_versions() -> dict:
    return {
        "cuda": _CUDART is not None,
        "cuda_version": f"{_CUDART // 1000}.{(_CUDART % 1000) // 10}" if _CUDART is not None else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def _import(name: str):
    """Imports the native module ``name`` (which runs its kernel registrations): (module, None),
    or (None, why not). (By name: the import-layer check reads `from . import _C` as an import of
    the package itself.)"""
    try:
        return importlib.import_module(f"{__package__}.{name}"), None
    except (ImportError, OSError, RuntimeError) as err:
        why = f"ppoison_ext.{name} could not be loaded ({type(err).__name__}: {err})"
        return None, f"{why}; {MISMATCH_HINT}" if any(m in str(err) for m in _MISMATCH_SIGNS) else why


def _load() -> Optional[str]:
    """Loads ``_C`` (schemas, CPU kernels) and, into a CUDA build of torch, ``_C_cuda`` when it was
    built; returns None on success, else why the native kernels are not used."""
    global _CUDART
    if os.environ.get(ENV_NO_NATIVE, "").strip().lower() in ("1", "true", "yes", "on"):
        return f"{ENV_NO_NATIVE} is set"
    _, why = _import("_C")
    if why or torch.version.cuda is None or importlib.util.find_spec(f"{__package__}._C_cuda") is None:
        return why
    cuda, why = _import("_C_cuda")
    if why:
        return why
    built, used = f"{cuda.cuda_version // 1000}.{(cuda.cuda_version % 1000) // 10}", torch.version.cuda
    if built.split(".")[0] != used.split(".")[0]:
        return f"ppoison_ext._C_cuda was built with CUDA {built} but torch uses CUDA {used}; {MISMATCH_HINT}"
    _CUDART = cuda.cuda_version
    return None


#: The CUDA runtime version (e.g. 13000) of the loaded CUDA kernels; None without them.
_CUDART: Optional[int] = None
#: Why the native library is not used (None when it is).
REASON: Optional[str] = _load()
#: Whether :mod:`ppoison_ext.ops` runs the native kernels.
HAS_OPS: bool = REASON is None

if not HAS_OPS:
    # A mismatch already says how to rebuild; otherwise the library was not built at all.
    _how = "" if MISMATCH_HINT in (REASON or "") else (
        f" Build the native ones with `{BUILD_COMMAND}` from the repository root.")
    warnings.warn(f"ppoison_ext runs its pure-PyTorch kernels (slower): {REASON}.{_how}",
                  RuntimeWarning, stacklevel=2)


def native_info() -> dict:
    """Which kernels run and what the native extension was built with: ``{"native", "reason",
    "cuda", "cuda_version" ("13.0"), "torch", "torch_cuda"}``; ``reason`` says why not native."""
    if HAS_OPS:
        return {"native": True, "reason": None, **_cuda_versions()}
    return {"native": False, "reason": REASON, "cuda": False, "cuda_version": None,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda}
