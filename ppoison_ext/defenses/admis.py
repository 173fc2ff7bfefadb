"""Adaptive Misinformation (Kariyappa, Qureshi. "Defending Against Model Stealing Attacks
with Adaptive Misinformation", CVPR 2020, arXiv:1911.07100), with the constants of the two
re-implementations used as baselines by GRAD² (Mazeika et al., ICML 2022) and ModelGuard
(USENIX Security 2024)."""

from __future__ import annotations

from typing import Dict, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_bools, check_choices, real_arg, type_arg
from ..checkpoint import CHECKPOINT_NAMES
from .base import Defense, DefenseOutput, boolean, load_model_arg, optional_str, register

__all__ = ["AdaptiveMisinformation", "AMComponents", "AM_VARIANTS", "am_mixing_weight"]

#: variant -> (ν, whether a separate OOD-score model may be given)
AM_VARIANTS: Mapping[str, Dict[str, object]] = {
    "admis": {"nu": 10000.0, "score_model": False},
    "grad2": {"nu": 1000.0, "score_model": True},
    "modelguard": {"nu": 1000.0, "score_model": False},
}


class AMComponents(NamedTuple):
    """Everything Adaptive Misinformation computes for a batch: y, ŷ (``y_hat``) and the
    released y_prime [B, K]; the OOD score s (a max softmax probability) and α [B]."""

    y: Tensor
    y_hat: Tensor
    score: Tensor
    alpha: Tensor
    y_prime: Tensor


def am_mixing_weight(score: Tensor, tau: float, nu: float) -> Tensor:
    """α = 1 / (1 + exp(ν (s − τ))) = σ(ν (τ − s)), element-wise in ``score``'s dtype.

    In float32 ``exp`` overflows to inf once ν (s − τ) > 88.72, so α is exactly 0 (never NaN);
    far below τ, α is exactly 1.
    """
    return 1.0 / (1.0 + torch.exp((score - tau) * nu))


@register("am", needs="tau", example="tau:0.99,model_misinfo:DIR", tau=float, nu=float, variant=str,
          adaptive=boolean, temperature=float, model_misinfo=optional_str, model_score=optional_str)
