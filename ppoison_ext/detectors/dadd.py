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

from ..checks import int_arg
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
    h, covs = h.to(torch.float64), covs.to(torch.float64)
    return _score(h, classes, _times_cov(h, classes, covs), means.to(torch.float64),
                  covs.diagonal(dim1=1, dim2=2).sum(1))


def _times_cov(h: Tensor, classes: Tensor, covs: Tensor) -> Tensor:
    """Each row h_i Σ_{c_i}, by one product per class present (each Σ_c read once). A BLAS may
    round a row differently with the number of rows beside it, so callers pass whole windows."""
    out = torch.empty_like(h)
    for c in classes.unique().tolist():
        rows = (classes == c).nonzero()[:, 0]
        out[rows] = h[rows] @ covs[c]
    return out


def _score(h: Tensor, classes: Tensor, hcov: Tensor, means: Tensor, traces: Tensor) -> float:
    """The window score from its features h, classes, rows h_i Σ_{c_i} and the references' traces:
    the classes' n_c × n_c products are batched, one eigvalsh per block size (a single query's
    block has Z = 0 and adds no eigenvalue)."""
    present, inverse, counts = classes.unique(sorted=True, return_inverse=True, return_counts=True)
    n = counts.to(torch.float64)

    def mean_of(rows: Tensor) -> Tensor:  # per class present
        sums = torch.zeros(len(n), rows.shape[1], dtype=torch.float64).index_add_(0, inverse, rows)
        return sums / n[:, None]

    m = mean_of(h)
    z, zcov = h - m[inverse], hcov - mean_of(hcov)[inverse]
    fd = ((means[present] - m) ** 2).sum(1) + traces[present]
    fd = fd + torch.zeros_like(n).index_add_(0, inverse, (z * z).sum(1)) / n
    order = inverse.argsort(stable=True)
    blocks, cov_blocks = z[order].split(counts.tolist()), zcov[order].split(counts.tolist())
    root = torch.zeros_like(n)
    for size in set(counts.tolist()) - {1}:
        which = (counts == size).nonzero()[:, 0].tolist()
        prods = torch.stack([cov_blocks[i] @ blocks[i].T for i in which]) / size  # Z Σ Zᵀ / n
        root[which] = torch.linalg.eigvalsh(prods).clamp(min=0).sqrt().sum(1)
    return float((n * (fd - 2 * root)).sum()) / h.shape[0]


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
        int_arg(window, "window")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or math.isnan(tau):
            raise ValueError(f"tau must be a number, got {tau!r}")
        self.means, self.covs = means.to(torch.float64), covs.to(torch.float64)
        self.traces = self.covs.diagonal(dim1=1, dim2=2).sum(1)
        self.tau, self.window = float(tau), window
        self.record_width = means.shape[1] + 1

    def records(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        return with_class(features, logits)

    def _piece(self, state: KeyState, records: Tensor) -> Tuple[List[float], List[bool]]:
        data = state.data
        if not data:
            data.update(buffer=[], windows=0, flagged_windows=0, own=False)
        h, classes = records[:, :-1].to(torch.float64), records[:, -1].long()
        scores, own = [], []
        for i in range(h.shape[0]):
            data["buffer"].append((h[i], classes[i]))
            score = math.nan
            if len(data["buffer"]) == self.window:
                hw, cw = (torch.stack(col) for col in zip(*data["buffer"]))
                data["buffer"] = []
                # Σ products per window: its bits never depend on how its queries were chunked
                score = _score(hw, cw, _times_cov(hw, cw, self.covs), self.means, self.traces)
                data["own"] = score > self.tau
                data["windows"] += 1
                data["flagged_windows"] += int(data["own"])
            scores.append(score)
            own.append(data["own"])
        return scores, own

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
