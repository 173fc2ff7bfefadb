"""MAD: maximizing angular deviation (Orekondy, Schiele, Fritz. "Prediction Poisoning:
Towards Defenses Against DNN Model Stealing Attacks", ICLR 2020, arXiv:1906.10908)."""

from __future__ import annotations

import threading
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .base import Defense, DefenseOutput
from .proxy import ProxyView, reference_jacobian_param

__all__ = ["MAD"]

_PROJECTION_TOL = 1e-4  # the reference's convergence tolerance for optim="projections"
_PROJECTION_ITERS = 100


class MAD(Defense):
    """The MAD defense: release ỹ = argmax angular deviation of the attacker's gradient,
    within ``epsilon`` of the true posterior y.

    Per batch: one victim forward (y), one proxy forward (p and the features h entering its
    last Linear layer), then the native ops: the oracle picks a target vertex y* per query
    (:func:`ppoison_ext.ops.mad_oracle`) and the line search steps toward it
    (:func:`ppoison_ext.ops.mad_step`). The Jacobian G is that of the proxy's per-class NLL
    w.r.t. the parameter the reference differentiates, its second-to-last parameter (the last
    layer's weight). When the proxy's output is its last Linear layer's output up to a per-row
    constant (plain logits, ``log_softmax``), G enters only through its closed-form Gram
    matrix ‖h‖²(I − 1pᵀ − p1ᵀ + ‖p‖²11ᵀ): no backward pass, no G.

    Args:
        model: the victim.
        epsilon: perturbation budget ε ≥ 0 in ``ydist`` (0 releases y exactly).
        proxy: the defender's stand-in for the attacker's model; None uses the victim (as the
            reference does; the victim is in eval mode, so p = y and the angular objective
            degenerates: Gᵀy = 0 normalizes to 0). Used as given: in train mode it follows
            the reference's per-query forward (BatchNorm statistics per query, dropout on)
            in one batched forward, see :mod:`ppoison_ext.defenses.proxy`; in eval mode the
            plain forward. Its parameters are never changed.
        ydist: ``l1``, ``l2`` or ``kl``.
        oracle: ``extreme`` (one-hot targets), ``argmax`` (targets that keep the top-1
            class: MAD-argmax), ``argmin`` or ``random`` (these two use G = I, as the reference).
        optim: ``linesearch`` (the reference's default) or ``projections`` (alternating
            projection of y* − y onto the ε-ball and of y + δ onto the simplex, the
            reference's algorithm; l1/l2 only). A final step back toward y keeps
            the result inside the ball exactly.
        objmax: score candidates with the angular objective (the reference's README uses
            it) instead of the surrogate ‖Gᵀ(ỹ − y)‖².
        disable_jacobian: use G = I.
        jacobian: ``auto`` (default): per batch, the closed form when the proxy's output equals
            its last Linear layer's output up to a per-row additive constant (checked by
            value), else explicit per-sample Jacobians w.r.t. the proxy's second-to-last
            parameter, as the reference computes them; ``fc``: the closed form, refused
            (ValueError) when it does not apply; ``full``: explicit per-sample Jacobians of
            the NLL w.r.t. ``jacobian_params`` by torch.func, reduced to their Gram matrices
            by :func:`ppoison_ext.ops.jacobian_gram`.
        jacobian_params: for ``full``: ``"all"`` (the default: every parameter, a different
            defense from the reference's) or parameter names / name prefixes.
        exact_max_k: largest K whose argmax-preserving vertices are all enumerated (default
            16; above it, the reference's greedy search).
        seed: seeds the ``random`` oracle's generator (None: torch's global RNG).
        logger: optional :class:`~ppoison_ext.defenses.QueryLogger`.

    Shape:
        x: [B, ...] as the victim takes it; returns [B, K].

    Example:
        >>> defense = MAD(victim, epsilon=0.5, proxy=proxy, objmax=True)
        >>> y_prime = defense(x)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        epsilon: float,
        proxy: Optional[nn.Module] = None,
        ydist: str = "l1",
        oracle: str = "extreme",
        optim: str = "linesearch",
        objmax: bool = False,
        disable_jacobian: bool = False,
        jacobian: str = "auto",
        jacobian_params: Union[str, Sequence[str]] = "all",
        exact_max_k: int = 16,
        seed: Optional[int] = None,
        logger=None,
    ):
        super().__init__(model, logger=logger)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
            raise TypeError(f"epsilon must be a real number, got {type(epsilon).__name__}")
        if not (0.0 <= float(epsilon) < float("inf")):
            raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
        choices = {"ydist": (ydist, ops.YDISTS), "oracle": (oracle, ops.ORACLES),
                   "optim": (optim, ("linesearch", "projections")), "jacobian": (jacobian, ("auto", "fc", "full"))}
        for name, (v, allowed) in choices.items():
            if v not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {v!r}")
        if optim == "projections" and ydist == "kl":
            raise ValueError("optim='projections' supports ydist 'l1' and 'l2' (the reference raises for "
                             "'kl')")
        for name, v in (("objmax", objmax), ("disable_jacobian", disable_jacobian)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        if proxy is not None and not isinstance(proxy, nn.Module):
            raise TypeError(f"proxy must be a torch.nn.Module or None, got {type(proxy).__name__}")
        self.epsilon = float(epsilon)
        self.ydist, self.oracle, self.optim = ydist, oracle, optim
        self.objmax, self.disable_jacobian = objmax, disable_jacobian
        self.jacobian, self.jacobian_params = jacobian, jacobian_params
        self.exact_max_k, self.seed = int(exact_max_k), seed
        self.proxy = proxy
        self._victim_is_proxy = proxy is None
        self._view = ProxyView(model if proxy is None else proxy)
        self._generators = {}
        self._func_lock = threading.Lock()

    def hparams(self) -> dict:
        return {"epsilon": self.epsilon, "ydist": self.ydist, "oracle": self.oracle, "optim": self.optim,
                "objmax": self.objmax, "disable_jacobian": self.disable_jacobian, "jacobian": self.jacobian,
                "exact_max_k": self.exact_max_k, "proxy": "victim" if self._victim_is_proxy else type(self.proxy).__name__}

    @property
    def uses_identity(self) -> bool:
        """G = I: no proxy forward (``disable_jacobian``, or the ``random``/``argmin`` oracles)."""
        return self.disable_jacobian or self.oracle in ("random", "argmin")

    def _generator(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if device.type not in self._generators:  # one stream per device type; draws happen on the CPU
            self._generators[device.type] = torch.Generator().manual_seed(self.seed)
        return self._generators[device.type]

    # -- Gram of the proxy's NLL Jacobian -------------------------------------------------
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

    # -- the defense ------------------------------------------------------------------------
    def perturb(self, x: Tensor) -> DefenseOutput:
        if self._victim_is_proxy and self.jacobian != "full" and not self.uses_identity and self.epsilon > 0:
            # the victim is its own proxy: one forward gives y, p (= y) and h
            if not isinstance(x, Tensor):
                raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
            with torch.no_grad():
                if self.jacobian == "fc":
                    logits, h = self._view.forward_with_features(x)
                else:
                    logits, h = self._view.features(x)
                y = F.softmax(logits, dim=1)
                gram = self._auto_gram(x, y.shape[1], logits, h)
                gram = {k: v.to(device=y.device, dtype=y.dtype) for k, v in gram.items()}
                out = self._defend_with(y, gram)
            with self._count_lock:
                self.call_count += y.shape[0]
            if self.logger is not None:
                self.logger.log(out.y, out.y_prime, out.obj, out.sobj)
            return out
        return super().perturb(x)

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        if self.epsilon <= 0.0:
            zero = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
            return DefenseOutput(y.clone(), y, zero, zero.clone())
        return self._defend_with(y, self.gram_args(x, y))

    def _defend_with(self, y: Tensor, gram: dict) -> DefenseOutput:
        y_star, _ = ops.mad_oracle(y, oracle=self.oracle, objmax=self.objmax, exact_max_k=self.exact_max_k,
                                   generator=self._generator(y.device), **gram)
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
        """Alternating projections (the reference's algorithm, per-row stopping), batched."""
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
