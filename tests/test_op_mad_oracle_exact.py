"""The exact argmax-preserving search against a brute-force enumeration written from the definition.

The brute force here shares nothing with the kernels or with ``reference.py``: it builds the
explicit per-class NLL Jacobian of a last Linear layer, G[k] = (p − e_k) ⊗ h, enumerates every
vertex ỹ = (1_S + 1e-5·e_k*) / (|S| + 1e-5) with k* = argmax y ∈ S in ``itertools.product``
order, scores ‖Gᵀỹ/‖Gᵀỹ‖ − Gᵀy/‖Gᵀy‖‖² (objmax) or ‖Gᵀ(ỹ − y)‖² (surrogate) in float64 numpy,
and takes the first value within 1e-10 (relative) of the maximum.

The near-uniform proxy (p ≈ uniform, so Gᵀỹ is a small difference of large terms) is the case
where an incrementally updated search state used to drift over the 2^(K−1) updates; the search
then missed its own maximum and returned the vertex {k*}.
"""

import numpy as np
import pytest
import torch

from ppoison_ext import ops

W = 1e-5  # up-weight of the top class in a vertex
TIE = 1e-10  # relative tie tolerance: the first candidate this close to the maximum wins
CHUNK = 1 << 18  # vertices scored at a time


def _jacobian(p, h):
    """[K, K·H]: row k is vec((p − e_k) hᵀ)."""
    K = p.shape[0]
    return np.stack([np.outer(p - np.eye(K)[k], h).ravel() for k in range(K)])


def _vertices(K, kstar, lo, hi):
    """Vertices of itertools ranks lo..hi−1 over all K bits, those without k* left out (None)."""
    r = np.arange(lo, hi, dtype=np.int64)
    bits = ((r[:, None] >> np.arange(K - 1, -1, -1)[None, :]) & 1).astype(np.float64)
    bits = bits[bits[:, kstar] == 1]
    if bits.shape[0] == 0:
        return None
    a = bits.copy()
    a[:, kstar] += W
    return a / a.sum(1, keepdims=True)


def brute_force(y, p, h, objmax):
    """(y*, value) over all vertices containing k*, the first maximum within the tie tolerance."""
    K = y.shape[0]
    kstar = int(np.argmax(y))  # first maximum
    G = _jacobian(p, h)
    gy = y @ G
    values, verts = [], []
    for lo in range(0, 1 << K, CHUNK):
        V = _vertices(K, kstar, lo, min(lo + CHUNK, 1 << K))
        if V is None:
            continue
        U = V @ G
        if objmax:
            d = U / np.linalg.norm(U, axis=1, keepdims=True) - gy / np.linalg.norm(gy)
        else:
            d = U - gy
        values.append((d * d).sum(1))
        verts.append(V)
    v = np.concatenate(values)
    best = v.max()
    r = int(np.argmax(v >= best - TIE * max(abs(best), 1.0)))
    return np.concatenate(verts)[r], v[r]


def _near_uniform(B, K, seed):
    rng = np.random.default_rng(seed)
    soft = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    p = soft(1e-3 * rng.standard_normal((B, K)))
    y = soft(3.0 * rng.standard_normal((B, K)))
    h = rng.standard_normal((B, 3))
    return y, p, h


def _random(B, K, seed):
    rng = np.random.default_rng(seed)
    soft = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return soft(rng.standard_normal((B, K))), soft(2.0 * rng.standard_normal((B, K))), rng.standard_normal((B, 4))


def _run(y, p, h, device, objmax, gram, exact_max_k):
    t = lambda a: torch.tensor(a, dtype=torch.float64, device=device)
    if gram == "dense":
        M = np.stack([_jacobian(p[b], h[b]) @ _jacobian(p[b], h[b]).T for b in range(y.shape[0])])
        gargs = {"gram": t(M)}
    else:
        gargs = {"p": t(p), "h_sqnorm": t((h * h).sum(1))}
    ystar, value = ops.mad_oracle(t(y), oracle="argmax", objmax=objmax, exact_max_k=exact_max_k, **gargs)
    obj, sur = ops.mad_objective(ystar, t(y), **gargs)
    return ystar.cpu().numpy(), value.cpu().numpy(), (obj if objmax else sur).cpu().numpy()


def _rows_checked(K):
    return None if K <= 16 else 1  # brute force on every row up to K = 16, then on the first


@pytest.mark.parametrize(
    "K", [pytest.param(K, marks=pytest.mark.slow) if K >= 23 else K for K in range(10, 25)])
def test_near_uniform_proxy_returns_its_maximum(device, K):
    B = 4 if K <= 16 else 2
    y, p, h = _near_uniform(B, K, seed=K)
    ystar, value, obj = _run(y, p, h, device, True, "fc", exact_max_k=24)
    # the value is that of the vertex returned, and the vertex keeps the top class
    np.testing.assert_allclose(value, obj, rtol=1e-9, atol=0)
    assert (ystar.argmax(1) == y.argmax(1)).all()
    for b in range(B if _rows_checked(K) is None else _rows_checked(K)):
        want, want_v = brute_force(y[b], p[b], h[b], True)
        np.testing.assert_allclose(ystar[b], want, rtol=1e-12, atol=1e-12, err_msg=f"row {b}")
        np.testing.assert_allclose(value[b], want_v, rtol=1e-9, atol=0, err_msg=f"row {b}")


@pytest.mark.parametrize("gram", ["fc", "dense"])
@pytest.mark.parametrize("objmax", [False, True], ids=["surrogate", "objmax"])
@pytest.mark.parametrize("K", range(11, 17))
def test_exact_argmax_matches_brute_force(device, K, objmax, gram):
    B = 3
    y, p, h = _random(B, K, seed=100 + K)
    ystar, value, obj = _run(y, p, h, device, objmax, gram, exact_max_k=16)
    np.testing.assert_allclose(value, obj, rtol=1e-9, atol=1e-12)
    for b in range(B):
        want, want_v = brute_force(y[b], p[b], h[b], objmax)
        np.testing.assert_allclose(ystar[b], want, rtol=1e-12, atol=1e-12, err_msg=f"row {b}")
        np.testing.assert_allclose(value[b], want_v, rtol=1e-9, atol=1e-12, err_msg=f"row {b}")
