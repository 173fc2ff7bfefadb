"""Independent references: checks written from the definitions, not from the twins' algebra.

* ``optim="projections"`` (l1, l2): MAD's released posteriors against the per-sample port of
  the reference's alternating projections (``original_mad.projections``, never run by the
  reference itself because of its argument-order bug), and against the exact Euclidean
  projection of y* onto {ỹ ∈ Δ : ‖ỹ − y‖ ≤ ε} computed by a general solver (SLSQP). What the
  algorithm guarantees, and what is asserted:

  - always: ỹ on the simplex and ‖ỹ − y‖ ≤ ε (MAD's final step back toward y turns the
    reference's 1e-4 stopping tolerance into exact feasibility), hence ‖ỹ − y*‖ is never below
    the solver's optimum; y* feasible ⇒ ỹ = y*;
  - l2: ỹ is the exact projection. The ball step maps y* to y + ε(y* − y)/‖y* − y‖, a point of
    the segment [y, y*], which lies in the simplex whenever y* does (every oracle's y* does);
    the simplex step then leaves it in place and the loop stops after one iteration. The
    nearest point of the ball to y* being feasible, it is the nearest feasible point;
  - l1: not the exact projection in general (alternating projections find a point of the
    intersection, not the nearest one; the gap is reported, not asserted). The l1-ball step is
    a Euclidean projection too, so the same argument gives exactness when it lands on the
    simplex, e.g. when y and y* are supported on the same two classes (K = 2 in particular),
    and that is asserted.

* exact argmax search (K = 11…16): against a brute-force numpy enumeration of every vertex
  (1_S + 1e-5·e_k*)/(|S| + 1e-5), S ∋ k* = argmax y, in ``itertools.product`` order, with the
  objective evaluated from an explicit G in float64 (random G, and the last-Linear G built
  from its definition G[k, j·H + m] = (p_j − δ_jk)·h_m).

* KL step: against a bisection carried out in mpmath at 50 digits, from the definition
  KL(y‖ỹ) = Σ_{y_k > 0} y_k (log y_k − log ỹ_k), ỹ(α) = (1 − α)y + αy*: α = 1 if ỹ(1) is
  feasible, else the last feasible midpoint of ``kl_steps`` halvings of [0, 1] (0 if none).
"""

from __future__ import annotations

import itertools

import mpmath
import numpy as np
import original_mad as orig
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from ppoison_ext import ops
from ppoison_ext.defenses import MAD
from ppoison_ext.testing import IdentityLogits

mp = mpmath.mp


# ---------------------------------------------------------------------------------------
# 1. optim="projections"


Logits = IdentityLogits


def _proxy(K, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(K, 16), nn.ReLU(), nn.Linear(16, K))


def _inputs(B, K, seed):
    """Logits of posteriors from spread to peaked, a few with a near-zero class."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.linspace(0.5, 6.0, B, dtype=torch.float64)[:, None]
    x = torch.randn(B, K, generator=g, dtype=torch.float64) * spread
    x[::3, 0] -= 40.0  # y_0 ≈ 0
    return x


def _dist(y, yt, ydist):
    d = (yt - y).double()
    return d.abs().sum(-1) if ydist == "l1" else d.norm(dim=-1)


def _step_back(y, yt, eps, ydist):
    """MAD's documented last step (mad.py ``_projections``): scale ỹ − y down to length ε."""
    d = _dist(y, yt, ydist)
    scale = torch.where(d > eps, eps / d.clamp(min=1e-300), torch.ones_like(d))
    return y + scale[:, None] * (yt - y)


PROJ_CONFIGS = [("extreme", False), ("extreme", True), ("argmax", True), ("argmax", False), ("argmin", False),
                ("random", False)]
PROJ_EPS = [0.05, 0.3, 1.0, 2.5]


def _mad_and_ystar(device, K, oracle, objmax, ydist, eps, seed=3):
    victim = Logits(K).double().to(device)
    proxy = _proxy(K, K).double().to(device)
    x = _inputs(8, K, K).to(device)
    mad = MAD(victim, epsilon=eps, proxy=proxy, oracle=oracle, objmax=objmax, ydist=ydist,
              optim="projections", exact_max_k=10, seed=seed)
    out = mad.perturb(x)
    # the y* MAD used: the same oracle call, same Gram, same seeded draw
    gen = torch.Generator().manual_seed(seed) if oracle == "random" else None
    with torch.no_grad():
        y_star, _ = ops.mad_oracle(out.y, oracle=oracle, objmax=objmax, exact_max_k=10, generator=gen,
                                   **mad.gram_args(x, out.y))
    return x, victim, proxy, out, y_star


