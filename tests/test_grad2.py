"""GRAD2 against the double-backward port of GR's code (tests/original_grad2.py), the spec's
§1.10 minimum tests, the fc closed forms, batch coupling of MIN-IP, the factory, and GR's
baselines (§2.6)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import original_grad2 as orig
from ppoison_ext.defenses import (GRAD2, MADGR, DefenseSpec, RandomGR, ReverseSigmoidGR, build_defense,
                                  flatten_params, watermark_target)
from ppoison_ext.defenses.grad2_baselines import mad_gr_target, rand_gr_mix


class Linear(nn.Module):
    """A linear-softmax surrogate z = W h + b (the input is h)."""

    def __init__(self, D, K, bias=True):
        super().__init__()
        self.fc = nn.Linear(D, K, bias=bias)

    def forward(self, x):
        return self.fc(x)


class SmallCNN(nn.Module):
    def __init__(self, K=6):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 6 * 6, 12)
        self.fc = nn.Linear(12, K)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.fc(F.relu(self.fc1(h.flatten(1))))


def _cnn(seed, K=6, dtype=torch.float32):
    torch.manual_seed(seed)
    m = SmallCNN(K).to(dtype)
    with torch.no_grad():  # non-trivial running statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _x(B, dtype=torch.float32, seed=1):
    return torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _code_t(defense_target, surrogate, x, y):
    """GR's t (the code minimises ⟨g̃, t⟩) for our target names; None: MIN-IP."""
    if isinstance(defense_target, torch.Tensor):
        return -defense_target
    if defense_target == "all_ones":
        return -torch.ones(sum(p.numel() for p in surrogate.parameters()), dtype=x.dtype)
    if defense_target == "max_norm":
        return -flatten_params(surrogate)
    return None


def _close_c(got, want, rtol):
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)


# ---- coefficients ------------------------------------------------------------------------------

def test_linear_surrogate_coefficients_equal_the_double_backward():
    torch.manual_seed(0)
    B, K, D = 3, 5, 4
    s = Linear(D, K).double().eval()
    h = torch.randn(B, D, dtype=torch.float64)
    y = torch.softmax(torch.randn(B, K, dtype=torch.float64), 1)
    a = torch.randn(K * D + K, dtype=torch.float64)
    d = GRAD2(s, epsilon=0.5, surrogate=s, target=a)
    c = d.coefficients(h, y)
    want = orig.coefficients(h, y, s, -a)
    torch.testing.assert_close(c, want, rtol=0, atol=1e-9)
    # the closed form (1/B)(v − qᵀv·1), v = J t
    q = torch.softmax(s(h), 1)
    t = -a
    v = h @ t[:K * D].reshape(K, D).t() + t[K * D:]
    torch.testing.assert_close(c, (v - (q * v).sum(1, keepdim=True)) / B, rtol=0, atol=1e-12)
    # the fc closed forms give the same
    torch.testing.assert_close(GRAD2(s, epsilon=0.5, surrogate=s, target=a, jacobian="fc").coefficients(h, y),
                               want, rtol=0, atol=1e-9)
    # all-ones on a last layer: identically zero
    ones = GRAD2(s, epsilon=0.5, surrogate=s, target="all_ones").coefficients(h, y)
    assert float(ones.abs().max()) < 1e-12
    assert float(orig.coefficients(h, y, s, -torch.ones(K * D + K, dtype=torch.float64)).abs().max()) < 1e-12


@pytest.mark.parametrize("target", ["all_ones", "max_norm", "min_ip", "tensor"])
def test_full_network_jvp_equals_the_double_backward(target):
    s, victim = _cnn(0), _cnn(1)
    x = _x(16)
    with torch.no_grad():
        y = torch.softmax(victim(x), 1)
    tgt = torch.randn(sum(p.numel() for p in s.parameters()), generator=torch.Generator().manual_seed(2)) \
        if target == "tensor" else target
    d = GRAD2(victim, epsilon=0.5, surrogate=s, target=tgt)
    c = d.coefficients(x, y)
    want = orig.coefficients(x, y, s, _code_t(tgt, s, x, y))
    _close_c(c, want, 1e-4)
    # the allocations agree wherever the coefficient gaps exceed 1e-4·max|c|
    eps = [0.1, 0.5, 1.0]
    got = d.perturb_budgets(x, eps)
    ref = orig.grad2_per_sample(x, victim, s, eps, _code_t(tgt, s, x, y))
    srt = want.sort(1).values
    clear = ((srt[:, 1:] - srt[:, :-1]).min(1).values > 1e-4 * want.abs().max())
    assert clear.sum() >= 8
    torch.testing.assert_close(got[clear], ref[clear], rtol=0, atol=2e-5)


