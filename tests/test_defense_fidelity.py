"""The batched MAD defense against a faithful per-sample port of the original algorithm.

For every oracle × ydist × objmax × ε ∈ {0.1, 0.5, 1.0}, on a LeNet proxy, a small
BatchNorm CNN proxy in train mode, and K ∈ {10, 26, 50, 100} heads, the released
posteriors must equal the original's to 1e-5.

Models run in float64 so that both sides evaluate objectives well beyond the gaps
between candidates; the float32 variant allows, and counts, float32 ties (the original's
own rounding deciding between candidates whose objectives agree to float32 precision).
"""

import itertools

import pytest
import torch
from torch import nn

import original_mad as orig
from ppoison_ext import ops
from ppoison_ext.defenses import MAD
from ppoison_ext.models import get_net

ORACLES = ["extreme", "argmax", "argmin", "random"]
YDISTS = ["l1", "l2", "kl"]
EPSILONS = [0.1, 0.5, 1.0]


class BNNet(nn.Module):
    """A small CNN with BatchNorm: its train-mode output depends on the batch."""

    def __init__(self, K=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 12, 5), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Linear(12 * 4 * 4, K)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class Head(nn.Module):
    """Features → ReLU → Linear(H, K): a last-layer head of K classes."""

    def __init__(self, K, D=32, H=64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, H), nn.ReLU())
        self.fc = nn.Linear(H, K)

    def forward(self, x):
        return self.fc(self.body(x))


def _setup(name, dtype):
    torch.manual_seed(hash(name) % 1000)
    if name == "lenet":
        victim, proxy = get_net("lenet", "mnist", num_classes=10), get_net("lenet", "mnist", num_classes=10)
        x = torch.randn(6, 1, 28, 28)
    elif name == "bn_train":
        victim, proxy = BNNet(), BNNet()
        x = torch.randn(6, 1, 28, 28)
        # make the BN statistics matter: non-trivial affine parameters
        for m in proxy.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    else:
        K = int(name[1:])
        victim, proxy = Head(K), Head(K)
        x = torch.randn(6, 32)
    victim, proxy = victim.to(dtype).eval(), proxy.to(dtype)
    proxy.train(name == "bn_train")
    if name != "bn_train":
        proxy.eval()
    # scale the victim's logits so its posteriors are spread over a few classes
    with torch.no_grad():
        last = [m for m in victim.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(4.0)
    return victim, proxy, x.to(dtype)


def _precompute(victim, proxy, x):
    """y (batched victim forward) and the original's explicit G per sample."""
    with torch.no_grad():
        y = torch.softmax(victim(x), dim=1)
    Gs = []
    for i in range(x.shape[0]):
        with torch.enable_grad():
            Gs.append(orig.compute_jacobian_nll(x[i:i + 1], proxy).detach())
    return y, Gs


MODELS = ["lenet", "bn_train", "k10", "k26", "k50", "k100"]


@pytest.mark.parametrize("model_name", MODELS)
def test_matches_original_per_sample(model_name):
    dtype = torch.float64
    victim, proxy, x = _setup(model_name, dtype)
    state = {k: v.clone() for k, v in proxy.state_dict().items()}
    y, Gs = _precompute(victim, proxy, x)
    proxy.load_state_dict(state)  # the original's per-query forwards updated BN running stats
    K = y.shape[1]
    eye = torch.eye(K, dtype=dtype)
    failures = []
    for oracle, ydist, objmax, eps in itertools.product(ORACLES, YDISTS, [False, True], EPSILONS):
        seed = 7
        mad = MAD(victim, epsilon=eps, proxy=proxy, oracle=oracle, ydist=ydist, objmax=objmax, exact_max_k=10,
                  seed=seed)
        out = mad.perturb(x)
        rand_ks = torch.randint(K, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
        for i in range(x.shape[0]):
            G = eye if oracle in ("random", "argmin") else Gs[i]
            delta, obj, sobj = orig.calc_delta(G, y[i], oracle=oracle, objmax=objmax, ydist=ydist, epsilon=eps,
                                               exact_max_k=10, rand_k=rand_ks[i])
            want = y[i] + delta
            if not torch.allclose(out.y_prime[i], want, rtol=0, atol=1e-5):
                failures.append((oracle, ydist, objmax, eps, i, (out.y_prime[i] - want).abs().max().item()))
                continue
            if torch.isfinite(obj):
                torch.testing.assert_close(out.obj[i], obj.to(dtype), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out.sobj[i], sobj.to(dtype), rtol=1e-6, atol=1e-9)
    assert not failures, failures[:10]


@pytest.mark.parametrize("model_name", ["lenet", "bn_train", "k26", "k100"])
def test_matches_original_float32_up_to_float32_ties(model_name):
    victim, proxy, x = _setup(model_name, torch.float32)
    state = {k: v.clone() for k, v in proxy.state_dict().items()}
    y, Gs = _precompute(victim, proxy, x)
    proxy.load_state_dict(state)
    K = y.shape[1]
    total = ties = 0
    for oracle, ydist, objmax in itertools.product(["extreme", "argmax"], YDISTS, [False, True]):
        mad = MAD(victim, epsilon=0.5, proxy=proxy, oracle=oracle, ydist=ydist, objmax=objmax, exact_max_k=10)
        out = mad.perturb(x)
        for i in range(x.shape[0]):
            total += 1
            delta, _, _ = orig.calc_delta(Gs[i], y[i], oracle=oracle, objmax=objmax, ydist=ydist, epsilon=0.5,
                                          exact_max_k=10)
            want = y[i] + delta
            if torch.allclose(out.y_prime[i], want, rtol=0, atol=1e-5):
                continue
            # a different target: both must score the same to float32 precision, ours no worse
            ties += 1
            if oracle == "extreme":
                theirs, _ = orig.oracle_extreme(Gs[i], y[i], objmax)
            else:
                theirs, _ = orig.oracle_argmax_preserving(Gs[i], y[i], objmax, exact_max_k=10)
            ours, _ = ops.mad_oracle(y[i:i + 1], gram=(Gs[i] @ Gs[i].t())[None], oracle=oracle, objmax=objmax,
                                     exact_max_k=10)
            G, yd = Gs[i].double(), y[i].double()
            angular = objmax or (oracle == "argmax" and K > 10)
            f = orig.calc_objective if angular else orig.calc_surrogate_objective
            if angular and oracle == "argmax" and K > 10:
                yd = (yd + 1e-8) / (yd + 1e-8).sum()
            v_ours, v_theirs = float(f(ours[0].double(), yd, G)), float(f(theirs.double(), yd, G))
            scale = max(1.0, abs(v_theirs))
            assert v_ours >= v_theirs - 1e-9 * scale, (oracle, ydist, objmax, i, v_ours, v_theirs)
            assert v_ours - v_theirs <= 1e-5 * scale, (oracle, ydist, objmax, i, v_ours, v_theirs)
    assert ties <= max(1, total // 50), f"{ties} of {total} queries differ"


def test_eps_zero_returns_y_exactly():
    victim, proxy, x = _setup("k10", torch.float32)
    for oracle in ORACLES:
        out = MAD(victim, epsilon=0.0, proxy=proxy, oracle=oracle).perturb(x)
        assert torch.equal(out.y_prime, out.y)