@pytest.mark.parametrize("K", [2, 5, 10])
@pytest.mark.parametrize("ydist", ["l1", "l2"])
def test_projections_match_reference_port(device, K, ydist):
    """MAD(optim="projections") = the port's alternating projections on the same y*, then
    MAD's step back, to 1e-12 (float64); end to end (the port's own oracle and G) too."""
    stepped_rows = 0
    for (oracle, objmax), eps in itertools.product(PROJ_CONFIGS, PROJ_EPS):
        x, victim, proxy, out, y_star = _mad_and_ystar(device, K, oracle, objmax, ydist, eps)
        y, ys = out.y.cpu(), y_star.cpu()
        port = torch.stack([y[i] + orig.projections(y[i], ys[i], eps, ydist) for i in range(y.shape[0])])
        want = _step_back(y, port, eps, ydist)
        stepped_rows += int((_dist(y, port, ydist) > eps).sum())
        case = f"{oracle} objmax={objmax} eps={eps}"
        torch.testing.assert_close(out.y_prime.cpu(), want, rtol=0, atol=1e-12,
                                   msg=lambda m, c=case: f"{c}: {m}")
        if oracle != "argmax":  # the port's argmax vertices are float32 (the reference's), MAD's float64
            rand_ks = torch.randint(K, (x.shape[0],), generator=torch.Generator().manual_seed(3))
            full = orig.mad_per_sample(x.cpu(), victim.cpu(), proxy.cpu(), epsilon=eps, oracle=oracle,
                                       objmax=objmax, ydist=ydist, optim="projections", exact_max_k=10,
                                       rand_ks=rand_ks)[0]
            torch.testing.assert_close(out.y_prime.cpu(), _step_back(y, full, eps, ydist), rtol=0, atol=1e-12)
    if ydist == "l1" and K > 2:
        assert stepped_rows > 0, "no row exercised MAD's step back (the port stopped outside the ball)"


_SOLVED = {}


def _exact_projection(ys, y, eps, ydist):
    """The solver's answer, cached across devices (keyed on the inputs to 1e-12)."""
    key = (ydist, float(eps), tuple(np.round(y, 12)), tuple(np.round(ys, 12)))
    if key not in _SOLVED:
        _SOLVED[key] = _solve_projection(ys, y, eps, ydist)
    return _SOLVED[key]


def _solve_projection(ys, y, eps, ydist):
    """argmin ‖x − y*‖² over {x ∈ Δ : ‖x − y‖ ≤ ε} by SLSQP (numpy float64).

    l2: the constraint ε² − ‖x − y‖² ≥ 0. l1: auxiliary t ≥ |x − y| with Σt ≤ ε (a QP)."""
    K = len(y)
    if ydist == "l2":
        cons = [{"type": "eq", "fun": lambda z: z.sum() - 1.0, "jac": lambda z: np.ones(K)},
                {"type": "ineq", "fun": lambda z: eps ** 2 - ((z - y) ** 2).sum(),
                 "jac": lambda z: -2.0 * (z - y)}]
        r = minimize(lambda z: ((z - ys) ** 2).sum(), y.copy(), jac=lambda z: 2.0 * (z - ys), method="SLSQP",
                     bounds=[(0.0, 1.0)] * K, constraints=cons, options={"ftol": 1e-16, "maxiter": 2000})
        xs = r.x
    else:
        eye = np.eye(K)
        ones, zeros = np.ones(K), np.zeros(K)
        cons = [{"type": "eq", "fun": lambda z: z[:K].sum() - 1.0, "jac": lambda z: np.r_[ones, zeros]},
                {"type": "ineq", "fun": lambda z: eps - z[K:].sum(), "jac": lambda z: np.r_[zeros, -ones]},
                {"type": "ineq", "fun": lambda z: z[K:] - (z[:K] - y), "jac": lambda z: np.c_[-eye, eye]},
                {"type": "ineq", "fun": lambda z: z[K:] + (z[:K] - y), "jac": lambda z: np.c_[eye, eye]}]

        def f(z):
            return ((z[:K] - ys) ** 2).sum()

        def grad(z):
            return np.r_[2.0 * (z[:K] - ys), np.zeros(K)]

        r = minimize(f, np.r_[y, np.zeros(K)], jac=grad, method="SLSQP",
                     bounds=[(0.0, 1.0)] * K + [(0.0, 2.0)] * K, constraints=cons,
                     options={"ftol": 1e-16, "maxiter": 2000})
        xs = r.x[:K]
    d = np.abs(xs - y).sum() if ydist == "l1" else np.linalg.norm(xs - y)
    assert r.success or r.status == 8, r.message  # 8: "positive directional derivative" at the optimum
    assert abs(xs.sum() - 1) < 1e-7 and xs.min() > -1e-7 and d <= eps + 1e-7, ("solver infeasible", xs, d)
    return xs


