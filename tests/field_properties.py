"""Invariant checks of the field defenses on one batch of adversarial posteriors, shared by
tests/test_properties.py (hypothesis) and tools/fuzz.py (the long run): GRAD² (every target,
both Jacobians, several surrogates), Adaptive Misinformation (every variant), ModelGuard-W,
ModelGuard-S and GR's baselines (MADGR, ReverseSigmoidGR, RandomGR).

Each ``*_problems(y, ...)`` builds its defense around an :class:`IdentityLogits` victim fed
:func:`victim_input` (so the defense's undefended posteriors are the rows y, up to rounding),
surrogates / misinformation models being small seeded MLPs, and returns the promises the batch
broke as messages ``"<defense> <check>: <what>"`` ([] when none). What each defense promises is
in its docstring and docs/differences.md; every one of them is checked for finite outputs and
for giving bit-identical answers when built again with the same seed.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppoison_ext import ops
from ppoison_ext.defenses import (GRAD2, MADGR, AdaptiveMisinformation, ModelGuardS, ModelGuardW, RandomGR,
                                  ReverseSigmoidGR)
from ppoison_ext.defenses.admis import AM_VARIANTS
from ppoison_ext.defenses.grad2 import watermark_target
from ppoison_ext.defenses.grad2_baselines import mad_gr_target, rand_gr_mix
from ppoison_ext.defenses.modelguard import LOG_OFFSET, MARGIN
from ppoison_ext.fuzzing import check_ball, check_simplex, distance
from ppoison_ext.testing import IdentityLogits

#: GRAD²'s targets as these checks name them ("tensor": a random a [P]; "watermark": watermark_target)
GRAD2_TARGETS = ("all_ones", "min_ip", "max_norm", "tensor", "watermark")
AM_VARIANT_NAMES = tuple(AM_VARIANTS)


def victim_input(y: Tensor) -> Tensor:
    """Logits x with softmax(x) = y up to rounding; exact zeros (log 0 → −1e4), ties and one-hot
    rows stay exact."""
    return torch.log(y).clamp(min=-1e4)


def victim(K: int, dtype) -> nn.Module:
    return IdentityLogits(K).to(dtype)


def small_net(K: int, dtype, seed: int, hidden: int = 8) -> nn.Module:
    """A seeded MLP K → hidden → K (surrogate, misinformation or score model); global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(K, hidden), nn.ReLU(), nn.Linear(hidden, K)).to(dtype).eval()


def _named(name: str, errs: List[str]) -> List[str]:
    return [f"{name}: {e}" for e in errs]


def _same(name: str, a: Tensor, b: Tensor) -> List[str]:
    return [] if torch.equal(a, b) else [f"{name}: answers differ from the same defense built again"]


def _top1(name: str, y: Tensor, yp: Tensor) -> List[str]:
    bad = yp.argmax(1) != y.argmax(1)
    return [f"{name}: top-1 changed on {int(bad.sum())}/{y.shape[0]} rows"] if bad.any() else []


def _split_close(name: str, make, x: Tensor, want: Tensor) -> List[str]:
    """A batch-independent defense answers the two halves of the batch, asked separately, as in the
    whole batch, up to rounding: not bit for bit, since PyTorch's vectorised CPU sigmoid rounds an
    entry in a vector's tail differently than in its body (ReverseSigmoidGR, K = 47 float32)."""
    h = x.shape[0] // 2
    if h == 0:
        return []
    got = torch.cat([make()(x[:h]), make()(x[h:])])
    ok = torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6)
    return [] if ok else [f"{name}: answers depend on the rest of the batch"]


