"""Adversarial posterior generators, invariant checks and value comparisons, shared by the
property tests (tests/test_properties.py) and the long fuzz run (tools/fuzz.py)."""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .testing import make_probs

__all__ = ["EDGE_KINDS", "VALUE_TOL", "check_ball", "check_simplex", "compare_close", "distance",
           "edge_probs", "mismatched_rows"]

EDGE_KINDS = ("softmax", "peaked", "onehot", "uniform", "ties", "zeros", "tiny", "denormal", "two_hot")


def edge_probs(B: int, K: int, kind: str, *, dtype=torch.float32, generator=None) -> Tensor:
    """:func:`ppoison_ext.testing.make_probs` with the fuzzer's harsher settings: ``peaked``
    logits of ±1e3, half the entries dropped in ``zeros`` / ``tiny`` / ``denormal``, and the
    softmax rows renormalised too."""
    y = make_probs(B, K, kind, dtype=torch.float64, generator=generator, peak_scale=1e3, drop_rate=0.5)
    if kind in ("softmax", "peaked"):
        y = y / y.sum(-1, keepdim=True)
    return y.to(dtype)


def distance(y: Tensor, yp: Tensor, ydist: str) -> Tensor:
    y, yp = y.double(), yp.double()
    if ydist == "l1":
        return (y - yp).abs().sum(-1)
    if ydist == "l2":
        return (y - yp).norm(dim=-1)
    pos = y > 0
    return torch.where(pos, y * (torch.log(torch.where(pos, y, torch.ones_like(y))) - yp.log()),
                       torch.zeros_like(y)).sum(-1)


def check_simplex(y: Tensor, tol: float = 1e-6) -> List[str]:
    errs = []
    if not torch.isfinite(y).all():
        errs.append("non-finite output")
    if (y < 0).any():
        errs.append(f"negative entry {float(y.min())}")
    if y.numel() and ((y.double().sum(-1) - 1).abs() > tol).any():
        errs.append(f"row sum off by {float((y.double().sum(-1) - 1).abs().max())}")
    return errs


def check_ball(y: Tensor, yp: Tensor, eps: float, ydist: str, tol: float = 1e-5) -> List[str]:
    if y.numel() == 0:
        return []
    d = distance(y, yp, ydist)
    bad = ~(d <= eps + tol)
    return [f"{ydist} distance {float(d[bad].max())} > epsilon {eps}"] if bad.any() else []


# Relative tolerance per output dtype for native kernels against their pure-PyTorch twins: both
# compute in float64 and round once (float32: an ulp or two; float64: summation order).
VALUE_TOL = {torch.float32: 4e-6, torch.float64: 1e-9}


def mismatched_rows(got: Tensor, want: Tensor, rtol: float, atol) -> Tensor:
    """Bool [B]: rows where |got − want| > atol + rtol·|want| anywhere, or the non-finite
    entries differ. ``atol`` is a number or a per-row tensor [B]."""
    g, w = got.double(), want.double()
    if g.dim() == 1:
        g, w = g[:, None], w[:, None]
    g, w = g.reshape(g.shape[0], -1), w.reshape(w.shape[0], -1)
    a = torch.as_tensor(atol, dtype=torch.float64, device=g.device)
    a = a[:, None] if a.dim() == 1 else a
    fin = torch.isfinite(g) & torch.isfinite(w)
    same_nonfinite = (~torch.isfinite(g) & (g == w)) | (torch.isnan(g) & torch.isnan(w))
    bad = fin & ((g - w).abs() > a + rtol * w.abs())
    bad |= ~fin & ~same_nonfinite
    return bad.any(-1) if g.shape[0] else torch.zeros(0, dtype=torch.bool, device=g.device)


def compare_close(name: str, got: Tensor, want: Tensor, rtol: float, atol=0.0) -> List[str]:
    """[] or one message ``name: k/B rows differ, max |diff| d`` (see :func:`mismatched_rows`)."""
    if got.shape != want.shape:
        return [f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"]
    bad = mismatched_rows(got, want, rtol, atol)
    if not bad.any():
        return []
    d = (got.double() - want.double()).abs().reshape(got.shape[0], -1)[bad]
    worst = float(d.nan_to_num(float("inf")).max())
    return [f"{name}: {int(bad.sum())}/{got.shape[0]} rows differ, max |diff| {worst:.3g}"]