def _check_against_solver(y, ys, yt, eps, ydist, exact):
    """One row (numpy float64): feasibility, optimality bound, exactness where promised."""
    d = np.abs(yt - y).sum() if ydist == "l1" else np.linalg.norm(yt - y)
    assert yt.min() >= 0 and abs(yt.sum() - 1) <= 1e-12, ("not on the simplex", yt)
    assert d <= eps * (1 + 1e-12), ("outside the ball", d, eps)
    dys = np.abs(ys - y).sum() if ydist == "l1" else np.linalg.norm(ys - y)
    if dys <= eps * (1 - 1e-9):
        np.testing.assert_allclose(yt, ys, rtol=0, atol=1e-15, err_msg="feasible y* not returned unchanged")
    if dys <= eps * (1 - 1e-9):
        return 0.0
    xs = _exact_projection(ys, y, eps, ydist)
    ours, best = ((yt - ys) ** 2).sum(), ((xs - ys) ** 2).sum()
    assert ours >= best - 1e-7, ("beats the exact projection: a bug on one side", ours, best)
    if exact:  # SLSQP solves to ~1e-9; the gaps where exactness is not promised are ~1e-2
        np.testing.assert_allclose(yt, xs, rtol=0, atol=1e-6, err_msg="not the exact projection")
    return ours - best


@pytest.mark.parametrize("ydist", ["l1", "l2"])
def test_projections_against_exact_projection(device, ydist):
    """MAD's outputs (every oracle, K ∈ {2, 5, 10}) against SLSQP's exact projection."""
    gaps, exact_l1 = [], 0
    for K in (2, 5, 10):
        for (oracle, objmax), eps in itertools.product(PROJ_CONFIGS[::2] + [("argmax", True)], PROJ_EPS):
            _, _, _, out, y_star = _mad_and_ystar(device, K, oracle, objmax, ydist, eps)
            y, ys, yt = (t.cpu().numpy() for t in (out.y, y_star, out.y_prime))
            for i in range(y.shape[0]):
                two = (np.count_nonzero(y[i] > 1e-300) <= 2 and
                       np.count_nonzero((y[i] > 1e-300) | (ys[i] > 0)) <= 2)
                exact = ydist == "l2" or K == 2 or two
                exact_l1 += ydist == "l1" and exact
                gaps.append(_check_against_solver(y[i], ys[i], yt[i], eps, ydist, exact))
    if ydist == "l1":
        assert exact_l1 > 0
        # alternating projections are not the exact l1 projection: some rows are strictly farther
        assert max(gaps) > 1e-6, "l1 alternating projections matched the exact projection everywhere"


@pytest.mark.parametrize("ydist", ["l1", "l2"])
def test_projections_generic_targets(ydist):
    """The algorithm itself (MAD._projections, the port) on y* anywhere on the simplex, and on
    two-class supports for l1 (where the l1-ball step lands on the simplex)."""
    rng = np.random.default_rng(11)
    for trial in range(40):
        K = int(rng.integers(2, 9))
        y = rng.dirichlet(np.full(K, 0.6))
        ys = rng.dirichlet(np.full(K, 0.6)) if trial % 2 else np.eye(K)[rng.integers(K)]
        if trial % 5 == 0:  # two-class support shared by y and y*
            a, b = rng.choice(K, 2, replace=False)
            w = rng.uniform(0.05, 0.95)
            y = np.zeros(K)
            y[a], y[b] = w, 1 - w
            ys = np.eye(K)[a if trial % 2 else b]
        eps = float(rng.choice([0.02, 0.1, 0.4, 1.2]))
        mad = MAD(Logits(K), epsilon=eps, ydist=ydist, optim="projections")
        yt_t, ys_t = torch.tensor(y)[None], torch.tensor(ys)[None]
        got = mad._projections(yt_t, ys_t)
        port = _step_back(yt_t, yt_t + orig.projections(yt_t[0], ys_t[0], eps, ydist)[None], eps, ydist)
        torch.testing.assert_close(got, port, rtol=0, atol=1e-12)
        two = np.count_nonzero(y) <= 2 and np.count_nonzero((y > 0) | (ys > 0)) <= 2
        exact = ydist == "l2" or K == 2 or two
        _check_against_solver(y, ys, got[0].numpy(), eps, ydist, exact)


