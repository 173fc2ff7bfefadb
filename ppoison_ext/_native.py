"""Loads the native kernels (``ppoison_ext._C``) into ``torch.ops.ppoison``, or records why not.

When the library is missing or fails to load (no build, another platform, a CUDA version that
does not match torch's, or ``PPOISON_NO_NATIVE=1`` in the environment), :data:`HAS_OPS` is False,
one warning names the cause, and :mod:`ppoison_ext.ops` runs the pure-PyTorch twins of
:mod:`ppoison_ext.reference` instead.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional

import torch

BUILD_COMMAND = "pip install --no-build-isolation -e ."
ENV_NO_NATIVE = "PPOISON_NO_NATIVE"


def _cuda_versions() -> dict:
    v = int(torch.ops.ppoison.cuda_version())
    return {
        "cuda": v >= 0,
        "cuda_version": f"{v // 1000}.{(v % 1000) // 10}" if v >= 0 else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def _load() -> Optional[str]:
    """Loads ``_C``; returns None on success, else why it did not load."""
    if os.environ.get(ENV_NO_NATIVE, "").strip().lower() in ("1", "true", "yes", "on"):
        return f"{ENV_NO_NATIVE} is set"
    try:
        # Importing the shared library runs its TORCH_LIBRARY registrations. (By name: the
        # import-layer check reads `from . import _C` as an import of the package itself.)
        importlib.import_module(f"{__package__}._C")
    except (ImportError, OSError, RuntimeError) as err:
        return f"ppoison_ext._C could not be loaded ({type(err).__name__}: {err})"
    info = _cuda_versions()
    built, used = info["cuda_version"], info["torch_cuda"]
    if built is not None and used is not None and built.split(".")[0] != used.split(".")[0]:
        return f"ppoison_ext._C was built with CUDA {built} but torch uses CUDA {used}"
    return None


#: Why the native library is not used (None when it is).
REASON: Optional[str] = _load()
#: Whether :mod:`ppoison_ext.ops` runs the native kernels.
HAS_OPS: bool = REASON is None

if not HAS_OPS:
    warnings.warn(
        f"ppoison_ext runs its pure-PyTorch kernels (slower): {REASON}. Build the native ones with "
        f"`{BUILD_COMMAND}` from the repository root.",
        RuntimeWarning,
        stacklevel=2,
    )


def native_info() -> dict:
    """Which kernels run and what the native extension was built with: ``{"native", "reason",
    "cuda", "cuda_version" ("13.0"), "torch", "torch_cuda"}``; ``reason`` says why not native."""
    if HAS_OPS:
        return {"native": True, "reason": None, **_cuda_versions()}
    return {"native": False, "reason": REASON, "cuda": False, "cuda_version": None,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda}
