"""Adaptive Misinformation (Kariyappa, Qureshi. "Defending Against Model Stealing Attacks
with Adaptive Misinformation", CVPR 2020, arXiv:1911.07100), with the constants of the two
re-implementations used as baselines by GRAD² (Mazeika et al., ICML 2022) and ModelGuard
(USENIX Security 2024)."""

from __future__ import annotations

import math
from typing import Dict, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Defense, DefenseOutput

__all__ = ["AdaptiveMisinformation", "AMComponents", "AM_VARIANTS", "am_mixing_weight"]

#: variant -> (ν, whether a separate OOD-score model may be given)
AM_VARIANTS: Mapping[str, Dict[str, object]] = {
    "admis": {"nu": 10000.0, "score_model": False},       # the original (AM:admis/utils/defense.py)
    "grad2": {"nu": 1000.0, "score_model": True},         # GRAD²'s baseline (method_adaptive_misinformation)
    "modelguard": {"nu": 1000.0, "score_model": False},   # ModelGuard's baseline (MG:am.py)
}


class AMComponents(NamedTuple):
    """Everything Adaptive Misinformation computes for a batch.

    y: the victim's posteriors [B, K]; y_hat: the misinformation model's softmax [B, K];
    score: the OOD score s (a max softmax probability) [B]; alpha: the weight of the
    misinformation [B]; y_prime: the released (1 − α)·y + α·ŷ [B, K].
    """

    y: Tensor
    y_hat: Tensor
    score: Tensor
    alpha: Tensor
    y_prime: Tensor


def am_mixing_weight(score: Tensor, tau: float, nu: float) -> Tensor:
    """α = 1 / (1 + exp(ν (s − τ))) = σ(ν (τ − s)), element-wise in ``score``'s dtype.

    Written with ``exp`` as the originals do, so that in float32 ``exp`` overflows to inf once
    ν (s − τ) > 88.72 and α is exactly 0 (never NaN); far below τ, α is exactly 1.
    """
    return 1.0 / (1.0 + torch.exp((score - tau) * nu))