def grad2_problems(y: Tensor, eps: float, target: str = "all_ones", jacobian: str = "full",
                   batch_independent: bool = False, surrogates: int = 1, seed: int = 0) -> List[str]:
    """GRAD²: on the simplex, within ε in L1 (docstring of ops.grad2_allocate), reproducible with
    the seed."""
    B, K = y.shape
    dt = y.dtype
    jacobian = "full" if target == "all_ones" else jacobian  # refused on fc (zero coefficients there)
    nets = [small_net(K, dt, seed + i) for i in range(surrogates)]
    if target == "tensor":
        gen = torch.Generator().manual_seed(seed)
        P = sum(p.numel() for p in (nets[0][2] if jacobian == "fc" and seed % 2 else nets[0]).parameters())
        target = torch.randn(P, generator=gen, dtype=torch.float64).to(dt)
    elif target == "watermark":
        gen = torch.Generator().manual_seed(seed)
        xw = torch.randn(4, K, generator=gen, dtype=torch.float64).to(dt)
        target = watermark_target(nets[0], xw, F.one_hot(torch.randint(K, (4,), generator=gen), K).to(dt))

    def make():
        return GRAD2(victim(K, dt), epsilon=eps, surrogate=nets if surrogates > 1 else nets[0], target=target,
                     jacobian=jacobian, batch_independent=batch_independent, seed=seed)

    x = victim_input(y)
    d = make()
    out = d.perturb(x)
    return (_named("GRAD2 simplex", check_simplex(out.y_prime))
            + _named("GRAD2 ball", check_ball(out.y, out.y_prime, eps, "l1"))
            + _same("GRAD2 seed", make()(x), out.y_prime))


def am_problems(y: Tensor, tau: float, variant: str = "admis", adaptive: bool = True,
                temperature: float = 1.0, score_model: bool = False, seed: int = 0) -> List[str]:
    """Adaptive Misinformation: ỹ = lerp(y, ŷ, α) on the simplex, α = σ(ν(τ − s)) in [0, 1] (τ when
    not adaptive), ỹ between y and ŷ entry-wise, exactly y where α = 0 and ŷ where α = 1, s the
    victim's max softmax unless a score model is given; no randomness."""
    B, K = y.shape
    dt = y.dtype
    misinfo = small_net(K, dt, seed)
    scorer = small_net(K, dt, seed + 1) if score_model else None

    def make():
        return AdaptiveMisinformation(victim(K, dt), misinformation_model=misinfo, tau=tau, variant=variant,
                                      score_model=scorer, adaptive=adaptive, temperature=temperature)

    x = victim_input(y)
    d = make()
    c = d.components(x)
    out = d.perturb(x)
    yp, a = out.y_prime, c.alpha
    errs = (_named("AM simplex", check_simplex(yp)) + _same("AM repeat", make()(x), yp)
            + _same("AM components", c.y_prime, yp))
    if not (torch.isfinite(a).all() and (a >= 0).all() and (a <= 1).all()):
        errs.append("AM alpha: outside [0, 1]")
    tau_r = float(torch.tensor(tau, dtype=a.dtype))  # α is computed in the score's dtype
    want = (torch.sigmoid(d.nu * (tau_r - c.score.double())) if adaptive
            else torch.full_like(a, tau_r, dtype=torch.float64))
    off = (a.double() - want).abs()
    if (off > 1e-6).any():
        errs.append(f"AM alpha: differs from sigma(nu (tau - s)) by {float(off.max()):.3g}")
    if scorer is None and not torch.equal(c.score, c.y.amax(1)):
        errs.append("AM score: not the victim's max softmax")
    lo, hi = torch.minimum(c.y, c.y_hat), torch.maximum(c.y, c.y_hat)
    if ((yp < lo - 1e-6) | (yp > hi + 1e-6)).any():
        errs.append("AM mix: an entry outside [min(y, y_hat), max(y, y_hat)]")
    for name, rows, want_rows in (("alpha = 0 is not y", a == 0, c.y),
                                  ("alpha = 1 is not y_hat", a == 1, c.y_hat)):
        if not torch.equal(yp[rows], want_rows[rows]):
            errs.append(f"AM ends: {name}")
    return errs