# ---------------------------------------------------------------------------------------
# 2. exact argmax search, K = 11…16, against brute force

_VERTEX_CACHE = {}


def _brute_vertices(K, kstar):
    """Every argmax-preserving vertex for k*, in itertools.product([0, 1], repeat=K) order."""
    if K not in _VERTEX_CACHE:
        _VERTEX_CACHE[K] = np.asarray(list(itertools.product([0, 1], repeat=K)), dtype=np.float64)
    b = _VERTEX_CACHE[K]
    b = b[b[:, kstar] > 0].copy()
    b[:, kstar] += 1e-5
    return b / b.sum(1, keepdims=True)


def _brute_values(V, y, G, objmax):
    U, g = V @ G, y @ G  # rows Gᵀṽ, Gᵀy
    if objmax:
        return ((U / np.linalg.norm(U, axis=1, keepdims=True) - g / np.linalg.norm(g)) ** 2).sum(1)
    return ((U - g) ** 2).sum(1)


def _argmax_case(K, form, seed):
    rng = np.random.default_rng(seed)
    y = rng.dirichlet(np.full(K, 0.5))
    if form == "dense":
        G = rng.standard_normal((K, 3 * K))
        return y, G, {"gram": G @ G.T}
    p, h = rng.dirichlet(np.full(K, 0.5)), np.abs(rng.standard_normal(5))
    G = np.stack([np.outer(p - np.eye(K)[k], h).ravel() for k in range(K)])  # G[k, j·H+m] = (p_j − δ_jk) h_m
    return y, G, {"p": p, "h_sqnorm": np.array(h @ h)}


@pytest.mark.parametrize("K", range(11, 17))
@pytest.mark.parametrize("objmax", [False, True])
def test_exact_argmax_against_brute_force(device, K, objmax):
    ambiguous = 0
    for form, row in itertools.product(["dense", "fc"], range(3)):
        y, G, gargs = _argmax_case(K, form, seed=1000 * K + 10 * row + (form == "fc") + 7 * objmax)
        kw = {k: torch.tensor(v, dtype=torch.float64, device=device).reshape((1,) + v.shape) if v.ndim else
              torch.tensor([float(v)], dtype=torch.float64, device=device) for k, v in gargs.items()}
        ystar, value = ops.mad_oracle(torch.tensor(y, device=device)[None], oracle="argmax", objmax=objmax,
                                      exact_max_k=16, **kw)
        ystar, value = ystar[0].cpu().numpy(), float(value[0])
        kstar = int(np.argmax(y))
        V = _brute_vertices(K, kstar)
        vals = _brute_values(V, y, G, objmax)
        i0 = int(np.argmax(vals))  # first maximum
        top2 = np.sort(vals)[-2:]
        # our y* must be one of the vertices; find it by its support
        j = np.flatnonzero((V > 0).astype(int) @ (1 << np.arange(K)[::-1]) ==
                           (ystar > 0).astype(int) @ (1 << np.arange(K)[::-1]))
        assert len(j) == 1, ("y* is not an argmax-preserving vertex", ystar)
        j = int(j[0])
        np.testing.assert_allclose(ystar, V[j], rtol=0, atol=1e-15)
        np.testing.assert_allclose(value, vals[j], rtol=1e-9, atol=1e-12)
        if top2[1] - top2[0] <= 1e-9 * abs(top2[1]):
            ambiguous += 1
            assert vals[j] >= vals[i0] - 1e-9 * abs(vals[i0]), (form, row, vals[j], vals[i0])
        else:
            assert j == i0, (form, row, "brute force", i0, vals[i0], "ours", j, vals[j])
    assert ambiguous < 6


# ---------------------------------------------------------------------------------------
# 3. KL step against a 50-digit bisection

EPS_KL = [1e-3, 0.05, 0.3, 1.0]


def _mp_kl(y, ys, a):
    """KL(y‖(1 − a)y + a·y*) in mpmath; y, y* are exact float64 values, a an mpf."""
    s = mp.mpf(0)
    for yk, sk in zip(y, ys, strict=True):
        if yk > 0:
            yk, sk = mp.mpf(float(yk)), mp.mpf(float(sk))
            h = (1 - a) * yk + a * sk
            if h <= 0:
                return mp.inf
            s += yk * (mp.log(yk) - mp.log(h))
    return s