def _real(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


class AdaptiveMisinformation(Defense):
    """Adaptive Misinformation: answer in-distribution queries with the victim's posteriors and
    out-of-distribution ones with a misinformation model's.

    Per batch: y = softmax(victim(x) / T); the OOD score s = max_k of the score posteriors (the
    victim's own y, an Outlier-Exposure-trained defender; or, variant ``grad2`` only, a
    separate ``score_model``'s softmax); ŷ = softmax(misinformation_model(x)); the weight
    α = 1 / (1 + exp(ν (s − τ))) (``adaptive=False``: α = τ for every query); released
    ỹ = (1 − α)·y + α·ŷ. One forward of each model, closed form otherwise; every row stays on
    the simplex. Queries with s well above τ get y, those well below get ŷ, s = τ gets the
    average.

    Variants (the constants of the three implementations, spec §5.6):

    * ``admis`` (default, the original): ν = 10000, score = the victim's max softmax.
    * ``grad2`` (GRAD²'s baseline): ν = 1000, score = the max softmax of ``score_model`` when
      given (there: a separate Outlier-Exposure model), else of the victim.
    * ``modelguard`` (ModelGuard's baseline): ν = 1000, score = the victim's max softmax.

    The victim should be trained with Outlier Exposure and the misinformation model with the
    loss −log(1 − p_y + 1e-7) (:func:`ppoison_ext.training.train_model_oe`,
    ``ppoison train-victim --outlier-exposure DATASET``).

    Args:
        model: the victim (the defender).
        misinformation_model: the model whose softmax ŷ is mixed in; same number of classes.
            Put in eval mode (the original served it in train mode: see docs/differences.md).
        tau: the threshold τ on the score (the original's ``defense_levels``; README 0.99).
            With ``adaptive=False`` the constant weight, in [0, 1].
        nu: the sigmoid's steepness ν ≥ 0; default the variant's (10000 or 1000).
        variant: ``admis``, ``grad2`` or ``modelguard``.
        score_model: ``grad2`` only: the model whose max softmax is the score (eval mode).
        adaptive: False is the original's ``--no_adaptive`` (α = τ).
        temperature: T > 0 of the victim's softmax (the original's ``-T``, default 1); y is
            both scored and released at this temperature.
        logger: optional :class:`~ppoison_ext.defenses.QueryLogger`.

    Shape:
        x: [B, ...] as the victim takes it; returns [B, K].

    Example:
        >>> am = AdaptiveMisinformation(victim, misinformation_model=misinfo, tau=0.99)
        >>> y_prime = am(x)
        >>> by_tau = am.release_levels(x, [0.5, 0.9, 0.99])   # {τ: [B, K]}, one forward each
    """

    def __init__(self, model: nn.Module, *, misinformation_model: nn.Module, tau: float,
                 nu: Optional[float] = None, variant: str = "admis", score_model: Optional[nn.Module] = None,
                 adaptive: bool = True, temperature: float = 1.0, logger=None):
        super().__init__(model, logger=logger)
        if not isinstance(variant, str) or variant not in AM_VARIANTS:
            raise ValueError(f"variant must be one of {list(AM_VARIANTS)}, got {variant!r}")
        if not isinstance(misinformation_model, nn.Module):
            raise TypeError(f"misinformation_model must be a torch.nn.Module, got "
                            f"{type(misinformation_model).__name__}")
        if score_model is not None:
            if not isinstance(score_model, nn.Module):
                raise TypeError(f"score_model must be a torch.nn.Module or None, got {type(score_model).__name__}")
            if not AM_VARIANTS[variant]["score_model"]:
                raise ValueError(f"score_model is for variant 'grad2'; variant {variant!r} scores with the "
                                 "victim's own max softmax")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {type(adaptive).__name__}")
        self.tau = _real(tau, "tau")
        if not adaptive and not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau is the constant mixing weight when adaptive=False and must be in [0, 1], "
                             f"got {self.tau}")
        self.nu = float(AM_VARIANTS[variant]["nu"]) if nu is None else _real(nu, "nu")
        if self.nu < 0:
            raise ValueError(f"nu must be >= 0, got {self.nu}")
        self.temperature = _real(temperature, "temperature")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.variant, self.adaptive = variant, adaptive
        self.misinformation_model = misinformation_model.eval()
        self.score_model = score_model.eval() if score_model is not None else None

    def hparams(self) -> dict:
        return {"tau": self.tau, "nu": self.nu, "variant": self.variant, "adaptive": self.adaptive,
                "temperature": self.temperature,
                "score": "victim" if self.score_model is None else type(self.score_model).__name__}

    def victim_probs(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            logits = self.model(x)
            return F.softmax(logits if self.temperature == 1.0 else logits / self.temperature, dim=1)

    def _forwards(self, x: Tensor, y: Tensor):
        y_hat = F.softmax(self.misinformation_model(x), dim=1).to(y.dtype)
        if y_hat.shape != y.shape:
            raise ValueError(f"the misinformation model returns {tuple(y_hat.shape)}, the victim "
                             f"{tuple(y.shape)}: they must have the same number of classes")
        if self.score_model is not None:
            score = F.softmax(self.score_model(x), dim=1).amax(dim=1).to(y.dtype)
            if score.shape[0] != y.shape[0]:
                raise ValueError(f"the score model returns {score.shape[0]} rows for {y.shape[0]} queries")
        else:
            score = y.amax(dim=1)
        return y_hat, score

    def mixing_weight(self, score: Tensor, tau: Optional[float] = None) -> Tensor:
        """α [B] for scores s [B] (at ``tau``, default this defense's τ)."""
        tau = self.tau if tau is None else _real(tau, "tau")
        if not self.adaptive:
            return torch.full_like(score, tau)
        return am_mixing_weight(score, tau, self.nu)

    @staticmethod
    def _mix(y: Tensor, y_hat: Tensor, alpha: Tensor) -> Tensor:
        # (1 − α)·y + α·ŷ in one op; lerp is exact at both ends (α = 0 gives y, α = 1 gives ŷ)
        return torch.lerp(y, y_hat, alpha.unsqueeze(1))

    def components(self, x: Tensor) -> AMComponents:
        """Runs the defense on a batch and returns every intermediate (no query counting)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        with torch.no_grad():
            y = self.victim_probs(x)
            y_hat, score = self._forwards(x, y)
            alpha = self.mixing_weight(score)
            return AMComponents(y, y_hat, score, alpha, self._mix(y, y_hat, alpha))

    def release_levels(self, x: Tensor, taus: Sequence[float]) -> Dict[float, Tensor]:
        """{τ: released [B, K]} for several thresholds from one forward of each model (the
        original's ``--defense_levels`` output). The batch is counted once and not logged."""
        if isinstance(taus, (int, float)) or not all(isinstance(t, (int, float)) for t in taus):
            raise TypeError("taus must be a sequence of real numbers")
        comps = self.components(x)
        with self._count_lock:
            self.call_count += comps.y.shape[0]
        return {float(t): self._mix(comps.y, comps.y_hat, self.mixing_weight(comps.score, t)) for t in taus}

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        y_hat, score = self._forwards(x, y)
        return DefenseOutput(self._mix(y, y_hat, self.mixing_weight(score)), y)
