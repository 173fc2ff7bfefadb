"""A faithful per-sample port of the original MAD code (prediction-poisoning, bb_mad.py).

Test oracle for the batched ops and defenses: it builds G explicitly with K autograd
backward passes, loops over candidate vertices in Python with the original's strict ``>``
scan, and runs the original line search. Deliberate departures, each needed to run it at
all: it runs on any device (the original hard-codes CUDA), the greedy argmax search stops
when every class is in the set (the original crashes for 11 <= K <= 45), ``projections``
is called with its arguments in the right order (the original swaps them), and the
exact/greedy threshold is a parameter (the original's is K <= 10).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F


def compute_jacobian_nll(x, proxy, weight=None):
    """G [K, K*H]: row k is vec(d(-log softmax(proxy(x))_k) / dW), W the last Linear weight."""
    assert x.shape[0] == 1
    z = proxy(x)
    nlls = -F.log_softmax(z, dim=1).mean(dim=0)
    W = weight if weight is not None else list(proxy.parameters())[-2]
    rows = []
    for k in range(nlls.shape[0]):
        (g,) = torch.autograd.grad(nlls[k], W, retain_graph=True)
        rows.append(g.flatten().clone())
    return torch.stack(rows)


def calc_objective(ytilde, y, G):
    u = G.t() @ ytilde
    u = u / u.norm()
    v = G.t() @ y
    v = v / v.norm()
    return (u - v).norm() ** 2


def calc_objective_batched(ytilde, y, G):
    u = G.t() @ ytilde
    u = u / u.norm(dim=0)
    v = G.t() @ y
    v = v / v.norm(dim=0)
    return (u - v).norm(dim=0) ** 2


def calc_surrogate_objective(ytilde, y, G):
    return (G.t() @ ytilde - G.t() @ y).norm() ** 2


def calc_objective_numpy(ytilde, y, G):
    u = G.T @ ytilde
    u /= np.linalg.norm(u)
    v = G.T @ y
    v /= np.linalg.norm(v)
    return np.linalg.norm(u - v) ** 2


def calc_surrogate_objective_numpy(ytilde, y, G):
    return np.linalg.norm(G.T @ ytilde - G.T @ y) ** 2


def oracle_extreme(G, y, objmax=False):
    K = G.shape[0]
    best_k, best = -1, -1.0
    for k in range(K):
        yk = torch.zeros_like(y)
        yk[k] = 1.0
        val = calc_objective(yk, y, G) if objmax else calc_surrogate_objective(yk, y, G)
        if val > best:
            best, best_k = val, k
    ystar = torch.zeros_like(y)
    ystar[best_k] = 1.0
    return ystar, best


def oracle_argmax_preserving(G, y, objmax=False, exact_max_k=10):
    K = G.shape[0]
    if K > exact_max_k:
        return oracle_argmax_greedy(G, y)
    max_k = int(y.argmax())
    G_np = G.detach().cpu().numpy()
    y_np = y.detach().cpu().numpy()
    ystar, best = None, -1.0
    vertices = np.asarray(list(itertools.product([0, 1], repeat=K)), dtype=np.float32)
    vertices = vertices[vertices[:, max_k] > 0]
    for ye in vertices:
        ye[max_k] += 1e-5
        ye = ye / ye.sum()
        val = calc_objective_numpy(ye, y_np, G_np) if objmax else calc_surrogate_objective_numpy(ye, y_np, G_np)
        if val > best:
            best, ystar = val, ye
    ystar = torch.tensor(ystar).to(G.device)
    assert ystar.argmax() == y.argmax()
    return ystar, best


def oracle_argmax_greedy(G, y, max_iters=1024):
    K = G.shape[0]
    max_k = int(y.argmax())
    ys = y.detach().clone() + 1e-8
    ys /= ys.sum()
    ystar, best = None, -1.0
    niters = 0
    fixed = [max_k]
    while niters < max_iters:
        prev = torch.zeros(K, dtype=y.dtype)
        prev[fixed] = 1.0
        k_list = sorted(set(range(K)) - set(fixed))
        if not k_list:  # the original crashes here (torch.stack of an empty list)
            break
        batch = []
        for k in k_list:
            ye = prev.clone()
            ye[k] = 1.0
            ye[max_k] += 1e-5
            batch.append(ye / ye.sum())
        batch = torch.stack(batch).t().to(G.device)
        yb = torch.stack([ys] * batch.shape[1]).t()
        vals = calc_objective_batched(batch, yb, G)
        i = int(vals.argmax())
        if float(vals.max()) > best:
            best = float(vals.max())
            ystar = batch[:, i]
        fixed.append(k_list[i])
        niters += batch.shape[1]
    assert ystar.argmax() == y.argmax()
    return ystar.clone(), best


def oracle_argmin(y):
    ystar = torch.zeros_like(y)
    ystar[int(y.argmin())] = 1.0
    return ystar


def oracle_rand(y, k):
    ystar = torch.zeros_like(y)
    ystar[int(k)] = 1.0
    return ystar


def calc_distance(y, ytilde, ydist):
    if ydist == "l1":
        return (ytilde - y).norm(p=1)
    if ydist == "l2":
        return (ytilde - y).norm(p=2)
    return F.kl_div(ytilde.log(), y, reduction="sum")


def linesearch(y, ystar, ydist, epsilon):
    h = lambda a: (1 - a) * y + a * ystar  # noqa: E731
    if ydist in ("l1", "l2"):
        p = 1.0 if ydist == "l1" else 2.0
        alpha = (epsilon / ((y - ystar).norm(p=p) + 1e-7)).clamp(min=0.0, max=1.0)
        return h(alpha) - y
    lo, hi = 0.0, 1.0
    feasible_high = calc_distance(y, h(hi), ydist) <= epsilon
    if feasible_high:
        return h(hi) - y
    ytilde = h(lo)
    for _ in range(15):
        mid = (lo + hi) / 2.0
        hm = h(mid)
        if calc_distance(y, hm, ydist) <= epsilon:
            lo, ytilde = mid, hm
        else:
            hi = mid
    return ytilde - y


def _proj_simplex_np(v, s=1.0):
    (n,) = v.shape
    if v.sum() == s and np.all(v >= 0):
        return v
    u = np.sort(v)[::-1]
    cssv = np.cumsum(u)
    rho = np.nonzero(u * np.arange(1, n + 1) > (cssv - s))[0][-1]
    theta = (cssv[rho] - s) / (rho + 1.0)
    return (v - theta).clip(min=0)


def _proj_l1_np(v, s=1.0):
    u = np.abs(v)
    if u.sum() <= s:
        return v
    return _proj_simplex_np(u, s=s) * np.sign(v)


def projections(y, ystar, epsilon, ydist, max_iters=100):
    """The original ``MAD.projections`` (bb_mad.py:618-641): alternating projections.

    ỹ ← y*; up to ``max_iters`` times: δ = ỹ − y projected onto the ε-ball (l1: the Euclidean
    projection onto the L1 ball, ``euclidean_proj_l1ball``; l2: δ·ε / max(‖δ‖₂, ε)); ỹ = y + δ
    projected onto the simplex (``euclidean_proj_simplex``); stop once ỹ is in the ball and in
    the simplex to 1e-4. Returns δ = ỹ − y, which may leave the ball by up to that tolerance.

    The argument-order bug, fixed here: the original's signature is
    ``projections(G, y, ystar, epsilon, ydist, max_iters=100)``, but ``calc_delta``
    (bb_mad.py:674) calls ``self.projections(G, y, ystar, self.ydist, self.epsilon)`` with
    ``epsilon`` and ``ydist`` swapped, so ``epsilon`` receives the string and ``ydist`` the
    number, and its ``assert ydist in ['l1', 'l2', 'kl']`` raises AssertionError on every call:
    ``optim='projections'`` never ran. This port takes ``(y, ystar, epsilon, ydist)`` (G is
    only used there for shape checks and the device, so it is dropped) and :func:`calc_delta`
    below passes them in that order. Other departures: the result keeps y's dtype and device
    (``.to(y)``; the original, once called right, returns float64 through numpy), and the L1
    ball and simplex projections are the numpy helpers above (the original's, with
    ``np.alltrue`` replaced by ``np.all``).
    """
    ytilde = ystar
    for _ in range(max_iters):
        delta = ytilde - y
        if ydist == "l1":
            delta = torch.tensor(_proj_l1_np(delta.detach().cpu().numpy(), s=epsilon)).to(y)
        elif ydist == "l2":
            delta = epsilon * delta / delta.norm(p=2).clamp(min=epsilon)
        else:
            raise NotImplementedError
        ytilde = y + delta
        ytilde = torch.tensor(_proj_simplex_np(ytilde.detach().cpu().numpy())).to(y)
        in_ball = (calc_distance(y, ytilde, ydist) - epsilon).clamp(min=0.0) <= 1e-4
        in_simplex = torch.abs(ytilde.clamp(min=0.0, max=1.0).sum() - 1.0) <= 1e-4
        if in_ball and in_simplex:
            break
    return ytilde - y


def calc_delta(G, y, *, oracle, objmax, ydist, epsilon, optim="linesearch", exact_max_k=10, rand_k=None):
    """One sample: the original ``MAD.calc_delta`` given G (identity for random/argmin)."""
    if oracle == "extreme":
        ystar, _ = oracle_extreme(G, y, objmax)
    elif oracle == "argmax":
        ystar, _ = oracle_argmax_preserving(G, y, objmax, exact_max_k)
    elif oracle == "argmin":
        ystar = oracle_argmin(y)
    else:
        ystar = oracle_rand(y, rand_k)
    ystar = ystar.to(y.dtype)
    if optim == "linesearch":
        delta = linesearch(y, ystar, ydist, epsilon)
    else:
        delta = projections(y, ystar, epsilon, ydist)
    ytilde = y + delta
    return delta, calc_objective(ytilde, y, G), calc_surrogate_objective(ytilde, y, G)


def mad_per_sample(x, victim, proxy, *, epsilon, oracle="extreme", objmax=False, ydist="l1",
                   optim="linesearch", disable_jacobian=False, exact_max_k=10, rand_ks=None, weight=None):
    """The original ``MAD.__call__``: batched victim forward, then one sample at a time."""
    with torch.no_grad():
        y_v = F.softmax(victim(x), dim=1)
    outs, objs, sobjs = [], [], []
    for i in range(x.shape[0]):
        y = y_v[i]
        if epsilon > 0:
            with torch.enable_grad():
                if disable_jacobian or oracle in ("random", "argmin"):
                    G = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
                else:
                    G = compute_jacobian_nll(x[i:i + 1], proxy, weight)
                rk = None if rand_ks is None else rand_ks[i]
                delta, obj, sobj = calc_delta(G.detach(), y, oracle=oracle, objmax=objmax, ydist=ydist,
                                              epsilon=epsilon, optim=optim, exact_max_k=exact_max_k, rand_k=rk)
        else:
            delta = torch.zeros_like(y)
            obj = sobj = torch.tensor(0.0)
        outs.append(y + delta)
        objs.append(float(obj))
        sobjs.append(float(sobj))
    return torch.stack(outs), y_v, torch.tensor(objs), torch.tensor(sobjs)
