"""Typed wrappers over the native MAD kernels (``torch.ops.ppoison``).

This is the only module that calls ``torch.ops.ppoison``. Without the native library
(:data:`ppoison_ext.HAS_OPS` False) every op runs its pure-PyTorch twin of the same name in
:mod:`ppoison_ext.reference`. Every op takes and returns batched tensors (B ≥ 0 samples, K ≥ 2
classes), float32 or float64, on CPU or CUDA, one device and dtype for all; inference-only.

Notation. For a proxy with last Linear layer W [K, H] on features h [H] and softmax output
p [K], row k of the Jacobian G [K, K·H] of the per-class NLL −log p_k w.r.t. W is
(p − e_k) ⊗ h, hence

* ``G·Gᵀ = ‖h‖² (I − 1pᵀ − p1ᵀ + ‖p‖² 11ᵀ)`` and
* ``Gᵀy = vec((Σ_k y_k · p − y) hᵀ)``.

MAD's objectives of a perturbed posterior ỹ depend on G only through M = G·Gᵀ:

* angular ``obj(ỹ) = ‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖²`` ∈ [0, 4] (a zero vector normalizes to zero);
* surrogate ``sobj(ỹ) = ‖Gᵀ(ỹ − y)‖²``.

So the oracle and objective ops take the Gram in one of three forms: ``p`` and ``h_sqnorm``
(the last-Linear closed form: one proxy forward, no backward), an explicit ``gram``
[B, K, K] (e.g. from :func:`jacobian_gram` of per-sample Jacobians of any parameter set), or
neither (G = I: MAD without a Jacobian).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference
from ._native import HAS_OPS

__all__ = ["jacobian_gram_fc", "jacobian_tvec_fc", "jacobian_gram", "jacobian_tvec", "mad_oracle",
           "mad_objective", "mad_step", "project_simplex", "project_l1_ball", "grad2_allocate",
           "modelguard_w_solve", "ORACLES", "YDISTS"]


def _kernel(name: str):
    """The native kernel ``name``, or its twin in :mod:`ppoison_ext.reference` without the native library."""
    if HAS_OPS:
        return getattr(torch.ops.ppoison, name).default
    return getattr(reference, name)


def _fake(name: str):
    """Registers a fake (meta) kernel for ``ppoison::name`` when the native library is loaded."""

    def register(fn):
        return torch.library.register_fake(f"ppoison::{name}")(fn) if HAS_OPS else fn

    return register


ORACLES = ("extreme", "argmax", "argmin", "random")
YDISTS = ("l1", "l2", "kl")


def _tensors(optional: Tuple[str, ...] = (), **tensors) -> None:
    """TypeError unless each of ``tensors`` is a Tensor (or None, for the ``optional`` names) of
    dtype float32 or float64, the first's (``index``: int64); ValueError unless they all lie on
    the device of the first. (The kernels check the same, but an error crosses PyTorch's stable
    ABI only as a ValueError.) The checks here are written inline, not through
    :mod:`ppoison_ext.checks`: at batch 1 the helpers' calls cost ~1 µs per op, 10-20 %."""
    first = None
    for name, t in tensors.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if name == "index":
            if t.dtype != torch.int64:
                raise TypeError(f"ppoison: index must be an int64 tensor, got {t.dtype}")
        elif t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ppoison: {name} must be a float32 or float64 tensor, got {t.dtype}")
        elif first is not None and t.dtype != first[1].dtype:
            raise TypeError(f"ppoison: {name} has dtype {t.dtype} but {first[0]} has dtype "
                            f"{first[1].dtype}; dtypes must match")
        if first is None:
            first = name, t
        elif t.device != first[1].device:
            raise ValueError(f"{name} is on {t.device} but {first[0]} is on {first[1].device}; "
                             "all tensors must be on the same device")


def _number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        if isinstance(x, Tensor) and x.numel() == 1:
            return float(x)
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def _choice(x, name: str, choices) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got {type(x).__name__}")
    if x not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {x!r}")
    return x


def jacobian_gram_fc(p: Tensor, h_sqnorm: Tensor) -> Tensor:
    """Gram matrices G·Gᵀ of the last-Linear NLL Jacobian, in closed form.

    ``out[b] = h_sqnorm[b] · (I − 1 p[b]ᵀ − p[b] 1ᵀ + ‖p[b]‖² 11ᵀ)``

    Shape:
        p (proxy softmax outputs): [B, K]; h_sqnorm (‖h‖² of the features entering the last
        Linear layer): [B]; returns [B, K, K].
    """
    _tensors(p=p, h_sqnorm=h_sqnorm)
    return _kernel("jacobian_gram_fc")(p, h_sqnorm)


