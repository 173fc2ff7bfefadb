"""Losses shared by the attackers, the simulated online attackers and training."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy", "uniform_cross_entropy", "misinformation_loss"]


def soft_cross_entropy(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None, *,
                       reduction: str = "mean") -> Tensor:
    """Cross-entropy with soft targets [B, K]: per row ``-Σ_k w_k · t_bk · log_softmax(z_b)_k``
    (``weights`` w optional), reduced by ``mean``, ``sum`` or ``none`` ([B]). The targets are
    **not renormalised** (top-k outputs whose rows sum to less than 1 are used as they are)."""
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


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Outlier Exposure's loss: the cross-entropy of softmax(z) to the uniform distribution,
    mean over rows of ``logsumexp(z) − mean_k z_k`` (its minimum, log K, at uniform outputs).
    Shape: logits [B, K] → scalar."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, K], got {tuple(logits.shape)}")
    return (torch.logsumexp(logits, dim=1) - logits.mean(dim=1)).mean()


def misinformation_loss(logits: Tensor, labels: Tensor, eps: float = 1e-7) -> Tensor:
    """Adaptive Misinformation's loss for the misinformation model: cross-entropy with
    ``log(1 − softmax(z) + eps)`` as the logits. Per row it equals
    ``−log(1 − p_label + eps) + log(K − 1 + K·eps)``: minimising it drives p_label to 0.
    Shape: logits [B, K], int labels [B] → scalar (mean over rows)."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be [B, K] and labels [B], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    return F.cross_entropy(torch.log(1.0 - F.softmax(logits, dim=1) + eps), labels)
