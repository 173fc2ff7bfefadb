"""GRAD²: gradient redirection (Mazeika, Li, Forsyth. "How to Steer Your Adversary: Targeted
and Efficient Model Stealing Defenses with Gradient Redirection", ICML 2022, arXiv:2206.14157).

The defender holds a surrogate of the attacker's model and releases, per query, the posterior
ỹ within L1 distance ε of the victim's y that moves the surrogate's training gradient Gᵀỹ
furthest along a target direction a (maximise ⟨Gᵀỹ, a⟩, i.e. minimise ⟨Gᵀỹ, t⟩ with t = −a).
The objective is linear in ỹ, with coefficients

    c_nj = (1/B) [v_nj − q_nᵀ v_n],   v_n = J_n t,  J_n = ∂z_n/∂θ,

z_n the surrogate's logits, q_n = softmax(z_n); ``v`` is one forward-mode JVP over the batch.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_bools, check_choices, real_arg, type_arg
from .. import ops
from .base import Defense, DefenseOutput, boolean, optional_str, proxy_arg, register
from .proxy import ProxyView

__all__ = ["GRAD2", "TARGETS", "watermark_target", "flatten_params"]

TARGETS = ("all_ones", "min_ip", "max_norm")
_JVP_CHUNK = 1 << 25  # elements of per-sample parameter-sized tensors per vmap chunk (min_ip, batch_independent)


def flatten_params(module: nn.Module) -> Tensor:
    """The module's parameters flattened and concatenated in ``named_parameters()`` order [P]:
    the layout of a user target."""
    return torch.cat([p.detach().reshape(-1) for _, p in module.named_parameters()])


def watermark_target(surrogate: nn.Module, x_w: Tensor, y_w: Tensor) -> Tensor:
    """The WATERMARK target a [P] for watermark inputs x_w [N, ...] with (one-hot) labels
    y_w [N, K]: ∇_θ mean_n Σ_k y_w,nk log softmax(surrogate(x_w))_nk, in ``named_parameters()``
    order."""
    params = [p for _, p in surrogate.named_parameters()]
    with torch.enable_grad():
        logits = surrogate(x_w)
        loss = (y_w * F.log_softmax(logits, dim=1)).sum(1).mean(0)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def from_surrogate_args(cls, name, model, args, *, proxy=None, logger=None, device=None, **_):
    """``from_args`` of the defenses built on a surrogate: ``proxy=`` or ``model_adv_proxy:DIR``."""
    proxy = proxy_arg(args, proxy, model, device, "surrogate")
    if proxy is None:
        raise ValueError(f"defense {name} needs a surrogate: model_adv_proxy:DIR in defense_args, or proxy=")
    return cls(model, surrogate=proxy, logger=logger, **args)


@register("grad2", needs="epsilon", example="epsilon:0.5,target:all_ones", epsilon=float, target=str,
          jacobian=str, seed=int, batch_independent=boolean, model_adv_proxy=optional_str)
class GRAD2(Defense):
    """GRAD², batched.

    Per batch: one victim forward (y), the surrogate's coefficients c [B, K] by one JVP along
    the target (``min_ip``: one backward pass for the target first), then
    :func:`ppoison_ext.ops.grad2_allocate`. ε = 0 releases y (zeros floored at 1e-15) and runs
    no surrogate; :meth:`perturb_budgets` takes several budgets.

    ``surrogate``: the defender's model of the attacker (put in eval mode, never changed), or
    several, one drawn per batch from this defense's ``seed``. ``target``, the direction a:
    ``all_ones`` (a = 1), ``max_norm`` (a = θ, the surrogate's parameters), ``min_ip`` (t =
    the batch-mean log-likelihood gradient at y: **couples the batch** unless
    ``batch_independent``), or a tensor a [P] in :func:`flatten_params`'s layout (e.g.
    :func:`watermark_target`; with ``jacobian="fc"`` it may hold the last Linear layer's
    parameters only, weight row-major then bias). ``jacobian="fc"`` uses the closed forms on
    the last Linear layer (v_n = T_W h_n + t_b; ``min_ip``: v_n = (1/B) Σ_i (h_iᵀh_n + 1)(y_i −
    q_i)); it is refused for ``all_ones``, whose last-layer coefficients are zero.
    ``batch_independent``: ``min_ip`` with each sample's own gradient, and one surrogate draw
    per sample.
    """

    def __init__(self, model: nn.Module, *, epsilon: float, surrogate: Union[nn.Module, Sequence[nn.Module]],
                 target: Union[str, Tensor] = "all_ones", jacobian: str = "full", seed: Optional[int] = None,
                 batch_independent: bool = False, logger=None):
        super().__init__(model, logger=logger)
        epsilon = real_arg(epsilon, "epsilon")
        surrogates = [surrogate] if isinstance(surrogate, nn.Module) else surrogate
        if not isinstance(surrogates, (list, tuple)) or not surrogates:
            raise TypeError(f"surrogate must be a torch.nn.Module or a non-empty sequence of them, got "
                            f"{type(surrogate).__name__}")
        for i, s in enumerate(surrogates):
            type_arg(s, f"surrogate[{i}]", nn.Module, "a torch.nn.Module")
        check_choices(jacobian=(jacobian, ("full", "fc")))
        check_bools(batch_independent=batch_independent)
        if isinstance(target, str):
            if target not in TARGETS:
                raise ValueError(f"target must be one of {list(TARGETS)} or a tensor, got {target!r}")
            if target == "all_ones" and jacobian == "fc":
                raise ValueError("target='all_ones' with jacobian='fc' is refused: on the last layer its "
                                 "coefficients are identically zero (the fc block of every log-softmax gradient "
                                 "sums to zero), so the allocation would be ordered by rounding noise; use "
                                 "jacobian='full'")
        elif isinstance(target, Tensor):
            if not torch.is_floating_point(target):
                raise TypeError(f"target tensor must be floating point, got {target.dtype}")
            if target.dim() != 1:
                raise ValueError(f"target tensor must be 1-D [P], got shape {tuple(target.shape)}")
            if not bool(torch.isfinite(target).all()):
                raise ValueError("target tensor contains NaN or Inf values")
        else:
            raise TypeError(f"target must be a str ({list(TARGETS)}) or a tensor, got {type(target).__name__}")
        self.epsilon = epsilon
        self.surrogates = nn.ModuleList([s.eval() for s in surrogates])
        self._views: List[Optional[ProxyView]] = [None] * len(surrogates)
        self.jacobian, self.per_sample = jacobian, batch_independent
        self._init_seed(seed)
        self.target_name = target if isinstance(target, str) else "tensor"
        self._target = None if isinstance(target, str) else target.detach()
        if self._target is not None:
            for i, s in enumerate(surrogates):
                self._check_target_size(s, i)
        self._func_lock = threading.Lock()

    from_args = classmethod(from_surrogate_args)

    @property
    def batch_independent(self) -> bool:
        """``min_ip`` couples the batch unless ``batch_independent``; several surrogates are
        drawn from one stream."""
        return len(self.surrogates) == 1 and (self.per_sample or self.target_name != "min_ip")

    @property
    def reseedable(self) -> bool:
        return len(self.surrogates) > 1

    def hparams(self) -> dict:
        return {"epsilon": self.epsilon, "target": self.target_name, "jacobian": self.jacobian,
                "batch_independent": self.per_sample, "surrogates": len(self.surrogates), "seed": self.seed}

    def _check_target_size(self, s: nn.Module, i: int) -> None:
        P = sum(p.numel() for _, p in s.named_parameters())
        sizes = [P]
        if self.jacobian == "fc":
            linears = [m for m in s.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise ValueError(f"jacobian='fc' needs a surrogate with an nn.Linear last layer; "
                                 f"{type(s).__name__} has none")
            sizes.append(sum(p.numel() for p in linears[-1].parameters()))
        if self._target.numel() not in sizes:
            raise ValueError(f"target tensor has {self._target.numel()} entries but surrogate[{i}] has {P} "
                             "parameters (named_parameters() order)"
                             + (f" and its last Linear layer {sizes[1]}" if len(sizes) > 1 else ""))

    def _tangent(self, s: nn.Module, params: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """t = −a over every parameter, for the fixed targets."""
        if self.target_name == "all_ones":
            return {n: -torch.ones_like(p) for n, p in params.items()}
        if self.target_name == "max_norm":
            return {n: -p for n, p in params.items()}
        flat = -self._target.to(device=next(iter(params.values())).device)
        pieces = flat.split([p.numel() for p in params.values()])
        return {n: piece.reshape(p.shape).to(p.dtype) for (n, p), piece in zip(params.items(), pieces)}

    def _draw(self, n: int) -> Tensor:
        return torch.randint(len(self.surrogates), (n,), generator=self._generator())

    def coefficients(self, x: Tensor, y: Tensor, surrogate: int = 0) -> Tensor:
        """The coefficients c = ∂Φ/∂ỹ [B, K] of one surrogate for the batch (x, y), scaled by
        1/B (by 1 with ``batch_independent`` ``min_ip``)."""
        s = self.surrogates[surrogate]
        if self.jacobian == "fc":
            return self._coefficients_fc(s, surrogate, x, y)
        from torch.func import functional_call, jvp, vjp, vmap

        params = {n: p.detach() for n, p in s.named_parameters()}
        B = x.shape[0]
        with self._func_lock, torch.enable_grad():  # functional_call swaps parameters in place
            if self.target_name == "min_ip" and self.per_sample:
                def one(xn, yn):
                    f1 = lambda prm: functional_call(s, prm, (xn.unsqueeze(0),))[0]  # noqa: E731
                    z, pull = vjp(f1, params)
                    q = F.softmax(z, dim=0)
                    t = pull(yn.to(z.dtype) - q * yn.sum().to(z.dtype))[0]
                    _, v = jvp(f1, (params,), (t,))
                    return z, v

                P = sum(p.numel() for p in params.values())
                z, v = vmap(one, chunk_size=max(1, _JVP_CHUNK // max(1, P)))(x, y)
                scale = 1.0
            else:
                f = lambda prm: functional_call(s, prm, (x,))  # noqa: E731
                if self.target_name == "min_ip":
                    z, pull = vjp(f, params)
                    q = F.softmax(z, dim=1)
                    yz = y.to(z.dtype)
                    t = pull((yz - q * yz.sum(1, keepdim=True)) / B)[0]
                    _, v = jvp(f, (params,), (t,))
                else:
                    z, v = jvp(f, (params,), (self._tangent(s, params),))
                scale = 1.0 / B
        z, v = z.detach(), v.detach()
        q = F.softmax(z, dim=1)
        return scale * (v - (q * v).sum(1, keepdim=True))

    def _coefficients_fc(self, s: nn.Module, i: int, x: Tensor, y: Tensor) -> Tensor:
        if self._views[i] is None:
            self._views[i] = ProxyView(s)
        view = self._views[i]
        logits, h = view.forward_with_features(x)
        head = view.head()
        q = F.softmax(logits, dim=1)
        B = x.shape[0]
        has_bias = head.bias is not None
        if self.target_name == "min_ip":
            r = y.to(q.dtype) - q * y.to(q.dtype).sum(1, keepdim=True)  # ∂(Σ y log q)/∂z
            if self.per_sample:
                v = ((h * h).sum(1, keepdim=True) + (1.0 if has_bias else 0.0)) * r
                scale = 1.0
            else:
                T_W = r.t() @ h / B
                v = h @ T_W.t() + (r.sum(0) / B if has_bias else 0.0)
                scale = 1.0 / B
        else:
            if self.target_name == "max_norm":
                T_W, t_b = -head.weight, (-head.bias if has_bias else None)
            else:
                flat = self._target.to(device=h.device, dtype=h.dtype)
                n_fc = head.weight.numel() + (head.bias.numel() if has_bias else 0)
                if flat.numel() != n_fc:  # a full-network target: its last-layer slice
                    sizes = [(n, p.numel()) for n, p in s.named_parameters()]
                    names = [n for n, _ in sizes]
                    start = sum(k for _, k in sizes[:names.index(f"{view.head_name}.weight")])
                    flat = flat[start:start + n_fc]
                flat = -flat
                nw = head.weight.numel()
                T_W = flat[:nw].reshape(head.weight.shape)
                t_b = flat[nw:] if has_bias else None
            v = h @ T_W.detach().t()
            if t_b is not None:
                v = v + t_b.detach()
            scale = 1.0 / B
        return scale * (v - (q * v).sum(1, keepdim=True))

    def _all_coefficients(self, x: Tensor, y: Tensor) -> Tensor:
        if len(self.surrogates) == 1:
            return self.coefficients(x, y, 0).to(device=y.device, dtype=y.dtype)
        if not self.per_sample:
            return self.coefficients(x, y, int(self._draw(1))).to(device=y.device, dtype=y.dtype)
        pick = self._draw(x.shape[0]).to(y.device)
        c = torch.empty_like(y)
        for i in pick.unique().tolist():
            idx = (pick == i).nonzero().squeeze(1)
            c[idx] = self.coefficients(x[idx], y[idx], i).to(device=y.device, dtype=y.dtype)
        return c

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        c = torch.zeros_like(y) if self.epsilon <= 0.0 else self._all_coefficients(x, y)  # ε = 0: y
        return DefenseOutput(ops.grad2_allocate(y, c, self.epsilon)[:, 0], y)

    def perturb_budgets(self, x: Tensor, epsilons: Sequence[float]) -> Tensor:
        """The released posteriors for several budgets [B, E, K] from one set of coefficients.
        Counts the queries; writes nothing to the logger."""
        type_arg(x, "x", Tensor, "a torch.Tensor")
        with torch.no_grad():
            y = self.victim_probs(x)
            out = ops.grad2_allocate(y, self._all_coefficients(x, y), epsilons)
        self._count(y.shape[0])
        return out