def modelguard_w_problems(y: Tensor, eps: float) -> List[str]:
    """ModelGuard-W: on the simplex, within ε in L1, top-1 kept; feasible rows open the margin
    (y′_m − y′_j ≥ 1e-4), infeasible ones are y unchanged and counted; deterministic."""
    B, K = y.shape
    x = victim_input(y)

    def make():
        return ModelGuardW(victim(K, y.dtype), epsilon=eps)

    d = make()
    out = d.perturb(x)
    yp = out.y_prime
    _, _, feasible = ops.modelguard_w_solve(out.y, eps, MARGIN, LOG_OFFSET)
    errs = (_named("ModelGuard-W simplex", check_simplex(yp))
            + _named("ModelGuard-W ball", check_ball(out.y, yp, eps, "l1"))
            + _top1("ModelGuard-W top-1", out.y, yp) + _same("ModelGuard-W repeat", make()(x), yp)
            + _split_close("ModelGuard-W batch_independent", make, x[:8], yp[:8]))
    if out.obj is None or not torch.isfinite(out.obj).all():
        errs.append("ModelGuard-W objective: non-finite")
    m = out.y.argmax(1)
    gap = yp.double().gather(1, m[:, None]) - yp.double()
    gap[torch.arange(B), m] = float("inf")
    tol = 1e-6 if y.dtype == torch.float32 else 1e-12
    if (feasible & (gap.amin(1) < MARGIN - tol)).any():
        errs.append(f"ModelGuard-W margin: top-1 ahead by only {float(gap.amin(1)[feasible].min()):.3g}")
    if not torch.equal(yp[~feasible], out.y[~feasible]):
        errs.append("ModelGuard-W infeasible: a row not released unchanged")
    if d.infeasible_count != int((~feasible).sum()):
        errs.append("ModelGuard-W infeasible: miscounted")
    return errs


def modelguard_s_problems(y: Tensor, eps: float, ydist: str = "l1", y_next: Optional[Tensor] = None,
                          cut: Optional[int] = None) -> List[str]:
    """ModelGuard-S on the stream y: top-1 kept; each answer is an earlier query (a centroid) within
    ε of y in ``ydist``; the same answers when the stream comes in other batches (split at ``cut``);
    then ``frozen`` on ``y_next``: answers a centroid of the query's class (within ε where one
    is) or y itself when the class has none, adding no centroid."""
    B, K = y.shape
    x = victim_input(y)

    def make(frozen=False):
        return ModelGuardS(victim(K, y.dtype), epsilon=eps, ydist=ydist, frozen=frozen)

    d = make()
    out = d.perturb(x)
    yp, yy = out.y_prime, out.y
    errs = _named("ModelGuard-S simplex", check_simplex(yp)) + _top1("ModelGuard-S top-1", yy, yp)
    dist = distance(yy, yp, ydist)
    if (dist > eps * (1 + 1e-9) + 1e-12).any():
        errs.append(f"ModelGuard-S ball: {ydist} distance {float(dist.max())} > epsilon {eps}")
    earlier = (yp[:, None, :] == yy[None, :, :]).all(-1).tril()
    if not earlier.any(1).all():
        errs.append("ModelGuard-S centroid: an answer that is no earlier query")
    cut = B // 2 if cut is None else cut
    d2 = make()
    errs += _same("ModelGuard-S batching", torch.cat([d2(x[:cut]), d2(x[cut:])]), yp)
    if y_next is None:
        return errs
    f = make(frozen=True)
    f.set_state(d.get_state())
    x2 = victim_input(y_next)
    o2 = f.perturb(x2)
    bank, labels = d.get_state()["bank"].to(y.dtype), d.get_state()["labels"]
    errs += _top1("ModelGuard-S frozen top-1", o2.y, o2.y_prime)
    if f.num_centroids != d.num_centroids:
        errs.append("ModelGuard-S frozen: added centroids")
    lab = o2.y.argmax(1)
    same = lab[:, None] == labels[None, :]
    is_c = (o2.y_prime[:, None, :] == bank[None]).all(-1) & same
    known = same.any(1)
    if not (is_c.any(1) | (~known & (o2.y_prime == o2.y).all(1))).all():
        errs.append("ModelGuard-S frozen: an answer neither a centroid of its class nor y")
    p = 1.0 if ydist == "l1" else 2.0
    dc = torch.cdist(o2.y.double(), bank.double(), p=p, compute_mode="donot_use_mm_for_euclid_dist")
    near = ((dc <= eps) & same).any(1)
    if (near & (distance(o2.y, o2.y_prime, ydist) > eps * (1 + 1e-9) + 1e-12)).any():
        errs.append("ModelGuard-S frozen: a centroid within epsilon exists but the answer is farther")
    return errs


