"""D-ADD (Mei et al., AAAI 2025) per key: a key's queries in tumbling windows of ``window``; a
window's score is the mean over its queries of the squared Fréchet distance between the Gaussian of
the victim's penultimate features of the window's queries of each victim class and that class's
reference Gaussian from the training split; a window scoring > τ flags the key.

Score of a window: Σ_c n_c·FD(μ_c, Σ_c; m_c, S_c) / Σ_c n_c over the classes c present (n_c
queries, m_c and S_c their feature mean and population covariance), with
FD = ‖μ − m‖² + tr Σ + tr S − 2 Σ √max(λ, 0), λ the eigenvalues of Z Σ Zᵀ / n (Z the centred
window block), which are those of Σ^½ S Σ^½ but cost O(n d² + n³), in float64.

Differs from the original: per-key windows across requests, and the decision applies from the key's
next request on (the original judges a batch, which is its window, before answering it); the
response is the server's ``on_detect``, not the original's i.i.d. N(0, 1) logits.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from ..models import last_linear
from .base import Detector, KeyState, victim_forward, with_class

__all__ = ["DADD", "frechet_distance", "window_score"]


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½ of two Gaussians, in float64."""
    mu1, sigma1, mu2, sigma2 = (t.to(torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    evals, evecs = torch.linalg.eigh(sigma1)
    root = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    lam = torch.linalg.eigvalsh(root @ sigma2 @ root).clamp(min=0)
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2 * lam.sqrt().sum())


def window_score(h: Tensor, classes: Tensor, means: Tensor, covs: Tensor) -> float:
    """The score of one window: features h [n, d] of victim classes [n], references means [K, d]
    and population covariances [K, d, d]."""
    total = 0.0
    for c in classes.unique(sorted=True).tolist():
        block = h[classes == c].to(torch.float64)
        n, m = block.shape[0], block.mean(0)
        z = block - m
        lam = torch.linalg.eigvalsh(z @ covs[c].to(torch.float64) @ z.T / n).clamp(min=0)
        fd = ((means[c].to(torch.float64) - m) ** 2).sum() + covs[c].to(torch.float64).trace()
        total += n * float(fd + (z * z).sum() / n - 2 * lam.sqrt().sum())
    return total / h.shape[0]


class DADD(Detector):
    """D-ADD with reference ``means`` [K, d] and population ``covs`` [K, d, d] of the victim's
    penultimate features per true class, threshold ``tau`` and ``window`` queries per window (16,
    the original's for MNIST). Records: the features and the class."""

    name = "dadd"

    def __init__(self, means: Tensor, covs: Tensor, *, tau: float, window: int = 16, latch: bool = True):
        super().__init__(latch=latch)
        if means.dim() != 2 or covs.shape != (means.shape[0], means.shape[1], means.shape[1]):
            raise ValueError(f"means must be [K, d] and covs [K, d, d], got {tuple(means.shape)} and "
                             f"{tuple(covs.shape)}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau):
            raise ValueError(f"tau must be a number, got {tau!r}")
        self.means, self.covs = means.to(torch.float64), covs.to(torch.float64)
        self.tau, self.window = float(tau), window
        self.record_width = means.shape[1] + 1

    def records(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        return with_class(features, logits)

    def _step(self, state: KeyState, record: Tensor) -> Tuple[float, bool]:
        data = state.data
        if not data:
            data.update(buffer=[], windows=0, flagged_windows=0, own=False)
        data["buffer"].append(record)
        if len(data["buffer"]) < self.window:
            return math.nan, data["own"]
        block = torch.stack(data["buffer"])
        data["buffer"] = []
        score = window_score(block[:, :-1], block[:, -1].long(), self.means, self.covs)
        data["own"] = score > self.tau
        data["windows"] += 1
        data["flagged_windows"] += int(data["own"])
        return score, data["own"]

    def config(self) -> Dict[str, Any]:
        return {"tau": self.tau, "window": self.window, **super().config()}

    def tensors(self) -> Dict[str, Tensor]:
        return {"means": self.means.float(), "covs": self.covs.float()}

    @classmethod
    def from_saved(cls, config: Dict[str, Any], tensors: Dict[str, Tensor], model: nn.Module) -> "DADD":
        return cls(tensors["means"], tensors["covs"], **config)

    @staticmethod
    def reference(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> Tuple[Tensor, Tensor]:
        """Per true class, the mean and population covariance of the victim's penultimate features
        over ``x`` (the victim's training split) with labels ``y``: ([K, d], [K, d, d])."""
        device, head = next(model.parameters()).device, last_linear(model)
        h = torch.cat([victim_forward(model, c.to(device), head)[1].double().cpu() for c in x.split(batch)])
        K = int(y.max()) + 1
        means = torch.stack([h[y == k].mean(0) for k in range(K)])
        covs = torch.stack([torch.cov(h[y == k].T, correction=0) for k in range(K)])
        return means, covs

    @classmethod
    def calibrate(cls, model: nn.Module, *, train_x: Tensor, train_y: Tensor, benign: List[Tensor],
                  fpr: float, window: int = 16, **_: Any) -> "DADD":
        """References from the training split; τ the (1 − ``fpr``) quantile of the scores of the
        ``benign`` accounts' windows (each account's queries in order, tumbling windows)."""
        means, covs = cls.reference(model, train_x, train_y)
        probe = cls(means, covs, tau=math.inf, window=window)
        scores = torch.cat([probe.run(model, x)[0] for x in benign])
        scores = scores[~scores.isnan()]
        if not scores.numel():
            raise ValueError(f"benign: no account has a full window of {window} queries")
        tau = float(torch.quantile(scores, 1.0 - fpr, interpolation="higher"))  # at most fpr above
        return cls(means, covs, tau=tau, window=window)
