"""The baselines of GRAD²'s experiments ("GR": ``mmazeika/model-stealing-defenses``), quirks
included, for comparisons against GRAD²'s published tables: its MAD, reverse sigmoid and random
perturbation (differences.md: GRAD²). Prediction Poisoning's versions are
:class:`~ppoison_ext.defenses.MAD`, :class:`~ppoison_ext.defenses.ReverseSigmoid` and
:class:`~ppoison_ext.defenses.RandomNoise`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import real_arg, type_arg
from .base import Defense, DefenseOutput, optional_str, register
from .grad2 import from_surrogate_args

__all__ = ["MADGR", "ReverseSigmoidGR", "RandomGR", "mad_gr_target", "rand_gr_mix"]

_RS_LOW = 1e-12
_RS_HIGH = 1.0  # 1 − 1e-12 rounded to float32


def mad_gr_target(p: Tensor, q: Tensor) -> Tensor:
    """GR-MAD's target class k* [B]: argmax_k 1 − cos(e_k − q, p − q), ties to the **last**
    index; a zero p − q has cosine 0 everywhere, so it picks the last class.

    This is the angle between fc gradients in closed form: on a last Linear layer
    Gᵀe_k = (e_k − q) ⊗ [h; 1] and Gᵀp = (p − q) ⊗ [h; 1], and ‖h‖² + 1 cancels.
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
    """GR's "MAD" baseline in closed form: one surrogate forward (only its softmax q is used).

    ``k* =`` :func:`mad_gr_target`, ``α = ε / ‖p − e_k*‖₁`` **unclamped**,
    ``ỹ = (1 − α) p + α e_k*``: ‖ỹ − p‖₁ = ε exactly, and for p_k* > 1 − ε/2 (α > 1) ỹ leaves
    the simplex. p = e_k* releases p. No line search, no argmax preservation.
    """

    hparam_names = ("epsilon",)
    batch_independent = True

    def __init__(self, model: nn.Module, *, epsilon: float, surrogate: nn.Module, logger=None):
        super().__init__(model, logger=logger)
        type_arg(surrogate, "surrogate", nn.Module, "a torch.nn.Module")
        self.epsilon = real_arg(epsilon, "epsilon")
        self.surrogate = surrogate.eval()

    from_args = classmethod(from_surrogate_args)

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        q = F.softmax(self.surrogate(x), dim=1).to(device=y.device)
        k = mad_gr_target(y, q)
        onehot = F.one_hot(k, y.shape[1]).double()
        yd = y.double()
        dist = (yd - onehot).abs().sum(1, keepdim=True)
        w, d = torch.where(dist > 0, dist, torch.ones_like(dist)), onehot - yd  # ỹ = p + α d, α = ε/w
        alpha = w.new_tensor(self.epsilon) / w  # (float / tensor is ε·(1/w): NaN for ε = 0, w subnormal)
        move = torch.where(dist >= self.epsilon, alpha * d, self.epsilon * (d / w))  # α > 1: α may overflow
        return DefenseOutput((yd + move).to(y.dtype), y)  # (1 − α)p + α e would cancel at α ≫ 1


@register("reverse_sigmoid_gr", needs="beta", beta=float, gamma=float)
class ReverseSigmoidGR(Defense):
    """GR's reverse sigmoid, with a clamp on the odds.

    ``ℓ = log(clamp(p / (1 − p), 1e-12, 1))``, ``r = β (σ(γ ℓ) − ½)``, ``ỹ = (p − r) / Σ(p − r)``,
    in the posteriors' dtype. Classes with p ≥ 0.5 get r = 0: only the low classes are raised
    (not Lee et al.'s formula, see :class:`ReverseSigmoid`). γ: 0.1 for CIFAR-10 in GRAD²'s
    experiments, 0.2 otherwise.
    """

    hparam_names = ("beta", "gamma")
    batch_independent = True

    def __init__(self, model: nn.Module, *, beta: float, gamma: float = 0.1, logger=None):
        super().__init__(model, logger=logger)
        self.beta = real_arg(beta, "beta")
        self.gamma = real_arg(gamma, "gamma")

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        ell = torch.log((y / (1.0 - y)).clamp(_RS_LOW, _RS_HIGH))
        r = self.beta * (torch.sigmoid(self.gamma * ell) - 0.5)
        out = y - r
        return DefenseOutput(out / out.sum(1, keepdim=True), y)


def rand_gr_mix(y: Tensor, u: Tensor, epsilon: float) -> Tensor:
    """The random perturbation for drawn classes u [B]: ``(ε/2) e_u + (1 − ε/2) y``
    (L1 distance ε (1 − y_u))."""
    onehot = F.one_hot(u.to(torch.long), y.shape[1]).to(y.dtype)
    return (epsilon / 2) * onehot + (1.0 - epsilon / 2) * y


@register("rand_gr", needs="epsilon", epsilon=float, seed=int)
class RandomGR(Defense):
    """GR's random baseline: per query one class u drawn uniformly among the K − 1 classes
    other than argmax y (first max), ``ỹ = (ε/2) e_u + (1 − ε/2) y``; on the simplex for
    0 ≤ ε ≤ 2. ``seed`` seeds the (CPU) draws; None: torch's global RNG.
    """

    hparam_names = ("epsilon", "seed")
    reseedable = True

    def __init__(self, model: nn.Module, *, epsilon: float, seed: Optional[int] = None, logger=None):
        super().__init__(model, logger=logger)
        self.epsilon = real_arg(epsilon, "epsilon", high=2.0)
        self._init_seed(seed)

    @property
    def batch_independent(self) -> bool:
        return self.epsilon == 0.0  # else each row's class is the next draw of one stream

    keeps_top1 = batch_independent  # both hold exactly when no noise is added

    def draw(self, y: Tensor) -> Tensor:
        """The drawn classes u [B], never argmax y."""
        B, K = y.shape
        if K < 2:
            raise ValueError(f"rand_gr draws a class other than the top-1: needs K >= 2 classes, got K = {K}")
        off = torch.randint(K - 1, (B,), generator=self._generator()).to(y.device)
        return (y.argmax(1) + 1 + off) % K

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        return DefenseOutput(rand_gr_mix(y, self.draw(y), self.epsilon), y)
