"""Property-based tests (hypothesis) over every op and defense: random shapes, dtypes and
edge-case posteriors; outputs never NaN, on the simplex (1e-6), inside the ε-ball (1e-5);
NaN/Inf inputs and wrong shapes raise named errors. The field defenses (GRAD², Adaptive
Misinformation, ModelGuard-W/-S, GR's baselines) are checked for what each promises, by the
checks in tests/field_properties.py (shared with tools/fuzz.py), with K from 2 to 64 and 1000."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import field_properties as fp
from ppoison_ext import ops, reference
from ppoison_ext.defenses import (GRAD2, MAD, MADGR, AdaptiveMisinformation, Blackbox, ModelGuardS,
                                  ModelGuardW, RandomGR, RandomNoise, ReverseSigmoid, ReverseSigmoidGR)
from ppoison_ext.defenses.grad2_baselines import mad_gr_target
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


# ---- the field defenses -----------------------------------------------------------------------

FIELD = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
field_ks = st.one_of(st.integers(2, 64), st.sampled_from([2, 1000]))
eps_l1 = st.sampled_from([0.0, 1e-4, 0.1, 0.5, 1.0, 2.0, 2.5])


def _rows(B, K, kind, dtype, seed):
    return _probs(B, K, kind, dtype, seed)


@FIELD
@given(st.integers(1, 6), field_ks, kinds, dtypes, seeds, eps_l1, st.sampled_from(fp.GRAD2_TARGETS),
       st.sampled_from(["full", "fc"]), st.booleans(), st.sampled_from([1, 1, 3]))
def test_grad2_guarantees(B, K, kind, dtype, seed, eps, target, jacobian, per_sample, surrogates):
    """On the simplex, within ε in L1, the same answers for the same seed (several surrogates)."""
    assert fp.grad2_problems(_rows(B, K, kind, dtype, seed), eps, target, jacobian, per_sample, surrogates,
                             seed % 1000) == []


@FIELD
@given(st.integers(1, 6), field_ks, kinds, dtypes, seeds, st.sampled_from(fp.AM_VARIANT_NAMES),
       st.floats(-0.5, 1.5), st.booleans(), st.sampled_from([1.0, 0.3, 4.0]), st.booleans())
def test_adaptive_misinformation_guarantees(B, K, kind, dtype, seed, variant, tau, adaptive, temperature,
                                            score):
    """Every variant: on the simplex, α in [0, 1], ỹ between y and ŷ, exact at α = 0 and 1."""
    if not adaptive:
        tau = min(max(tau, 0.0), 1.0)
    score = score and variant == "grad2"  # only GRAD²'s variant takes a score model
    assert fp.am_problems(_rows(B, K, kind, dtype, seed), tau, variant, adaptive, temperature, score,
                          seed % 1000) == []


@FIELD
@given(st.integers(1, 6), field_ks, kinds, dtypes, seeds, st.one_of(eps_l1, st.floats(0, 2.5)))
def test_modelguard_w_guarantees(B, K, kind, dtype, seed, eps):
    """On the simplex, within ε in L1, top-1 kept with its 1e-4 margin (or y unchanged and counted)."""
    assert fp.modelguard_w_problems(_rows(B, K, kind, dtype, seed), eps) == []


@FIELD
@given(st.integers(1, 12), field_ks, kinds, kinds, dtypes, seeds, st.one_of(eps_l1, st.floats(0, 2.5)),
       st.sampled_from(["l1", "l2"]), st.integers(0, 12))
def test_modelguard_s_guarantees(B, K, kind, kind2, dtype, seed, eps, ydist, cut):
    """Answers are earlier queries of the same top-1 class within ε; batching does not matter;
    frozen answers come from the banks."""
    y = _rows(B, K, kind, dtype, seed)
    y = torch.cat([y, y.flip(0)])  # repeated queries: some answers come from the banks
    y_next = _rows(B, K, kind2, dtype, seed + 1)
    assert fp.modelguard_s_problems(y, eps, ydist, y_next, min(cut, 2 * B)) == []


@FIELD
@given(st.integers(1, 6), field_ks, kinds, dtypes, seeds, eps_l1)
def test_mad_gr_guarantees(B, K, kind, dtype, seed, eps):
    """‖ỹ − y‖₁ = ε towards the target class (y itself at that vertex); off the simplex only for α > 1."""
    assert fp.mad_gr_problems(_rows(B, K, kind, dtype, seed), eps, seed % 1000) == []


@FIELD
@given(st.integers(1, 6), field_ks, kinds, dtypes, seeds, st.floats(0, 5), st.floats(0, 2))
def test_reverse_sigmoid_gr_guarantees(B, K, kind, dtype, seed, beta, gamma):
    assert fp.reverse_sigmoid_gr_problems(_rows(B, K, kind, dtype, seed), beta, gamma) == []


@FIELD
@given(st.integers(1, 6), field_ks, kinds, dtypes, seeds,
       st.one_of(st.sampled_from([0.0, 2.0]), st.floats(0, 2)))
def test_random_gr_guarantees(B, K, kind, dtype, seed, eps):
    """On the simplex for ε ≤ 2, ‖ỹ − y‖₁ = ε(1 − y_u) with u ≠ top-1, the same draws for the same seed."""
    assert fp.random_gr_problems(_rows(B, K, kind, dtype, seed), eps, seed % 1000) == []


def test_field_defenses_at_one_class():
    """K = 1: GRAD², ModelGuard-W and RandomGR refuse it with a ValueError saying why; the others
    release the only posterior there is, 1."""
    v, net = fp.victim(1, torch.float32), fp.small_net(1, torch.float32, 0)
    x = torch.randn(3, 1)
    for d in (GRAD2(v, epsilon=0.5, surrogate=net), GRAD2(v, epsilon=0.5, surrogate=net, target="min_ip"),
              ModelGuardW(v, epsilon=0.5)):
        with pytest.raises(ValueError, match="at least 2 classes"):
            d(x)
    with pytest.raises(ValueError, match="needs K >= 2 classes"):
        RandomGR(v, epsilon=0.5, seed=0)(x)
    for d in (AdaptiveMisinformation(v, misinformation_model=net, tau=0.5), ModelGuardS(v, epsilon=0.5),
              ModelGuardS(v, epsilon=0.5, frozen=True), MADGR(v, epsilon=0.5, surrogate=net),
              ReverseSigmoidGR(v, beta=0.5)):
        assert torch.equal(d(x), torch.ones(3, 1)), d


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 3.8e-27), (torch.float64, 3.8e-27),
                                        (torch.float64, 1e-310)])
def test_mad_gr_moves_epsilon_from_a_nearly_one_hot_row(dtype, tiny):
    """Regression (fuzz): for y = (0, 3.8e-27, 1), ‖y − e_2‖₁ = 3.8e-27 and α ≈ ε·2.6e26; the
    form (1 − α)y + α e_2 cancelled to 0 at the top class, releasing (0, −ε, 0) at L1 distance
    1 + ε instead of ε. At a subnormal distance (1e-310) α = ε/max(dist, 1e-300) moved y by
    1e-10·ε only (and ε/dist itself overflows there)."""
    y = torch.tensor([[0.0, tiny, 1.0]], dtype=dtype)
    surr = nn.Linear(3, 3).to(dtype)
    with torch.no_grad():
        surr.weight.zero_()
        surr.bias.copy_(torch.tensor([0.0, 0.0, 1000.0]))  # q = e_2: k* = 2 (ties 0 and 2 go to the last)
    assert int(mad_gr_target(y, torch.softmax(surr(y), 1))[0]) == 2
    d = MADGR(nn.Identity(), epsilon=0.5, surrogate=surr)
    out = d.defend(y, y).y_prime
    assert out[0, 2] == 1.0 and out[0, 1] < 0
    assert abs(float((out.double() - y.double()).abs().sum()) - 0.5) < 1e-6
    assert torch.equal(MADGR(nn.Identity(), epsilon=0.0, surrogate=surr).defend(y, y).y_prime, y)  # ε = 0: y
    assert fp.mad_gr_problems(torch.tensor([[0.0, tiny, 1.0]] * 4, dtype=dtype), 0.5) == []