def test_min_ip_couples_the_batch_and_batch_independent_does_not():
    s, victim = _cnn(0), _cnn(1)
    x = _x(8)
    coupled = GRAD2(victim, epsilon=0.8, surrogate=s, target="min_ip")
    alone = GRAD2(victim, epsilon=0.8, surrogate=s, target="min_ip", batch_independent=True)
    with torch.no_grad():
        y = torch.softmax(victim(x), 1)
    # batch_independent: each sample's own double-backward c (B = 1)
    c_alone = alone.coefficients(x, y)
    want = torch.cat([orig.coefficients(x[n:n + 1], y[n:n + 1], s, None) for n in range(8)])
    _close_c(c_alone, want, 1e-4)
    torch.testing.assert_close(alone(x)[:3], alone(x[:3]), rtol=0, atol=1e-6)
    # the batch-coupled version: the answer to a query depends on its batch
    c_full = coupled.coefficients(x, y)[:3]
    c_part = coupled.coefficients(x[:3], y[:3])
    assert not torch.allclose(c_full * 8, c_part * 3, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("target", ["max_norm", "min_ip", "min_ip_alone", "tensor", "fc_tensor"])
def test_fc_closed_forms_equal_the_double_backward_on_the_last_layer(target):
    s, victim = _cnn(0, dtype=torch.float64), _cnn(1, dtype=torch.float64)
    x = _x(10, torch.float64)
    with torch.no_grad():
        y = torch.softmax(victim(x), 1)
    fc = [s.fc.weight, s.fc.bias]
    n_fc = sum(p.numel() for p in fc)
    P = sum(p.numel() for p in s.parameters())
    g = torch.Generator().manual_seed(4)
    kw = {"target": target}
    if target == "tensor":
        a = torch.randn(P, generator=g, dtype=torch.float64)
        kw["target"], t = a, -a[P - n_fc:]
    elif target == "fc_tensor":
        a = torch.randn(n_fc, generator=g, dtype=torch.float64)
        kw["target"], t = a, -a
    elif target == "max_norm":
        t = -torch.cat([p.detach().reshape(-1) for p in fc])
    else:
        kw = {"target": "min_ip", "batch_independent": target == "min_ip_alone"}
        t = None
    c = GRAD2(victim, epsilon=0.5, surrogate=s, jacobian="fc", **kw).coefficients(x, y)
    if target == "min_ip_alone":
        want = torch.cat([orig.coefficients(x[n:n + 1], y[n:n + 1], s, None, params=fc) for n in range(10)])
    else:
        want = orig.coefficients(x, y, s, t, params=fc)
    torch.testing.assert_close(c, want, rtol=1e-9, atol=1e-12)


def test_watermark_target_is_the_log_likelihood_gradient():
    s = _cnn(0, dtype=torch.float64)
    xw = _x(1, torch.float64, seed=9)
    yw = F.one_hot(torch.tensor([3]), 6).double()
    a = watermark_target(s, xw, yw)
    torch.testing.assert_close(a, orig.get_gty(xw, s, yw), rtol=0, atol=1e-12)
    victim = _cnn(1, dtype=torch.float64)
    out = GRAD2(victim, epsilon=2.0, surrogate=s, target=a)(xw)
    assert int(out.argmax()) == 3  # the watermark pair itself is pushed onto its own label


# ---- the defense --------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["all_ones", "max_norm", "min_ip"])
def test_defense_equals_the_per_sample_port_on_simplex_inside_budget(target):
    s, victim = _cnn(0, dtype=torch.float64), _cnn(1, dtype=torch.float64)
    x = _x(12, torch.float64)
    for eps in (0.0, 0.3, 1.0, 2.0):
        d = GRAD2(victim, epsilon=eps, surrogate=s, target=target)
        out = d(x)
        ref = orig.grad2_per_sample(x, victim, s, [eps], _code_t(target, s, x, None))[:, 0]
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
        y = torch.softmax(victim(x), 1)
        assert (out > 0).all()
        torch.testing.assert_close(out.sum(1), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)
        assert ((out - y).abs().sum(1) <= eps + 1e-12).all()


def test_perturb_budgets_and_float32():
    s, victim = _cnn(0), _cnn(1)
    x = _x(9)
    d = GRAD2(victim, epsilon=0.4, surrogate=s)
    many = d.perturb_budgets(x, [0.1, 0.4])
    assert many.shape == (9, 2, 6) and many.dtype == torch.float32
    torch.testing.assert_close(many[:, 1], d(x), rtol=0, atol=0)
    assert d.call_count == 18


def test_several_surrogates_are_drawn_from_the_seeded_generator():
    ss = [_cnn(i) for i in range(3)]
    victim = _cnn(7)
    x = _x(6)
    a = GRAD2(victim, epsilon=0.6, surrogate=ss, seed=3)
    b = GRAD2(victim, epsilon=0.6, surrogate=ss, seed=3)
    for _ in range(3):
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    a.reseed(3)
    b.reseed(3)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    # per sample: each row equals the single-surrogate answer of the surrogate it drew
    per = GRAD2(victim, epsilon=0.6, surrogate=ss, seed=5, batch_independent=True)
    out = per(x)
    pick = torch.randint(3, (6,), generator=torch.Generator().manual_seed(5))
    for n in range(6):
        one = GRAD2(victim, epsilon=0.6, surrogate=ss[int(pick[n])])(x[n:n + 1])
        torch.testing.assert_close(out[n:n + 1], one, rtol=0, atol=1e-6)


BAD = [
    ("negative epsilon", dict(epsilon=-0.1), ValueError, r"epsilon must be finite and >= 0"),
    ("nan epsilon", dict(epsilon=math.nan), ValueError, r"epsilon must be finite"),
    ("epsilon type", dict(epsilon="0.1"), TypeError, r"epsilon must be a real number"),
    ("target name", dict(target="all_zeros"), ValueError, r"target must be one of"),
    ("target type", dict(target=3), TypeError, r"target must be a str"),
    ("target shape", dict(target=torch.ones(3, 3)), ValueError, r"target tensor must be 1-D"),
    ("target size", dict(target=torch.ones(7)), ValueError, r"target tensor has 7 entries"),
    ("target nan", dict(target=torch.full((7,), math.nan)), ValueError, r"target tensor contains NaN"),
    ("target int", dict(target=torch.ones(7, dtype=torch.long)), TypeError, r"floating point"),
    ("jacobian", dict(jacobian="jvp"), ValueError, r"jacobian must be one of"),
    ("all_ones fc", dict(jacobian="fc"), ValueError, r"identically zero"),
    ("surrogate", dict(surrogate="net"), TypeError, r"surrogate must be a torch.nn.Module"),
    ("surrogates", dict(surrogate=[]), TypeError, r"surrogate must be a torch.nn.Module"),
    ("batch_independent", dict(batch_independent=1), TypeError, r"batch_independent must be a bool"),
    ("seed", dict(seed=1.5), TypeError, r"seed must be an int"),
]


@pytest.mark.parametrize("kw,exc,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_arguments_raise_a_named_error(kw, exc, message):
    s = _cnn(0)
    args = {"epsilon": 0.5, "surrogate": s, **kw}
    with pytest.raises(exc, match=message):
        GRAD2(_cnn(1), **args)


def test_fc_needs_a_linear_head():
    s = nn.Sequential(nn.Conv2d(1, 6, 8), nn.Flatten())
    d = GRAD2(_cnn(1), epsilon=0.5, surrogate=s, target="max_norm", jacobian="fc")
    with pytest.raises(ValueError, match="does not return the output of an nn.Linear"):
        d(_x(2))


def test_factory_builds_grad2_and_the_gr_baselines():
    s, victim = _cnn(0), _cnn(1)
    x = _x(4)
    d = build_defense("grad2", "epsilon:0.5,target:min_ip,batch_independent:True,jacobian:fc", model=victim,
                      proxy=s)
    assert isinstance(d, GRAD2) and d.batch_independent and d.jacobian == "fc" and d.target_name == "min_ip"
    assert d(x).shape == (4, 6)
    assert DefenseSpec.parse("grad2", "epsilon:0.5,seed:3").args == {"epsilon": 0.5, "seed": 3}
    with pytest.raises(ValueError, match="needs a surrogate"):
        build_defense("grad2", "epsilon:0.5", model=victim)
    with pytest.raises(ValueError, match="needs epsilon"):
        build_defense("grad2", "target:max_norm", model=victim, proxy=s)
    assert isinstance(build_defense("mad_gr", "epsilon:0.5", model=victim, proxy=s), MADGR)
    assert isinstance(build_defense("reverse_sigmoid_gr", "beta:0.1,gamma:0.2", model=victim), ReverseSigmoidGR)
    assert isinstance(build_defense("rand_gr", "epsilon:0.5,seed:1", model=victim), RandomGR)


# ---- GR's baselines (§2.6) ----------------------------------------------------------------------

def test_mad_gr_closed_form_equals_the_brute_force_over_fc_gradients():
    torch.manual_seed(0)
    K, D, B = 10, 7, 20
    s = Linear(D, K).double().eval()
    h = torch.randn(B, D, dtype=torch.float64)
    y = torch.softmax(3 * torch.randn(B, K, dtype=torch.float64), 1)
    q = torch.softmax(s(h), 1)
    k = mad_gr_target(y, q)
    for n in range(B):
        gy = orig.get_gty(h[n:n + 1], s, y[n:n + 1])
        best, arg = -0.1, None
        for j in range(K):
            gk = orig.get_gty(h[n:n + 1], s, F.one_hot(torch.tensor([j]), K).double())
            o = 1 - float(F.cosine_similarity(gk, gy, dim=0))
            if o >= best:
                best, arg = o, j
        assert int(k[n]) == arg
    # ties go to the last index: q uniform, y symmetric in classes 0 and 1
    qu = torch.full((1, 4), 0.25, dtype=torch.float64)
    yt = torch.tensor([[0.1, 0.1, 0.4, 0.4]], dtype=torch.float64)
    assert int(mad_gr_target(yt, qu)[0]) == 1


def test_mad_gr_moves_exactly_epsilon_with_alpha_unclamped():
    torch.manual_seed(0)
    s = Linear(7, 10).eval()
    victim = Linear(7, 10).eval()
    h = torch.randn(32, 7)
    y = torch.softmax(victim(h), 1).detach()
    for eps in (0.1, 0.5, 1.0):
        out = MADGR(victim, epsilon=eps, surrogate=s)(h)
        torch.testing.assert_close((out.double() - y.double()).abs().sum(1),
                                   torch.full((32,), eps, dtype=torch.float64), rtol=0, atol=1e-6)
    # α > 1 when p_k* > 1 − ε/2: the answer leaves the simplex, as in GR
    peaked = Linear(7, 10).eval()
    with torch.no_grad():
        peaked.fc.weight.zero_()
        peaked.fc.bias.copy_(torch.tensor([8.0] + [0.0] * 9))
    yp = torch.softmax(peaked(h), 1)
    surr = Linear(7, 10).eval()
    with torch.no_grad():
        surr.fc.weight.zero_()
        surr.fc.bias.copy_(torch.tensor([12.0] + [0.0] * 9))  # q_0 > p_0: e_0 − q opposes p − q, k* = 0
    k = mad_gr_target(yp, torch.softmax(surr(h), 1))
    assert (k == 0).all()
    out = MADGR(peaked, epsilon=1.0, surrogate=surr)(h)
    assert (out[:, 0] > 1).all() and (out < 0).any()


def test_reverse_sigmoid_gr_golden_values():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    victim = nn.Identity()
    for beta, want in ((0.1, [0.68782544, 0.20328918, 0.10888540]), (1.28, [0.5707013, 0.23493229, 0.1943664])):
        d = ReverseSigmoidGR(victim, beta=beta, gamma=0.2)
        d.victim_probs = lambda x: x  # the golden values start from p
        torch.testing.assert_close(d(p), torch.tensor([want]), rtol=0, atol=1e-6)


def test_rand_gr_distance_and_draws():
    p = torch.softmax(torch.randn(50, 10, generator=torch.Generator().manual_seed(0)), 1)
    u = torch.randint(10, (50,), generator=torch.Generator().manual_seed(1))
    for eps in (0.1, 0.5, 1.0):
        out = rand_gr_mix(p, u, eps)
        torch.testing.assert_close((out - p).abs().sum(1), eps * (1 - p[torch.arange(50), u]), rtol=0, atol=1e-6)
    d = RandomGR(nn.Identity(), epsilon=0.5, seed=0)
    drawn = torch.cat([d.draw(p) for _ in range(20)]).reshape(20, 50)
    assert (drawn != p.argmax(1)).all()
    assert len(drawn.unique()) == 10
    with pytest.raises(ValueError, match="<= 2"):
        RandomGR(nn.Identity(), epsilon=2.5)
