"""Shared test and benchmark helpers: devices, dtypes, tolerances and input makers."""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

__all__ = ["devices", "float_dtypes", "tol", "make_probs", "make_features", "make_jacobian", "PROB_KINDS",
           "IdentityLogits"]


def devices() -> List[torch.device]:
    """CPU, plus the first GPU when one is present."""
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda:0"))
    return out


float_dtypes = [torch.float32, torch.float64]

# assert_close tolerances per dtype. Kernels compute in float64 and round once; the
# float32 twins round at every step, so float32 gets a few ulps of slack.
_TOL: Dict[torch.dtype, Dict[str, float]] = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-6},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> Dict[str, float]:
    """Tolerances for ``torch.testing.assert_close``; ``scale`` widens them (long reductions)."""
    t = _TOL[dtype]
    return {"rtol": t["rtol"] * scale, "atol": t["atol"] * scale}


PROB_KINDS = ("random", "peaked", "onehot", "uniform", "ties", "zeros", "tiny")


def make_probs(B: int, K: int, kind: str = "random", *, dtype=torch.float32, device="cpu", generator=None,
               peak_scale: float = 10.0, drop_rate: float = 0.3):
    """Rows on the probability simplex of a given kind, the edge cases that break naive code.

    random (or softmax): softmax of N(0, 3²) logits; peaked: softmax of N(0, peak_scale²)
    logits (exact zeros after rounding for large scales); onehot; uniform; ties: two classes
    tied at the top; two_hot: the mass split on two classes; zeros / tiny / denormal: random
    with a ``drop_rate`` share of the entries (never the top one) set to 0 / 1e-38 / 1e-44.
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
        scale = peak_scale if kind == "peaked" else 3.0
        y = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64) * scale, -1)
        if kind == "ties" and K >= 2:
            top = y.argmax(-1)
            other = (top + 1 + torch.randint(K - 1, (B,), generator=g)) % K
            y[torch.arange(B), other] = y[torch.arange(B), top]
            y = y / y.sum(-1, keepdim=True)
        elif kind in ("zeros", "tiny", "denormal"):
            value = {"zeros": 0.0, "tiny": 1e-38, "denormal": 1e-44}[kind]
            drop = torch.rand(B, K, generator=g) < drop_rate
            drop[torch.arange(B), y.argmax(-1)] = False
            y = torch.where(drop, torch.full_like(y, value), y)
            y = y / y.sum(-1, keepdim=True)
    return y.to(dtype=dtype, device=device)


def make_features(B: int, H: int, *, dtype=torch.float32, device="cpu", generator=None):
    """Non-negative (post-ReLU-like) features h [B, H]."""
    return torch.relu(torch.randn(B, H, generator=generator, dtype=torch.float64)).to(dtype=dtype, device=device)


def make_jacobian(B: int, K: int, D: int, *, dtype=torch.float32, device="cpu", generator=None):
    """Random explicit Jacobians G [B, K, D]."""
    return torch.randn(B, K, D, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)


class IdentityLogits(nn.Module):
    """A victim whose logits are its input (an identity nn.Linear): its posteriors are
    softmax(x), so tests can feed adversarial posteriors through a real model."""

    def __init__(self, K: int):
        super().__init__()
        self.fc = nn.Linear(K, K)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(K))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x)
