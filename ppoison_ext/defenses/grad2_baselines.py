"""GRAD²'s baselines as GR's code (``mmazeika/model-stealing-defenses``) computes them, quirks
included: its MAD (``method_orekondy``), reverse sigmoid (``method_reverse_sigmoid``) and random
perturbation (``method_rand_perturbation``). For comparisons against GRAD²'s published tables;
the reference-system versions are :class:`~ppoison_ext.defenses.MAD`,
:class:`~ppoison_ext.defenses.ReverseSigmoid` and :class:`~ppoison_ext.defenses.RandomNoise`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Defense, DefenseOutput, optional_str, real_arg, register
from .grad2 import surrogate_arg

__all__ = ["MADGR", "ReverseSigmoidGR", "RandomGR", "mad_gr_target", "rand_gr_mix"]

_RS_LOW = 1e-12
_RS_HIGH = 1.0  # GR's 1 − 1e-12, rounded to float32


def mad_gr_target(p: Tensor, q: Tensor) -> Tensor:
    """GR-MAD's target class k* [B] in closed form: argmax_k 1 − cos(e_k − q, p − q), ties to
    the **last** index (GR's ``≥`` scan). A zero p − q has cosine 0 everywhere (GR: NaN, then a
    crash), so it picks the last class.

    Equal to GR's brute force over the fc gradients: on a last Linear layer (with or without
    bias) Gᵀe_k = (e_k − q) ⊗ [h; 1] and Gᵀp = (p − q) ⊗ [h; 1], and ‖h‖² + 1 cancels.
    """
    pd, qd = p.double(), q.double()
    K = p.shape[1]
    a = torch.eye(K, dtype=torch.float64, device=p.device)[None] - qd[:, None, :]  # [B, K, K]: e_k − q
    b = pd - qd
    den = a.norm(dim=2) * b.norm(dim=1, keepdim=True)
    cos = torch.where(den > 0, (a * b[:, None, :]).sum(2) / den.clamp(min=1e-300), torch.zeros_like(den))
    obj = 1.0 - cos
    return K - 1 - obj.flip(1).argmax(1)  # the last maximum


@register("mad_gr", needs="epsilon", epsilon=float, model_adv_proxy=optional_str)
class MADGR(Defense):
    """GR's "MAD" baseline (``method_orekondy``), in closed form: one surrogate forward.

    ``k* = argmax_k 1 − cos(e_k − q, p − q)`` (q = softmax of the surrogate, ties to the last
    index), ``α = ε / ‖p − e_k*‖₁`` **unclamped**, ``ỹ = (1 − α) p + α e_k*``: ‖ỹ − p‖₁ = ε
    exactly, and for p_k* > 1 − ε/2 (α > 1) ỹ leaves the simplex (negative entries), as in GR.
    p = e_k* exactly (GR: division by zero) releases p. No line search, no argmax preservation.

    Args:
        model: the victim.
        epsilon: the L1 budget ε ≥ 0.
        surrogate: GR uses the randomly initialised (0-epoch) surrogate; only its softmax is used.
    """

    def __init__(self, model: nn.Module, *, epsilon: float, surrogate: nn.Module, logger=None):
        super().__init__(model, logger=logger)
        if not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be a torch.nn.Module, got {type(surrogate).__name__}")
        self.epsilon = real_arg(epsilon, "epsilon")
        self.surrogate = surrogate.eval()

    @classmethod
    def from_args(cls, name, model, args, *, proxy=None, logger=None, device=None, **_):
        return cls(model, surrogate=surrogate_arg(name, model, args, proxy, device), logger=logger, **args)

    def hparams(self) -> dict:
        return {"epsilon": self.epsilon}

    batch_independent = True

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        q = F.softmax(self.surrogate(x), dim=1).to(device=y.device)
        k = mad_gr_target(y, q)
        onehot = F.one_hot(k, y.shape[1]).double()
        yd = y.double()
        dist = (yd - onehot).abs().sum(1, keepdim=True)
        alpha = torch.where(dist > 0, self.epsilon / dist.clamp(min=1e-300), torch.zeros_like(dist))
        return DefenseOutput(((1.0 - alpha) * yd + alpha * onehot).to(y.dtype), y)


@register("reverse_sigmoid_gr", needs="beta", beta=float, gamma=float)
class ReverseSigmoidGR(Defense):
    """GR's reverse sigmoid (``method_reverse_sigmoid``), with its clamp on the odds.

    ``ℓ = log(clamp(p / (1 − p), 1e-12, 1))``, ``r = β (σ(γ ℓ) − ½)``, ``ỹ = (p − r) / Σ(p − r)``.
    GR's upper bound 1 − 1e-12 is 1.0 in float32, so classes with p ≥ 0.5 get r = 0: only the
    low classes are raised (not Lee et al.'s formula, see :class:`ReverseSigmoid`). Always a
    distribution. Computed in the posteriors' dtype (GR: float32) with that bound of 1.0.

    Args:
        model: the victim.
        beta: β ≥ 0 (GR passes it as ``epsilons``).
        gamma: γ ≥ 0; GR's default 0.1 (its experiments: 0.1 for CIFAR-10, 0.2 otherwise).
    """

    def __init__(self, model: nn.Module, *, beta: float, gamma: float = 0.1, logger=None):
        super().__init__(model, logger=logger)
        self.beta = real_arg(beta, "beta")
        self.gamma = real_arg(gamma, "gamma")

    def hparams(self) -> dict:
        return {"beta": self.beta, "gamma": self.gamma}

    batch_independent = True

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        ell = torch.log((y / (1.0 - y)).clamp(_RS_LOW, _RS_HIGH))
        r = self.beta * (torch.sigmoid(self.gamma * ell) - 0.5)
        out = y - r
        return DefenseOutput(out / out.sum(1, keepdim=True), y)


def rand_gr_mix(y: Tensor, u: Tensor, epsilon: float) -> Tensor:
    """GR's random perturbation for drawn classes u [B]: ``(ε/2) e_u + (1 − ε/2) y``
    (L1 distance ε (1 − y_u))."""
    onehot = F.one_hot(u.to(torch.long), y.shape[1]).to(y.dtype)
    return (epsilon / 2) * onehot + (1.0 - epsilon / 2) * y


@register("rand_gr", needs="epsilon", epsilon=float, seed=int)
class RandomGR(Defense):
    """GR's random baseline (``method_rand_perturbation``): per query one class u drawn
    uniformly among the K − 1 classes other than argmax y (first max), ``ỹ = (ε/2) e_u +
    (1 − ε/2) y``. On the simplex for ε ≤ 2 (larger ε is refused).

    Args:
        model: the victim.
        epsilon: 0 ≤ ε ≤ 2.
        seed: seeds this defense's generator (CPU draws); None: torch's global RNG (GR: numpy's,
            unseeded).
    """

    def __init__(self, model: nn.Module, *, epsilon: float, seed: Optional[int] = None, logger=None):
        super().__init__(model, logger=logger)
        self.epsilon = real_arg(epsilon, "epsilon", high=2.0)
        self._init_seed(seed)

    def hparams(self) -> dict:
        return {"epsilon": self.epsilon, "seed": self.seed}

    @property
    def batch_independent(self) -> bool:
        return self.epsilon == 0.0  # else each row's class is the next draw of one stream

    @property
    def keeps_top1(self) -> bool:
        return self.epsilon == 0.0

    reseedable = True

    def draw(self, y: Tensor) -> Tensor:
        """The drawn classes u [B], never argmax y."""
        B, K = y.shape
        off = torch.randint(K - 1, (B,), generator=self._generator()).to(y.device)
        return (y.argmax(1) + 1 + off) % K

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        return DefenseOutput(rand_gr_mix(y, self.draw(y), self.epsilon), y)
