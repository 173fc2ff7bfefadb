"""Loads the native kernels (``ppoison_ext._C``) into ``torch.ops.ppoison``."""

from __future__ import annotations

import importlib

import torch

try:
    # Importing the shared library runs its TORCH_LIBRARY registrations. (By name: the
    # import-layer check reads `from . import _C` as an import of the package itself.)
    importlib.import_module(f"{__package__}._C")
except ImportError as err:  # pragma: no cover - only without a build
    raise ImportError(
        "ppoison_ext's native extension (ppoison_ext._C) is not built. Build it with "
        "`pip install --no-build-isolation -e .` from the repository root (see README.md)."
    ) from err


def native_info() -> dict:
    """What the native extension was built with.

    Returns:
        ``{"cuda": bool, "cuda_version": "13.0" | None, "torch": str, "torch_cuda": str | None}``.
    """
    v = int(torch.ops.ppoison.cuda_version())
    return {
        "cuda": v >= 0,
        "cuda_version": f"{v // 1000}.{(v % 1000) // 10}" if v >= 0 else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }


def _check_cuda_match() -> None:
    info = native_info()
    if info["cuda"] and info["torch_cuda"] is not None:
        if info["cuda_version"].split(".")[0] != info["torch_cuda"].split(".")[0]:
            raise RuntimeError(
                f"ppoison_ext was built with CUDA {info['cuda_version']} but torch uses CUDA "
                f"{info['torch_cuda']}; rebuild with `pip install --no-build-isolation -e .`"
            )


_check_cuda_match()
