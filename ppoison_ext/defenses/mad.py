"""MAD: maximizing angular deviation (Orekondy, Schiele, Fritz. "Prediction Poisoning:
Towards Defenses Against DNN Model Stealing Attacks", ICLR 2020, arXiv:1906.10908)."""

from __future__ import annotations

import threading
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_bools, check_choices, real_arg, type_arg
from .. import ops
from .base import Defense, DefenseOutput, boolean, optional_str, proxy_arg, register
from .proxy import ProxyView, reference_jacobian_param

__all__ = ["MAD"]

_PROJECTION_TOL = 1e-4  # optim="projections" stops when within this of the ball and the simplex
_PROJECTION_ITERS = 100
_BN_DROPOUT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)

#: MAD's ``defense_args`` keys (also those of ``mad_wb``)
MAD_KEYS = {
    "epsilon": float, "optim": str, "model_adv_proxy": optional_str, "max_grad_layer": optional_str,
    "ydist": str, "oracle": str, "disable_jacobian": boolean, "objmax": boolean, "jacobian": str,
    "jacobian_params": str, "exact_max_k": int, "seed": int, "proxy_mode": str,
}


@register("mad", needs="epsilon", **MAD_KEYS)
class MAD(Defense):
    """MAD: release the ỹ within ``epsilon`` of y (in ``ydist``) that deviates the proxy's
    training gradient furthest in angle.

    Per batch: one victim forward (y) and one proxy forward; :func:`ppoison_ext.ops.mad_oracle`
    picks a target vertex y* per query and :func:`ppoison_ext.ops.mad_step` steps toward it
    (``optim="projections"``: alternating projections onto the ε-ball and the simplex, then a
    step back toward y into the ball). G is the Jacobian of the proxy's per-class NLL w.r.t.
    its second-to-last parameter; when the proxy's output is its last Linear layer's output up
    to a per-row constant, G enters through its closed-form Gram matrix
    ‖h‖²(I − 1pᵀ − p1ᵀ + ‖p‖²11ᵀ), h the features entering that layer, p = softmax.

    ``proxy=None`` uses the victim (p = y). A proxy in train mode is run per query
    (:class:`~ppoison_ext.defenses.proxy.ProxyView`); it is never changed. ``oracle``:
    ``extreme`` (one-hot targets), ``argmax`` (targets keeping the top-1), ``argmin`` and
    ``random`` (G = I, as with ``disable_jacobian``). ``objmax`` scores candidates with the
    angular objective instead of ‖Gᵀ(ỹ − y)‖². ``jacobian``: ``auto`` (the closed form when it
    applies on the batch, else explicit per-sample Jacobians), ``fc`` (the closed form or a
    ValueError), ``full`` (explicit Jacobians w.r.t. ``jacobian_params``: ``"all"`` or names /
    name prefixes). ``exact_max_k``: the largest K whose argmax-preserving vertices are all
    enumerated (greedy above). ``seed`` seeds the ``random`` oracle.
    """

    def __init__(self, model: nn.Module, *, epsilon: float, proxy: Optional[nn.Module] = None,
                 ydist: str = "l1", oracle: str = "extreme", optim: str = "linesearch", objmax: bool = False,
                 disable_jacobian: bool = False, jacobian: str = "auto",
                 jacobian_params: Union[str, Sequence[str]] = "all", exact_max_k: int = 16,
                 seed: Optional[int] = None, logger=None):
        super().__init__(model, logger=logger)
        epsilon = real_arg(epsilon, "epsilon")
        check_choices(ydist=(ydist, ops.YDISTS), oracle=(oracle, ops.ORACLES),
                      optim=(optim, ("linesearch", "projections")),
                      jacobian=(jacobian, ("auto", "fc", "full")))
        if optim == "projections" and ydist == "kl":
            raise ValueError("optim='projections' supports ydist 'l1' and 'l2', not 'kl'")
        check_bools(objmax=objmax, disable_jacobian=disable_jacobian)
        type_arg(proxy, "proxy", nn.Module, "a torch.nn.Module", optional=True)
        self.epsilon = epsilon
        self.ydist, self.oracle, self.optim = ydist, oracle, optim
        self.objmax, self.disable_jacobian = objmax, disable_jacobian
        self.jacobian, self.jacobian_params = jacobian, jacobian_params
        self.exact_max_k = int(exact_max_k)
        self._init_seed(seed)
        self.proxy = proxy
        self._victim_is_proxy = proxy is None
        self._view = ProxyView(model if proxy is None else proxy)
        self._func_lock = threading.Lock()

    @classmethod
    def from_args(cls, name, model, args, *, proxy=None, logger=None, device=None, **_):
        """``model_adv_proxy:DIR`` loads the proxy in train mode unless ``proxy_mode:eval``;
        ``jacobian_params`` is ``+``-separated; ``max_grad_layer`` is accepted and ignored."""
        args.pop("max_grad_layer", None)
        mode = args.pop("proxy_mode", None)
        if mode not in (None, "train", "eval"):
            raise ValueError(f"defense_args: proxy_mode must be 'train' or 'eval', got {mode!r}")
        proxy = proxy_arg(args, proxy, model, device, train=True)
        if proxy is not None and mode is not None:
            proxy.train(mode == "train")
        if isinstance(args.get("jacobian_params"), str):
            names = [s for s in args["jacobian_params"].split("+") if s]
            args["jacobian_params"] = "all" if names in ([], ["all"]) else names
        return cls(model, proxy=proxy, logger=logger, **args)

    def hparams(self) -> dict:
        return {"epsilon": self.epsilon, "ydist": self.ydist, "oracle": self.oracle, "optim": self.optim,
                "objmax": self.objmax, "disable_jacobian": self.disable_jacobian, "jacobian": self.jacobian,
                "exact_max_k": self.exact_max_k, "proxy": "victim" if self._victim_is_proxy else type(self.proxy).__name__}

    @property
    def uses_identity(self) -> bool:
        """G = I: no proxy forward (``disable_jacobian``, or the ``random``/``argmin`` oracles)."""
        return self.disable_jacobian or self.oracle in ("random", "argmin")

    @property
    def batch_independent(self) -> bool:
        """Not with the ``random`` oracle (one stream of draws per batch), nor with a proxy in
        train mode holding BatchNorm or dropout layers."""
        if self.oracle == "random":
            return False
        proxy = self._view.proxy
        return not (proxy.training and any(isinstance(m, _BN_DROPOUT) for m in proxy.modules()))

    @property
    def keeps_top1(self) -> bool:
        return self.oracle == "argmax" or self.epsilon <= 0.0

    @property
    def reseedable(self) -> bool:
        return self.oracle == "random"

    @staticmethod
    def _closed_form(logits: Tensor, h: Tensor) -> dict:
        p = F.softmax(logits, dim=1)
        return {"p": p, "h_sqnorm": (h.double() ** 2).sum(1).to(p.dtype)}

    def _selected_params(self, wanted: Union[str, Sequence[str]]) -> dict:
        named = dict(self._view.proxy.named_parameters())
        if wanted == "all":
            return named
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        sel = {n: t for n, t in named.items() if any(n == w or n.startswith(w + ".") for w in wanted)}
        if not sel:
            raise ValueError(f"jacobian_params {wanted} match no parameter of the proxy; "
                             f"its parameters are {list(named)}")
        return sel

    def _full_gram(self, x: Tensor, K: int, wanted: Union[str, Sequence[str]]) -> dict:
        from torch.func import functional_call, jacrev, vmap

        view = self._view
        view._sync_modes()
        sel = {n: t.detach() for n, t in self._selected_params(wanted).items()}
        D = sum(t.numel() for t in sel.values())

        def nll(params, xb):
            out = functional_call(view.view, params, (xb.unsqueeze(0),), strict=False)
            return -F.log_softmax(out, dim=1)[0]

        per_sample = vmap(jacrev(nll), in_dims=(None, 0), randomness="different")
        chunk = max(1, (1 << 26) // max(1, K * D))
        grams = []
        with self._func_lock, torch.enable_grad():  # functional_call swaps parameters in place
            for lo in range(0, x.shape[0], chunk):
                jac = per_sample(sel, x[lo:lo + chunk])
                G = torch.cat([j.reshape(j.shape[0], K, -1) for j in jac.values()], dim=2)
                grams.append(ops.jacobian_gram(G.detach()))
        return {"gram": torch.cat(grams, 0)}

    def _auto_gram(self, x: Tensor, K: int, logits: Optional[Tensor] = None, h: Optional[Tensor] = None) -> dict:
        if logits is None:
            logits, h = self._view.features(x)
        if h is not None:
            return self._closed_form(logits, h)
        return self._full_gram(x, K, [reference_jacobian_param(self._view.proxy)])

    def gram_args(self, x: Tensor, y: Tensor) -> dict:
        """Keyword arguments describing G·Gᵀ for the oracle and objective ops."""
        if self.uses_identity:
            return {}
        K = y.shape[1]
        if self.jacobian == "full":
            g = self._full_gram(x, K, self.jacobian_params)
        elif self.jacobian == "fc":
            g = self._closed_form(*self._view.forward_with_features(x))
        else:
            g = self._auto_gram(x, K)
        return {k: v.to(device=y.device, dtype=y.dtype) for k, v in g.items()}

    def _answer(self, x: Tensor) -> DefenseOutput:
        if not self._victim_is_proxy or self.jacobian == "full" or self.uses_identity or self.epsilon <= 0:
            return super()._answer(x)
        # the victim is its own proxy: one forward gives y, p (= y) and h
        if self.jacobian == "fc":
            logits, h = self._view.forward_with_features(x)
        else:
            logits, h = self._view.features(x)
        y = F.softmax(logits, dim=1)
        gram = self._auto_gram(x, y.shape[1], logits, h)
        return self._defend_with(y, {k: v.to(device=y.device, dtype=y.dtype) for k, v in gram.items()})

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        if self.epsilon <= 0.0:
            zero = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
            return DefenseOutput(y.clone(), y, zero, zero.clone())
        return self._defend_with(y, self.gram_args(x, y))

    def _defend_with(self, y: Tensor, gram: dict) -> DefenseOutput:
        y_star, _ = ops.mad_oracle(y, oracle=self.oracle, objmax=self.objmax, exact_max_k=self.exact_max_k,
                                   generator=self._generator(), **gram)
        if self.optim == "linesearch":
            y_prime = ops.mad_step(y, y_star, self.epsilon, self.ydist)
        else:
            y_prime = self._projections(y, y_star)
        obj, sobj = ops.mad_objective(y_prime, y, **gram)
        return DefenseOutput(y_prime, y, obj, sobj)

    def _dist(self, y: Tensor, yt: Tensor) -> Tensor:
        d = (yt - y).double()
        return d.abs().sum(1) if self.ydist == "l1" else d.norm(dim=1)

    def _projections(self, y: Tensor, y_star: Tensor) -> Tensor:
        """Alternating projections onto the ε-ball and the simplex, each row stopping on its own."""
        yt = y_star.clone()
        active = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
        for _ in range(_PROJECTION_ITERS):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            ya, delta = y[idx], yt[idx] - y[idx]
            if self.ydist == "l1":
                delta = ops.project_l1_ball(delta, self.epsilon)
            else:
                delta = delta * (self.epsilon / delta.norm(dim=1, keepdim=True).clamp(min=self.epsilon))
            new = ops.project_simplex(ya + delta)
            yt[idx] = new
            in_ball = (self._dist(ya, new) - self.epsilon).clamp(min=0) <= _PROJECTION_TOL
            in_simplex = (new.clamp(0, 1).double().sum(1) - 1).abs() <= _PROJECTION_TOL
            active[idx] = ~(in_ball & in_simplex)
        # Within tolerance is not inside: step back toward y (a convex combination, so the
        # row stays on the simplex) until the distance is at most ε.
        dist = self._dist(y, yt)
        scale = torch.where(dist > self.epsilon, self.epsilon / dist.clamp(min=1e-300), torch.ones_like(dist))
        return (y.double() + scale[:, None] * (yt.double() - y.double())).to(y.dtype)
