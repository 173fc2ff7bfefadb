import pytest
import torch

import original_mad as orig
from ppoison_ext import ops, reference
from ppoison_ext.testing import PROB_KINDS, float_dtypes, make_probs, tol

DT_IDS = ["f32", "f64"]
YDISTS = ["l1", "l2", "kl"]


def _pair(B, K, kind, dtype, device, target="extreme"):
    g = torch.Generator().manual_seed(K + 31 * B)
    y = make_probs(B, K, kind, dtype=dtype, device=device, generator=g)
    if target == "vertex":  # argmax-preserving vertex
        ys, _ = ops.mad_oracle(y, oracle="argmax", exact_max_k=4 if K > 4 else 16)
    elif target == "interior":  # full support: KL can reach it
        ys = make_probs(B, K, "random", dtype=dtype, device=device, generator=g)
    else:
        ys, _ = ops.mad_oracle(y, oracle="argmin")
    return y, ys


def _dist(y, yt, ydist):
    y, yt = y.double(), yt.double()
    if ydist == "l1":
        return (y - yt).abs().sum(-1)
    if ydist == "l2":
        return (y - yt).norm(dim=-1)
    terms = torch.where(y > 0, y * (y.log() - yt.log()), torch.zeros_like(y))
    return terms.sum(-1)


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("target", ["extreme", "vertex", "interior"])
@pytest.mark.parametrize("K", [2, 10, 100])
@pytest.mark.parametrize("kind", PROB_KINDS)
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.1, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("ydist", YDISTS)
def test_matches_twin_and_stays_feasible(device, ydist, eps, kind, K, target, dtype):
    y, ys = _pair(16, K, kind, dtype, device, target)
    out = ops.mad_step(y, ys, eps, ydist)
    torch.testing.assert_close(out, reference.mad_step(y, ys, eps, ydist), **tol(dtype))
    # on the simplex and inside the ε-ball
    assert (out >= 0).all()
    torch.testing.assert_close(out.double().sum(-1), torch.ones(16, dtype=torch.float64, device=device),
                               rtol=0, atol=1e-6)
    assert (_dist(y, out, ydist) <= eps + 1e-5).all()
    if eps == 0.0:
        assert torch.equal(out, y)


@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("ydist", YDISTS)
def test_matches_original_linesearch(ydist, eps):
    for dtype in float_dtypes:
        y, ys = _pair(20, 10, "random", dtype, "cpu", "interior" if ydist == "kl" else "extreme")
        out = ops.mad_step(y, ys, eps, ydist)
        for b in range(20):
            want = y[b] + orig.linesearch(y[b], ys[b], ydist, eps)
            torch.testing.assert_close(out[b], want, **tol(dtype, 5))


def test_kl_bisection_steps():
    y, ys = _pair(8, 10, "random", torch.float64, "cpu", "interior")
    coarse = ops.mad_step(y, ys, 0.05, "kl", kl_steps=2)
    fine = ops.mad_step(y, ys, 0.05, "kl", kl_steps=30)
    # more steps move closer to the boundary, never across it
    assert (_dist(y, fine, "kl") >= _dist(y, coarse, "kl") - 1e-12).all()
    assert (_dist(y, fine, "kl") <= 0.05 + 1e-12).all()
    none = ops.mad_step(y, ys, 0.05, "kl", kl_steps=0)
    reachable = _dist(y, ys, "kl") <= 0.05
    assert torch.equal(none[~reachable], y[~reachable])


def test_empty_and_non_contiguous(device):
    y, ys = _pair(6, 9, "random", torch.float32, device)
    assert ops.mad_step(y[:0], ys[:0], 0.5).shape == (0, 9)
    yt = torch.stack([y, y], 2)[:, :, 1]
    torch.testing.assert_close(ops.mad_step(yt, ys, 0.3, "l2"), ops.mad_step(y, ys, 0.3, "l2"))


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("ydist", YDISTS)
def test_opcheck(device, dtype, ydist):
    y, ys = _pair(5, 7, "random", dtype, device, "interior")
    torch.library.opcheck(torch.ops.ppoison.mad_step.default, (y, ys, 0.25, ydist, 15))