def mad_gr_problems(y: Tensor, eps: float, seed: int = 0) -> List[str]:
    """GR's MAD: ỹ = (1 − α)p + α e_k* with α = ε/‖p − e_k*‖₁ unclamped, so ‖ỹ − p‖₁ = ε (p = e_k*:
    ỹ = p), the mass moves to k*, rows sum to Σp + α(1 − Σp) (1 where p sums to 1), ỹ ≥ 0
    where α ≤ 1 (it leaves the simplex by design beyond); deterministic."""
    B, K = y.shape
    surr = small_net(K, y.dtype, seed)
    x = victim_input(y)

    def make():
        return MADGR(victim(K, y.dtype), epsilon=eps, surrogate=surr)

    out = make().perturb(x)
    yp, p = out.y_prime, out.y
    errs = _same("MADGR repeat", make()(x), yp)
    if not torch.isfinite(yp).all():
        return errs + ["MADGR finite: non-finite output"]
    with torch.no_grad():
        k = mad_gr_target(p, F.softmax(surr(x), dim=1))
    e = F.one_hot(k, K).to(torch.float64)
    pd, yd = p.double(), yp.double()
    vertex = (pd == e).all(1)
    if not torch.equal(yp[vertex], p[vertex]):
        errs.append("MADGR vertex: p = e_k* not released unchanged")
    d = distance(p, yp, "l1")
    scale = 1.0 + eps
    if ((d - eps).abs() > 1e-5 * scale)[~vertex].any():
        errs.append(f"MADGR distance: |‖y' − y‖₁ − ε| = {float((d - eps).abs()[~vertex].max()):.3g}")
    moved = yd - pd
    if ((moved * (2 * e - 1)) < -1e-6 * scale).any():
        errs.append("MADGR direction: mass not moved towards k*")
    alpha = torch.where(vertex, torch.zeros_like(d), eps / (pd - e).abs().sum(1).clamp(min=1e-300))
    sum_tol = 1e-6 * (1 + alpha) + alpha * (1 - pd.sum(1)).abs()
    if ((yd.sum(1) - 1).abs() > sum_tol).any():
        errs.append(f"MADGR sum: row sum off by {float((yd.sum(1) - 1).abs().max()):.3g}")
    if (yp[alpha <= 1] < 0).any():
        errs.append("MADGR simplex: negative entry with alpha <= 1")
    return errs


def reverse_sigmoid_gr_problems(y: Tensor, beta: float, gamma: float) -> List[str]:
    """GR's reverse sigmoid: on the simplex (r ≤ 0 raises the low classes, renormalised), classes
    with p ≥ ½ only shrink; deterministic and batch-independent."""
    B, K = y.shape
    x = victim_input(y)

    def make():
        return ReverseSigmoidGR(victim(K, y.dtype), beta=beta, gamma=gamma)

    out = make().perturb(x)
    yp = out.y_prime
    errs = (_named("ReverseSigmoidGR simplex", check_simplex(yp))
            + _same("ReverseSigmoidGR repeat", make()(x), yp)
            + _split_close("ReverseSigmoidGR batch_independent", make, x[:8], yp[:8]))
    high = out.y >= 0.5
    if (yp[high].double() > out.y[high].double() * (1 + 1e-6)).any():
        errs.append("ReverseSigmoidGR high: a class with p >= 1/2 grew")
    return errs


def random_gr_problems(y: Tensor, eps: float, seed: int = 0) -> List[str]:
    """GR's random baseline: ỹ = (ε/2)e_u + (1 − ε/2)y with u ≠ argmax y drawn from the seed: on
    the simplex, ‖ỹ − y‖₁ = ε(1 − y_u) ≤ ε, bit-identical for the same seed and after ``reseed``."""
    B, K = y.shape
    x = victim_input(y)

    def make():
        return RandomGR(victim(K, y.dtype), epsilon=eps, seed=seed)

    d = make()
    out = d.perturb(x)
    yp = out.y_prime
    u = make().draw(out.y)
    errs = (_named("RandomGR simplex", check_simplex(yp))
            + _named("RandomGR ball", check_ball(out.y, yp, eps, "l1"))
            + _same("RandomGR seed", make()(x), yp)
            + _same("RandomGR formula", rand_gr_mix(out.y, u, eps), yp))
    d.reseed(seed)
    errs += _same("RandomGR reseed", d(x), yp)
    if (u == out.y.argmax(1)).any():
        errs.append("RandomGR draw: drew the top-1 class")
    want = eps * (1 - out.y.double().gather(1, u[:, None])[:, 0])
    if ((distance(out.y, yp, "l1") - want).abs() > 1e-5).any():
        errs.append("RandomGR distance: not eps (1 - y_u)")
    if eps == 0 and not torch.equal(yp, out.y):
        errs.append("RandomGR eps=0: not y")
    return errs