class AdaptiveMisinformation(Defense):
    """Adaptive Misinformation: answer in-distribution queries with the victim's posteriors and
    out-of-distribution ones with a misinformation model's.

    Per batch: y = softmax(victim(x) / T) (scored and released at that temperature); the OOD
    score s = max_k of the victim's y, or of the ``score_model``'s softmax (variant ``grad2``
    only); ŷ = softmax(misinformation_model(x)) (same classes, eval mode); α =
    :func:`am_mixing_weight` (``adaptive=False``: α = τ, in [0, 1]); released ỹ = (1 − α)·y +
    α·ŷ, on the simplex. ``nu`` defaults to the variant's: ``admis`` (the paper's code) 10000,
    ``grad2`` and ``modelguard`` (those papers' baselines) 1000. The victim should be trained
    with Outlier Exposure and the misinformation model with the loss −log(1 − p_y + 1e-7)
    (``ppoison train-victim --outlier-exposure DATASET``).

    Example:
        >>> am = AdaptiveMisinformation(victim, misinformation_model=misinfo, tau=0.99)
        >>> by_tau = am.release_levels(x, [0.5, 0.9, 0.99])   # {τ: [B, K]}, one forward each
    """

    batch_independent = True

    def __init__(self, model: nn.Module, *, misinformation_model: nn.Module, tau: float,
                 nu: Optional[float] = None, variant: str = "admis", score_model: Optional[nn.Module] = None,
                 adaptive: bool = True, temperature: float = 1.0, logger=None):
        super().__init__(model, logger=logger)
        check_choices(variant=(variant, AM_VARIANTS))
        if not isinstance(misinformation_model, nn.Module):
            raise TypeError(f"misinformation_model must be a torch.nn.Module, got "
                            f"{type(misinformation_model).__name__}")
        if score_model is not None:
            if not isinstance(score_model, nn.Module):
                raise TypeError(f"score_model must be a torch.nn.Module or None, got {type(score_model).__name__}")
            if not AM_VARIANTS[variant]["score_model"]:
                raise ValueError(f"score_model is for variant 'grad2'; variant {variant!r} scores with the "
                                 "victim's own max softmax")
        check_bools(adaptive=adaptive)
        self.tau = real_arg(tau, "tau", low=None)
        if not adaptive and not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau is the constant mixing weight when adaptive=False and must be in [0, 1], "
                             f"got {self.tau}")
        self.nu = float(AM_VARIANTS[variant]["nu"]) if nu is None else real_arg(nu, "nu")
        self.temperature = real_arg(temperature, "temperature", low=None)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.variant, self.adaptive = variant, adaptive
        self.misinformation_model = misinformation_model.eval()
        self.score_model = score_model.eval() if score_model is not None else None

    @classmethod
    def from_args(cls, name, model, args, *, logger=None, device=None, **_):
        """``model_misinfo:DIR`` (required: the misinformation model's folder, e.g.
        ``<victim>/misinformation`` as ``train-victim --outlier-exposure`` writes it) and, variant
        ``grad2`` only, ``model_score:DIR`` (the OOD-score model's folder); both in eval mode."""
        device = device or next(model.parameters()).device
        paths = {key: args.pop(key, None) for key in ("model_misinfo", "model_score")}
        folders = {key: load_model_arg(path, key, device, CHECKPOINT_NAMES) for key, path in paths.items()
                   if path is not None}
        if "model_misinfo" not in folders:
            raise ValueError("defense am needs model_misinfo:DIR, the misinformation model's folder")
        return cls(model, misinformation_model=folders["model_misinfo"],
                   score_model=folders.get("model_score"), logger=logger, **args)

    def hparams(self) -> dict:
        return {"tau": self.tau, "nu": self.nu, "variant": self.variant, "adaptive": self.adaptive,
                "temperature": self.temperature,
                "score": "victim" if self.score_model is None else type(self.score_model).__name__}

    def victim_probs(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return F.softmax(self.model(x) / self.temperature, dim=1)

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
        tau = self.tau if tau is None else real_arg(tau, "tau", low=None)
        if not self.adaptive:
            return torch.full_like(score, tau)
        return am_mixing_weight(score, tau, self.nu)

    @staticmethod
    def _mix(y: Tensor, y_hat: Tensor, alpha: Tensor) -> Tensor:
        # lerp is exact at both ends: α = 0 gives y, α = 1 gives ŷ
        return torch.lerp(y, y_hat, alpha.unsqueeze(1))

    def components(self, x: Tensor) -> AMComponents:
        """Runs the defense on a batch and returns every intermediate (no query counting)."""
        type_arg(x, "x", Tensor, "a torch.Tensor")
        with torch.no_grad():
            y = self.victim_probs(x)
            y_hat, score = self._forwards(x, y)
            alpha = self.mixing_weight(score)
            return AMComponents(y, y_hat, score, alpha, self._mix(y, y_hat, alpha))

    def release_levels(self, x: Tensor, taus: Sequence[float]) -> Dict[float, Tensor]:
        """{τ: released [B, K]} for several thresholds from one forward of each model. The
        batch is counted once and not logged."""
        if isinstance(taus, (int, float)) or not all(isinstance(t, (int, float)) for t in taus):
            raise TypeError("taus must be a sequence of real numbers")
        comps = self.components(x)
        self._count(comps.y.shape[0])
        return {float(t): self._mix(comps.y, comps.y_hat, self.mixing_weight(comps.score, t)) for t in taus}

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        y_hat, score = self._forwards(x, y)
        return DefenseOutput(self._mix(y, y_hat, self.mixing_weight(score)), y)
