"""Property-based tests (hypothesis) over every op and defense: random shapes, dtypes and
edge-case posteriors; outputs never NaN, on the simplex (1e-6), inside the ε-ball (1e-5);
NaN/Inf inputs and wrong shapes raise named errors."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ppoison_ext import ops, reference
from ppoison_ext.defenses import MAD, Blackbox, RandomNoise, ReverseSigmoid
from ppoison_ext.fuzzing import EDGE_KINDS, check_ball, check_simplex, edge_probs
from ppoison_ext.testing import IdentityLogits

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dtypes = st.sampled_from([torch.float32, torch.float64])
kinds = st.sampled_from(EDGE_KINDS)
sizes = st.tuples(st.integers(0, 6), st.integers(2, 300))
seeds = st.integers(0, 2**31 - 1)


def _probs(B, K, kind, dtype, seed):
    return edge_probs(B, K, kind, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(sizes, kinds, kinds, dtypes, seeds, st.sampled_from(list(ops.ORACLES)), st.booleans(),
       st.sampled_from(["fc", "dense", "identity"]), st.floats(0, 1e6))
def test_oracle_outputs_are_valid_vertices(size, ykind, pkind, dtype, seed, oracle, objmax, gram, hsq_scale):
    B, K = size
    if gram == "dense" and K > 64:
        K = 64
    y = _probs(B, K, ykind, dtype, seed)
    p = _probs(B, K, pkind, dtype, seed + 1)
    hsq = torch.rand(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype) * hsq_scale
    args = {"fc": {"p": p, "h_sqnorm": hsq}, "identity": {},
            "dense": {"gram": reference.jacobian_gram_fc(p.double(), hsq.double()).to(dtype)}}[gram]
    ystar, val = ops.mad_oracle(y, oracle=oracle, objmax=objmax, generator=torch.Generator().manual_seed(seed),
                                exact_max_k=12, **args)
    assert not check_simplex(ystar, 1e-5)
    assert torch.isfinite(val).all() and (val >= 0).all()
    if oracle == "argmax":
        assert torch.equal(ystar.argmax(-1), y.argmax(-1))
    obj, sobj = ops.mad_objective(ystar, y, **args)
    assert torch.isfinite(obj).all() and torch.isfinite(sobj).all() and (obj <= 4).all()


@SETTINGS
@given(sizes, kinds, kinds, dtypes, seeds, st.sampled_from(list(ops.YDISTS)),
       st.floats(0, 3, allow_subnormal=False))
def test_step_stays_on_simplex_and_in_ball(size, ykind, skind, dtype, seed, ydist, eps):
    B, K = size
    y = _probs(B, K, ykind, dtype, seed)
    ys = _probs(B, K, skind, dtype, seed + 7)
    out = ops.mad_step(y, ys, eps, ydist)
    assert not check_simplex(out)
    assert not check_ball(y, out, eps, ydist)
    if eps == 0:
        assert torch.equal(out, y)


@SETTINGS
@given(sizes, dtypes, seeds, st.floats(1e-6, 1e3), st.floats(1e-30, 1e6))
def test_projections(size, dtype, seed, radius, scale):
    B, K = size
    v = (torch.randn(B, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)
    x = ops.project_simplex(v, radius)
    assert torch.isfinite(x).all() and (x >= 0).all()
    if B:
        assert ((x.double().sum(-1) - radius).abs() <= 1e-5 * radius + 1e-6 * scale * K).all()
    z = ops.project_l1_ball(v, radius)
    assert torch.isfinite(z).all()
    assert (z.double().abs().sum(-1) <= radius * (1 + 1e-5) + 1e-6 * scale * K).all()


_Logits = IdentityLogits


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5), st.integers(2, 120), seeds, st.sampled_from(list(ops.ORACLES)),
       st.sampled_from(list(ops.YDISTS)), st.booleans(), st.floats(0, 2), st.floats(1, 1e4),
       st.sampled_from(["linesearch", "projections"]))
def test_mad_defense_guarantees(B, K, seed, oracle, ydist, objmax, eps, logit_scale, optim):
    if optim == "projections" and ydist == "kl":
        optim = "linesearch"
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    victim = _Logits(K)
    proxy = nn.Sequential(nn.Linear(K, 8), nn.ReLU(), nn.Linear(8, K))
    x = torch.randn(B, K, generator=g) * logit_scale
    out = MAD(victim, epsilon=eps, proxy=proxy, oracle=oracle, ydist=ydist, objmax=objmax, optim=optim,
              seed=seed).perturb(x)
    assert not check_simplex(out.y_prime)
    assert not check_ball(out.y, out.y_prime, eps, ydist)
    assert torch.isfinite(out.obj).all() and torch.isfinite(out.sobj).all()
    if oracle == "argmax":
        assert torch.equal(out.y_prime.argmax(1), out.y.argmax(1))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(2, 60), seeds, st.floats(1, 1e3))
def test_baseline_defenses_are_finite(B, K, seed, logit_scale):
    g = torch.Generator().manual_seed(seed)
    victim = _Logits(K)
    x = torch.randn(B, K, generator=g) * logit_scale
    for d in [Blackbox(victim), Blackbox(victim, topk=1, rounding=0), ReverseSigmoid(victim, beta=0.5, gamma=0.5),
              RandomNoise(victim, epsilon_z=1.0, dist_z="l1", seed=seed),
              RandomNoise(victim, epsilon_z=1.0, dist_z="l2", strat="gaussian", seed=seed)]:
        y = d(x)
        assert torch.isfinite(y).all(), d


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 50), seeds, st.sampled_from([math.nan, math.inf, -math.inf]),
       st.sampled_from(["y", "p", "y_star", "v", "gram", "h_sqnorm"]))
def test_nonfinite_inputs_raise_named_errors(B, K, seed, bad, where):
    y = _probs(B, K, "softmax", torch.float32, seed)
    p = _probs(B, K, "softmax", torch.float32, seed + 1)
    i, j = seed % B, seed % K
    target = {"y": y, "p": p, "y_star": p, "v": y, "gram": None, "h_sqnorm": None}[where]
    if where == "gram":
        M = reference.jacobian_gram_fc(p, torch.ones(B))
        M[i, j, j] = bad
        with pytest.raises(ValueError, match="gram"):
            ops.mad_oracle(y, gram=M)
        return
    if where == "h_sqnorm":
        h = torch.ones(B)
        h[i] = bad
        with pytest.raises(ValueError, match="h_sqnorm"):
            ops.mad_oracle(y, p=p, h_sqnorm=h)
        return
    target[i, j] = bad
    with pytest.raises(ValueError, match=where if where != "y_star" else "y_star"):
        if where == "y":
            ops.mad_oracle(y, p=p, oracle="extreme")
        elif where == "p":
            ops.mad_oracle(y, p=p, objmax=True)
        elif where == "y_star":
            ops.mad_step(y, p, 0.1, "l2")
        else:
            ops.project_simplex(y)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=0, max_size=4))
def test_wrong_shapes_raise_named_errors(shape):
    t = torch.rand(*shape) if shape else torch.rand(())
    if t.dim() == 2 and t.shape[1] >= 2:
        return  # a valid [B, K]
    with pytest.raises(ValueError, match=r"y must have|y must have at least 2 classes"):
        ops.mad_oracle(t)
    if t.dim() != 2:
        with pytest.raises(ValueError, match="v must have shape"):
            ops.project_simplex(t)