def _mp_bisect(y, ys, eps, steps, amb_tol="1e-12"):
    """(α, ambiguous): the reference's KL line search in 50 digits. ``ambiguous``: some
    branch compared a KL within ``amb_tol`` of ε (float64 may decide it either way)."""
    eps, amb_tol = mp.mpf(float(eps)), mp.mpf(amb_tol)
    k1 = _mp_kl(y, ys, mp.mpf(1))
    amb = k1 != mp.inf and abs(k1 - eps) <= amb_tol
    if k1 <= eps:
        return mp.mpf(1), amb
    lo, hi, alpha = mp.mpf(0), mp.mpf(1), mp.mpf(0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        k = _mp_kl(y, ys, mid)
        amb |= k != mp.inf and abs(k - eps) <= amb_tol
        if k <= eps:
            lo = alpha = mid
        else:
            hi = mid
    return alpha, bool(amb)


def _kl_cases(dtype):
    g = torch.Generator().manual_seed(5)
    B, K = 12, 7
    spread = torch.linspace(0.5, 5, B, dtype=torch.float64)[:, None]
    y = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64) * spread, 1)
    y[::4, 1] = 0.0  # zeros in y: their terms drop out
    y = y / y.sum(1, keepdim=True)
    vert = torch.nn.functional.one_hot(torch.randint(K, (B,), generator=g), K).double()
    # full support: ỹ(1) can be feasible
    mix = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64), 1)
    ys = torch.where((torch.arange(B) % 3 == 0)[:, None], mix, vert)
    return y.to(dtype), ys.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_kl_step_against_mpmath_bisection(device, dtype):
    mp.dps = 50
    y, ys = _kl_cases(dtype)
    yd, sd = y.double().numpy(), ys.double().numpy()
    total = amb_rows = 0
    feas_tol = 1e-12 if dtype == torch.float64 else 2e-6  # float32: ỹ rounded once to float32
    for eps, steps in itertools.product(EPS_KL, [15, 7]):
        got = ops.mad_step(y.to(device), ys.to(device), eps, "kl", kl_steps=steps).cpu()
        for i in range(y.shape[0]):
            total += 1
            alpha, amb = _mp_bisect(yd[i], sd[i], eps, steps)
            # (b) feasible, in 50 digits, for the output as released
            assert _mp_kl(yd[i], got[i].double().numpy(), mp.mpf(1)) <= eps + feas_tol, (eps, steps, i)
            if amb:
                amb_rows += 1
                continue
            a = float(alpha)  # dyadic with ≤ 50 bits: exact in float64
            want = torch.tensor((1 - a) * yd[i] + a * sd[i]).to(dtype)
            # (a) the same branch decisions: α differs by ≥ 2^-steps otherwise
            case = f"eps={eps} steps={steps} row {i} α_mp={a}"
            torch.testing.assert_close(got[i], want, rtol=0, atol=1e-14 if dtype == torch.float64 else 1e-7,
                                       msg=lambda m, c=case: f"{c}: {m}")
    assert amb_rows <= total // 10, (amb_rows, total)


def _mp_root(y, ys, eps):
    """α* with KL(y‖ỹ(α*)) = ε (1 if ỹ(1) is feasible), by 160 halvings in 50 digits."""
    alpha, _ = _mp_bisect(y, ys, eps, 160, amb_tol=0)
    return alpha


def test_kl_step_converges_to_mpmath_root(device):
    """(c) with kl_steps = 50 the step's α is within 1e-10 of the exact root, below it."""
    mp.dps = 50
    y, ys = _kl_cases(torch.float64)
    yd, sd = y.numpy(), ys.numpy()
    for eps in EPS_KL:
        got = ops.mad_step(y.to(device), ys.to(device), eps, "kl", kl_steps=50).cpu().numpy()
        for i in range(y.shape[0]):
            root = _mp_root(yd[i], sd[i], eps)
            d = sd[i] - yd[i]
            alpha = float((got[i] - yd[i]) @ d / (d @ d))  # ỹ = y + α(y* − y)
            assert abs(alpha - float(root)) <= 1e-10, (eps, i, alpha, float(root))
            assert _mp_kl(yd[i], got[i], mp.mpf(1)) <= eps + 1e-12
