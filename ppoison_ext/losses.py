"""Losses shared by the attackers, the simulated online attackers and training."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy"]


def soft_cross_entropy(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None, *,
                       reduction: str = "mean") -> Tensor:
    """Cross-entropy with soft targets: per row ``-Σ_k t_bk · log_softmax(z_b)_k``.

    The targets are used as given, **not renormalised** (top-k outputs whose rows sum to
    less than 1 are used as they are, as the reference trains on them).

    Args:
        logits: [B, K].
        targets: [B, K] (e.g. a victim's posteriors).
        weights: optional per-class weights [K], multiplied into each term.
        reduction: ``mean`` (over rows), ``sum``, or ``none`` ([B]).

    Returns:
        A scalar tensor ([B] with ``reduction="none"``).
    """
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(
            f"logits and targets must both be [B, K], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    terms = -targets * F.log_softmax(logits, dim=1)
    if weights is not None:
        terms = terms * weights
    per_row = terms.sum(1)
    if reduction == "none":
        return per_row
    return per_row.sum() if reduction == "sum" else per_row.mean()