def jacobian_tvec_fc(p: Tensor, h: Tensor, y: Tensor) -> Tensor:
    """Products Gᵀy of the last-Linear NLL Jacobian, in closed form.

    ``out[b] = vec((Σ_k y[b,k] · p[b] − y[b]) h[b]ᵀ)``, row-major like the weight W [K, H],
    i.e. ``out[b, k·H + m] = (Σy · p_k − y_k) · h_m``.

    Shape:
        p: [B, K]; h: [B, H]; y: [B, K]; returns [B, K·H].
    """
    _tensors(p=p, h=h, y=y)
    return _kernel("jacobian_tvec_fc")(p, h, y)


def jacobian_gram(G: Tensor) -> Tensor:
    """Gram matrices G·Gᵀ [B, K, K] of explicit per-sample Jacobians G [B, K, D]."""
    _tensors(G=G)
    return _kernel("jacobian_gram")(G)


def jacobian_tvec(G: Tensor, y: Tensor) -> Tensor:
    """Products Gᵀy of explicit per-sample Jacobians: ``out[b] = Σ_k y[b,k] G[b,k]`` [B, D]."""
    _tensors(G=G, y=y)
    return _kernel("jacobian_tvec")(G, y)


def mad_oracle(
    y: Tensor,
    *,
    p: Optional[Tensor] = None,
    h_sqnorm: Optional[Tensor] = None,
    gram: Optional[Tensor] = None,
    oracle: str = "extreme",
    objmax: bool = False,
    exact_max_k: int = 16,
    max_candidates: int = 1024,
    generator: Optional[torch.Generator] = None,
    index: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """MAD's perturbation-direction search: the target vertex y* per sample.

    Candidates and their value (``objmax`` picks the angular objective, else the surrogate):

    * ``extreme``: the K one-hot vertices e_k.
    * ``argmax`` (accuracy preserving), with k* = argmax y: the vertices
      ``(1_S + 1e-5·e_k*) / (|S| + 1e-5)`` for sets S ∋ k*. For K ≤ ``exact_max_k`` all
      2^(K−1) of them, in ``itertools.product`` order over the other classes; above that a
      greedy search: S grows from {k*} by the class whose vertex scores best, every S ∪ {c}
      is scored, the global best is kept, until ``max_candidates`` vertices were scored or S
      holds every class; it uses the angular objective and y smoothed as (y + 1e-8)/Σ
      (differences.md: exact argmax enumeration).
    * ``argmin``: e_k for k = argmin y.
    * ``random``: e_k for k drawn uniformly (``index`` if given, else from ``generator``).

    The first candidate wins ties (objective values within 1e-10 relative). Values are
    computed in float64.

    The Gram is ``p``/``h_sqnorm`` (``h_sqnorm`` defaults to 1) or ``gram``, not both (see the
    module docs); ``exact_max_k`` ≤ 24. Returns ``(y_star [B, K], value [B])``, value the
    objective of y* (angular if ``objmax`` or for the greedy search, else the surrogate).
    """
    _tensors(("p", "h_sqnorm", "gram", "index"), y=y, p=p, h_sqnorm=h_sqnorm, gram=gram, index=index)
    oracle = _choice(oracle, "oracle", ORACLES)
    if not isinstance(objmax, bool):
        raise TypeError(f"objmax must be a bool, got {type(objmax).__name__}")
    for name, v in (("exact_max_k", exact_max_k), ("max_candidates", max_candidates)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if oracle == "random" and index is None:
        if y.dim() != 2:
            raise ValueError(f"y must have shape [B, K], got {tuple(y.shape)}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        index = torch.randint(y.shape[1], (y.shape[0],), generator=generator, device=gen_device).to(y.device)
    return _kernel("mad_oracle")(
        y, p=p, h_sqnorm=h_sqnorm, gram=gram, oracle=oracle, objmax=objmax, exact_max_k=exact_max_k,
        max_candidates=max_candidates, index=index,
    )


def mad_objective(
    y_tilde: Tensor,
    y: Tensor,
    *,
    p: Optional[Tensor] = None,
    h_sqnorm: Optional[Tensor] = None,
    gram: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """MAD's objective values of ``y_tilde`` against ``y``.

    Returns ``(obj, sobj)``: the angular objective ‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖² and the
    surrogate ‖Gᵀ(ỹ − y)‖² (two [B] tensors), with the Gram given as in :func:`mad_oracle`.
    """
    _tensors(("p", "h_sqnorm", "gram"), y=y, y_tilde=y_tilde, p=p, h_sqnorm=h_sqnorm, gram=gram)
    return _kernel("mad_objective")(y_tilde, y, p=p, h_sqnorm=h_sqnorm, gram=gram)


def mad_step(y: Tensor, y_star: Tensor, epsilon: float, ydist: str = "l1", kl_steps: int = 15) -> Tensor:
    """MAD's line search from y toward y* inside the ε-ball.

    ``ỹ = (1 − α) y + α y*`` with, per sample,

    * ``l1``/``l2``: α = clamp(ε / (‖y − y*‖_p + 1e-7), 0, 1);
    * ``kl``: α = 1 if KL(y‖y*) ≤ ε, else the last feasible midpoint of a ``kl_steps``-step
      bisection on KL(y‖ỹ(α)) ≤ ε over [0, 1] (α = 0 if none is feasible).

    Shape:
        y, y_star: [B, K]; returns [B, K].
    """
    ydist = _choice(ydist, "ydist", YDISTS)
    eps = _number(epsilon, "epsilon")
    if isinstance(kl_steps, bool) or not isinstance(kl_steps, int):
        raise TypeError(f"kl_steps must be an int, got {type(kl_steps).__name__}")
    _tensors(y=y, y_star=y_star)
    return _kernel("mad_step")(y, y_star, eps, ydist, kl_steps)


def project_simplex(v: Tensor, radius: float = 1.0) -> Tensor:
    """Euclidean projection of each row onto the simplex {x ≥ 0, Σx = radius}.

    ``x = max(v − τ, 0)`` with τ found by Michelot's active-set method (the twin: the sort-based
    method of Duchi et al., 2008). Rows already on the simplex are returned unchanged.
    """
    _tensors(v=v)
    return _kernel("project_simplex")(v, _number(radius, "radius"))


def project_l1_ball(v: Tensor, radius: float) -> Tensor:
    """Euclidean projection of each row onto the L1 ball {‖x‖₁ ≤ radius}.

    ``x = v`` if ‖v‖₁ ≤ radius, else ``sign(v) ⊙ project_simplex(|v|, radius)``.
    """
    _tensors(v=v)
    return _kernel("project_l1_ball")(v, _number(radius, "radius"))


def _budgets(epsilons) -> list:
    if isinstance(epsilons, Tensor):
        if epsilons.dim() > 1:
            raise ValueError(f"epsilons must be a number or a 1-D sequence, got a tensor of shape "
                             f"{tuple(epsilons.shape)}")
        epsilons = epsilons.reshape(-1).tolist()
    elif isinstance(epsilons, (int, float)) and not isinstance(epsilons, bool):
        epsilons = [epsilons]
    elif not isinstance(epsilons, (list, tuple)):
        raise TypeError(f"epsilons must be a number or a sequence of numbers, got {type(epsilons).__name__}")
    return [_number(e, "epsilons") for e in epsilons]


def grad2_allocate(p: Tensor, c: Tensor, epsilons) -> Tensor:
    """GRAD²'s allocation step (Mazeika et al., ICML 2022): per sample and budget, the exact
    minimiser of cᵀx over {x on the simplex, ‖x − p‖₁ ≤ ε}, then GR's floor.

    Per row: receiver r = argmin c (lowest index among equal minima); donors = the other
    classes in descending order of c (equal c: lowest index first); G = min(1 − p_r, ε/2);
    take_d = clamp(G − S_d, 0, p_d) with S the exclusive cumulative sum of p along the donor
    order; x = p − take, x_r = p_r + Σ take; ``ỹ = clamp(x, 1e-15, 1) / Σ clamp(x, 1e-15, 1)``.
    Before the floor ‖x − p‖₁ = 2G ≤ ε. Computed in float64, rounded once. Only the order of
    the coefficients c within a row matters; ``epsilons`` is one budget or a sequence of E ≥ 1,
    each finite and ≥ 0.

    Shape:
        p, c: [B, K]; returns [B, E, K] (E = 1 for a single number).
    """
    _tensors(p=p, c=c)
    return _kernel("grad2_allocate")(p, c, _budgets(epsilons))


def modelguard_w_solve(y: Tensor, epsilon: float, margin: float = 1e-4,
                       log_offset: float = 1e-6) -> Tuple[Tensor, Tensor, Tensor]:
    """ModelGuard-W's misinformation LP (``MLD``, ModelGuard, USENIX Security 2024), solved
    exactly per row.

    For each row y (entries ≥ 0) with c = log(y + log_offset) and m its first argmax::

        minimise Σ_j c_j x_j   s.t.   x ≥ 0, Σ_j x_j = 1, ‖x − y‖₁ ≤ ε,
                                      x_m − x_j ≥ margin for every j ≠ m.

    Minimising ⟨log y, x⟩ maximises the cross-entropy of the release against y while the top-1
    class is kept. Solved as a 1-D search over t = x_m (the inner problem for a fixed t is a
    greedy fill; its value is convex piecewise-linear on the feasible t interval): one
    golden-section search over [lo, 1] of that value plus a penalty outside the interval
    (quasi-convex, so the interval's ends need not be found first), in float64 (differences.md:
    ModelGuard-W). The pure-PyTorch twin locates the interval's ends by bisection first. Rows
    where no x satisfies both the margin and the budget are returned unchanged, with
    ``feasible`` False. y is finite and ≥ 0, ε ≥ 0, margin in [0, 1), log_offset > 0.

    Returns:
        ``(x, objective, feasible)``: x [B, K] and Σ c·x [B] in y's dtype, and a bool [B].
    """
    eps = _number(epsilon, "epsilon")
    delta = _number(margin, "margin")
    off = _number(log_offset, "log_offset")
    _tensors(y=y)
    return _kernel("modelguard_w_solve")(y, eps, delta, off)


# ---------------------------------------------------------------------------------------
# Fake (meta) kernels: output shapes for FakeTensor tracing / torch.compile, and what
# torch.library.opcheck's test_faketensor checks against the real kernels.


def _fake_bk(y: Tensor) -> Tuple[int, int]:
    torch._check(y.dim() == 2, lambda: f"expected [B, K], got {tuple(y.shape)}")
    return y.shape[0], y.shape[1]


@_fake("jacobian_gram_fc")
def _jacobian_gram_fc_fake(p, h_sqnorm):
    B, K = _fake_bk(p)
    return p.new_empty((B, K, K))


@_fake("jacobian_tvec_fc")
def _jacobian_tvec_fc_fake(p, h, y):
    B, K = _fake_bk(p)
    torch._check(h.dim() == 2)
    return p.new_empty((B, K * h.shape[1]))


@_fake("jacobian_gram")
def _jacobian_gram_fake(G):
    torch._check(G.dim() == 3)
    return G.new_empty((G.shape[0], G.shape[1], G.shape[1]))


@_fake("jacobian_tvec")
def _jacobian_tvec_fake(G, y):
    torch._check(G.dim() == 3)
    return G.new_empty((G.shape[0], G.shape[2]))


@_fake("mad_oracle")
def _mad_oracle_fake(y, p, h_sqnorm, gram, oracle, objmax, exact_max_k, max_candidates, index):
    B, K = _fake_bk(y)
    return y.new_empty((B, K)), y.new_empty((B,))


@_fake("mad_objective")
def _mad_objective_fake(y_tilde, y, p, h_sqnorm, gram):
    B, K = _fake_bk(y)
    return y.new_empty((B,)), y.new_empty((B,))


def _same_shape_fake(v, *args):
    _fake_bk(v)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


for _name in ("mad_step", "project_simplex", "project_l1_ball"):
    _fake(_name)(_same_shape_fake)


@_fake("grad2_allocate")
def _grad2_allocate_fake(p, c, epsilons):
    B, K = _fake_bk(p)
    return p.new_empty((B, len(epsilons), K))


@_fake("modelguard_w_solve")
def _modelguard_w_solve_fake(y, epsilon, margin, log_offset):
    B, K = _fake_bk(y)
    return y.new_empty((B, K)), y.new_empty((B,)), y.new_empty((B,), dtype=torch.bool)
