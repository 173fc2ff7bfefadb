"""The output-perturbation baselines of Prediction Poisoning: reverse sigmoid and logit noise."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..checks import check_choices, real_arg
from .base import Defense, DefenseOutput, register

__all__ = ["ReverseSigmoid", "RandomNoise"]


def _logit(y: Tensor) -> Tensor:
    """The inverse sigmoid log(y / (1 − y)), element-wise (±inf at 0 and 1)."""
    return torch.log(y) - torch.log1p(-y)


@register("reverse_sigmoid", beta=float, gamma=float)
class ReverseSigmoid(Defense):
    """Reverse sigmoid (Lee et al., "Defending against NN model stealing attacks using
    deceptive perturbations", S&P Workshops 2019).

    ``r(y) = β (σ(γ·logit(y)) − ½)``, ``ŷ = y − r(y)``, released ``y′ = ŷ / Σŷ``, where
    σ(γ·logit(y)) = y^γ / (y^γ + (1 − y)^γ), β, γ ≥ 0. No clipping: for β > 1 or γ > 1 entries
    can turn negative. β = 1, γ = 1 releases the uniform distribution.
    """

    batch_independent = True
    hparam_names = ("beta", "gamma")

    def __init__(self, model: nn.Module, *, beta: float = 1.0, gamma: float = 1.0, logger=None):
        super().__init__(model, logger=logger)
        self.beta = real_arg(beta, "beta")
        self.gamma = real_arg(gamma, "gamma")

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        yd = y.double()
        num = yd.pow(self.gamma)
        sig = num / (num + (1.0 - yd).pow(self.gamma))
        yhat = yd - self.beta * (sig - 0.5)
        return DefenseOutput((yhat / yhat.sum(1, keepdim=True)).to(y.dtype), y)


@register("rand_noise", needs="epsilon_z", example="epsilon_z:0.5,dist_z:l1", epsilon_z=float, dist_z=str,
          strat=str, seed=int)
class RandomNoise(Defense):
    """Random noise in logit space (``rand_noise``).

    ``z = logit(y)``; δ ~ U[0, 1)^K · 2ε_z / K^{1/p} (``strat="uniform"``, so that
    ‖E δ‖_p = ε_z) or N(0, I) (``"gaussian"``); each δ row projected onto the ε_z-ball of
    ``dist_z`` (l1: Euclidean projection onto the L1 ball; l2: δ·ε_z / max(‖δ‖₂, ε_z));
    ``y′ = σ(z + δ) / Σ σ(z + δ)``. ε_z = 0 releases y unchanged. ``seed`` seeds this
    defense's generator on the victim's device (None: torch's global RNG).
    """

    reseedable = True
    hparam_names = ("epsilon_z", "dist_z", "strat", "seed")

    def __init__(self, model: nn.Module, *, epsilon_z: float, dist_z: str = "l1", strat: str = "uniform",
                 seed: Optional[int] = None, logger=None):
        super().__init__(model, logger=logger)
        self.epsilon_z = real_arg(epsilon_z, "epsilon_z")
        check_choices(dist_z=(dist_z, ("l1", "l2")), strat=(strat, ("uniform", "gaussian")))
        self.dist_z, self.strat = dist_z, strat
        self._init_seed(seed)

    @property
    def batch_independent(self) -> bool:
        return self.epsilon_z <= 0.0  # else each row's noise is the next draw of one stream

    keeps_top1 = batch_independent  # both hold exactly when no noise is added

    def noise(self, shape, dtype, device) -> Tensor:
        g = self._generator(device)
        B, K = shape
        if self.strat == "uniform":
            p = 1 if self.dist_z == "l1" else 2
            d = torch.rand(shape, generator=g, dtype=dtype, device=device) * (2 * self.epsilon_z / K ** (1.0 / p))
        else:
            d = torch.randn(shape, generator=g, dtype=dtype, device=device)
        if self.dist_z == "l1":
            return ops.project_l1_ball(d, self.epsilon_z)
        return d * (self.epsilon_z / d.norm(dim=1, keepdim=True).clamp(min=self.epsilon_z))

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        if self.epsilon_z <= 0.0:
            return DefenseOutput(y.clone(), y)
        s = torch.sigmoid(_logit(y) + self.noise(y.shape, y.dtype, y.device))
        return DefenseOutput(s / s.sum(1, keepdim=True), y)
