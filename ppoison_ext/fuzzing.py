"""Adversarial posterior generators, invariant checks and value comparisons, shared by the
property tests (tests/test_properties.py) and the long fuzz run (tools/fuzz.py)."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor

__all__ = ["EDGE_KINDS", "VALUE_TOL", "check_ball", "check_simplex", "compare_close", "distance",
           "edge_probs", "mismatched_rows"]

EDGE_KINDS = ("softmax", "peaked", "onehot", "uniform", "ties", "zeros", "tiny", "denormal", "two_hot")


def edge_probs(B: int, K: int, kind: str, *, dtype=torch.float32, generator=None) -> Tensor:
    """Rows on the simplex with the edge cases that break naive code.

    softmax: softmax(N(0, 3²)); peaked: softmax of ±1e3 logits (exact zeros after rounding);
    onehot: exact one-hot; uniform; ties: equal top entries; zeros: random with exact zeros;
    tiny: entries of 1e-38; denormal: float32 subnormal entries; two_hot: mass split on two.
    """
    g = generator
    if kind == "onehot":
        y = torch.nn.functional.one_hot(torch.randint(K, (B,), generator=g), K).double()
    elif kind == "uniform":
        y = torch.full((B, K), 1.0 / K, dtype=torch.float64)
    elif kind == "two_hot":
        a = torch.randint(K, (B,), generator=g)
        b = (a + 1 + torch.randint(K - 1, (B,), generator=g)) % K
        y = torch.zeros(B, K, dtype=torch.float64)
        w = torch.rand(B, generator=g, dtype=torch.float64)
        y[torch.arange(B), a] = w
        y[torch.arange(B), b] += 1 - w
    else:
        scale = {"peaked": 1e3}.get(kind, 3.0)
        y = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64) * scale, -1)
        if kind == "ties":
            top = y.argmax(-1)
            other = (top + 1 + torch.randint(K - 1, (B,), generator=g)) % K
            y[torch.arange(B), other] = y[torch.arange(B), top]
        elif kind in ("zeros", "tiny", "denormal"):
            value = {"zeros": 0.0, "tiny": 1e-38, "denormal": 1e-44}[kind]
            drop = torch.rand(B, K, generator=g) < 0.5
            drop[torch.arange(B), y.argmax(-1)] = False
            y = torch.where(drop, torch.full_like(y, value), y)
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


# Relative tolerance per output dtype for native-vs-reference value comparisons: both sides
# compute the MAD math in float64 and round once, so float32 outputs may differ by an ulp or
# two and float64 ones by summation order.
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


def summarize(errors: Dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"
