"""ModelGuard defenses (field-defenses.md §6): ModelGuard-W against the per-row HiGHS LP,
ModelGuard-S against a sequential per-query port, the §6.6 minimum tests (golden streams,
frozen lookups, Reverse Sigmoid MG values, top-1/rounding), the factory, bad input, and an
interrupted-and-resumed transfer run with the stateful ModelGuard-S."""

import numpy as np
import pytest
import torch
from original_modelguard import SequentialQuantizer, mld_lp
from torch import nn

from ppoison_ext.attacks import KnockoffNets
from ppoison_ext.defenses import Blackbox, ModelGuardS, ModelGuardW, ReverseSigmoid, build_defense
from ppoison_ext.models import get_net


class Logits(nn.Module):
    """A victim whose logits are its input, so y = softmax(x); x = log y gives y back."""

    def __init__(self, K):
        super().__init__()
        self.fc = nn.Linear(K, K, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(K))

    def forward(self, x):
        return self.fc(x)


def _log(y):
    return torch.as_tensor(y, dtype=torch.float32).clamp(min=1e-30).log()


# ------------------------------------------------------------------------------------------
# ModelGuard-W


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("K", [10, 100])
def test_mgw_matches_per_row_lp(device, eps, K):
    torch.manual_seed(K)
    x = torch.randn(24, K) * 3
    d = ModelGuardW(Logits(K).to(device), epsilon=eps)
    out = d.perturb(x.to(device))
    y, yp = out.y.double().cpu(), out.y_prime.double().cpu()
    # on the simplex, inside the budget, top-1 kept (float32 release)
    assert (yp >= 0).all()
    torch.testing.assert_close(yp.sum(-1), torch.ones(24, dtype=torch.float64), rtol=0, atol=2e-6)
    assert ((yp - y).abs().sum(-1) <= eps + 2e-6).all()
    assert torch.equal(out.y_prime.argmax(-1), out.y.argmax(-1))
    for b in range(24):
        xl, ol, status = mld_lp(out.y[b].double().cpu().numpy(), eps)
        assert status == 0
        assert abs(float(out.obj[b]) - ol) <= 2e-6 * max(1.0, abs(ol))
        np.testing.assert_allclose(yp[b].numpy(), xl, rtol=0, atol=1e-5)


def test_mgw_factory_and_defaults():
    v = Logits(5)
    d = build_defense("modelguard_w", "epsilon:1.0,ydist:l1,batch_constraint:0", model=v)
    assert isinstance(d, ModelGuardW) and d.hparams() == {"epsilon": 1.0, "ydist": "l1", "batch_constraint": 0}
    x = torch.randn(7, 5)
    torch.testing.assert_close(d(x), ModelGuardW(v, epsilon=1.0)(x))
    with pytest.raises(ValueError, match="epsilon"):
        build_defense("modelguard_w", "", model=v)
    with pytest.raises(ValueError, match="unknown key"):
        build_defense("modelguard_w", "epsilon:1,beta:2", model=v)


@pytest.mark.parametrize("kw, err", [
    ({"epsilon": -1.0}, ValueError), ({"epsilon": float("nan")}, ValueError), ({"epsilon": "1"}, TypeError),
    ({"epsilon": 1.0, "ydist": "l3"}, ValueError), ({"epsilon": 1.0, "batch_constraint": 1}, ValueError),
    ({"epsilon": 1.0, "batch_constraint": True}, TypeError),
])
def test_mgw_bad_arguments(kw, err):
    with pytest.raises(err):
        ModelGuardW(Logits(3), **kw)


def test_mgw_bad_input():
    d = ModelGuardW(Logits(4), epsilon=1.0)
    with pytest.raises(ValueError, match="NaN"):
        d(torch.full((2, 4), float("nan")))
    with pytest.raises(ValueError):
        d.get_yprime(torch.ones(4))  # not [B, K]
    with pytest.raises(ValueError):
        d.get_yprime(-torch.ones(2, 4))
    with pytest.raises(TypeError):
        d("not a tensor")


def test_mgw_infeasible_rows_counted():
    d = ModelGuardW(Logits(3), epsilon=1e-6)
    y = torch.tensor([[0.45, 0.45, 0.1]], dtype=torch.float64)
    x, _, feas = d.get_yprime(y)
    assert not feas[0] and torch.equal(x, y)
    d.defend(None, y)
    assert d.infeasible_count == 1


# ------------------------------------------------------------------------------------------
# ModelGuard-S

STREAM = [(0.8, 0.1, 0.1), (0.6, 0.3, 0.1), (0.4, 0.35, 0.25), (0.34, 0.33, 0.33), (0.1, 0.8, 0.1)]


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_mgs_golden_stream(batch):
    ys = torch.tensor(STREAM, dtype=torch.float64)
    for eps, want in ((0.5, [0, 0, 2, 2, 4]), (1.0, [0, 0, 0, 0, 4])):
        q = ModelGuardS(Logits(3), epsilon=eps)
        out = torch.cat([q.quantize(ys[i:i + batch]) for i in range(0, 5, batch)])
        assert torch.equal(out, ys[want])
    assert q.num_centroids == 2


def test_mgs_through_the_victim():
    ys = torch.tensor(STREAM)
    q = ModelGuardS(Logits(3), epsilon=0.5)
    out = q.perturb(_log(ys))
    torch.testing.assert_close(out.y_prime, out.y[[0, 0, 2, 2, 4]], rtol=0, atol=0)
    assert torch.equal(out.y_prime.argmax(-1), out.y.argmax(-1))
    assert torch.equal(q(_log(ys)), out.y_prime)  # the same inputs keep their answers


@pytest.mark.parametrize("ydist, eps, K", [("l1", 0.5, 3), ("l1", 0.3, 5), ("l2", 0.2, 4), ("l1", 1.0, 10)])
def test_mgs_batched_equals_sequential(ydist, eps, K):
    """§6.2: 10⁴ random queries in random batch sizes, batched vs one at a time."""
    rng = np.random.default_rng(K)
    ys = torch.from_numpy(rng.dirichlet(np.ones(K), size=10_000)).float()
    ref = SequentialQuantizer(eps, ydist)
    want = torch.from_numpy(np.stack([ref(y) for y in ys.numpy()]))
    q = ModelGuardS(Logits(K), epsilon=eps, ydist=ydist)
    got, i = [], 0
    while i < len(ys):
        n = int(rng.integers(1, 300))
        got.append(q.quantize(ys[i:i + n]))
        i += n
    got = torch.cat(got)
    assert torch.equal(got, want)
    assert q.num_centroids == sum(len(b) for b in ref.banks.values())
    assert torch.equal(got.argmax(-1), ys.argmax(-1))
    p = 1 if ydist == "l1" else 2
    assert (torch.linalg.vector_norm(got.double() - ys.double(), ord=p, dim=-1) <= eps + 1e-12).all()


def test_mgs_frozen_returns_nearest():
    q = ModelGuardS(Logits(3), epsilon=0.1)
    bank = torch.tensor([[0.8, 0.1, 0.1], [0.5, 0.3, 0.2]], dtype=torch.float64)
    q.quantize(bank)
    assert q.num_centroids == 2
    probe = torch.tensor([[0.55, 0.4, 0.05], [0.75, 0.12, 0.13], [0.1, 0.8, 0.1]], dtype=torch.float64)
    frozen = ModelGuardS(Logits(3), epsilon=0.1, frozen=True)
    frozen.load_resume_state(q.resume_state())
    out = frozen.quantize(probe)
    # none within 0.1 → nearest; within → first valid; class without centroids → y itself
    assert torch.equal(out, torch.stack([bank[1], bank[0], probe[2]]))
    assert frozen.num_centroids == 2
    ref = SequentialQuantizer(0.1)
    for y in bank.numpy():
        ref(y)
    assert torch.equal(out, torch.from_numpy(np.stack([ref.frozen(y) for y in probe.numpy()])))


def test_mgs_state_reseed_reset_and_factory():
    v = Logits(3)
    q = build_defense("modelguard_s", "epsilon:1.0,ydist:l1,optim:0,frozen:0,ordered_quantization:1", model=v)
    assert isinstance(q, ModelGuardS) and q.hparams() == {"epsilon": 1.0, "ydist": "l1", "frozen": False}
    q(_log(torch.tensor(STREAM)))
    n = q.num_centroids
    q.reseed(123)  # deterministic defense: the banks are state, not randomness
    assert q.num_centroids == n
    st = q.resume_state()
    other = ModelGuardS(v, epsilon=1.0)
    other.load_resume_state(st)
    x = torch.randn(50, 3)
    assert torch.equal(other(x), q(x))
    q.load_resume_state(None)
    assert q.num_centroids == 0 and q.call_count == 0
    q.reset()
    with pytest.raises(ValueError, match="optim"):
        build_defense("modelguard_s", "optim:1", model=v)
    with pytest.raises(ValueError, match="ordered"):
        build_defense("modelguard_s", "ordered_quantization:0", model=v)


@pytest.mark.parametrize("kw, err", [
    ({"epsilon": -0.5}, ValueError), ({"epsilon": float("inf")}, ValueError), ({"ydist": "kl"}, ValueError),
    ({"frozen": 1}, TypeError), ({"epsilon": None}, TypeError),
])
def test_mgs_bad_arguments(kw, err):
    with pytest.raises(err):
        ModelGuardS(Logits(3), **kw)


def test_mgs_bad_input():
    q = ModelGuardS(Logits(3))
    with pytest.raises(ValueError, match="NaN"):
        q.quantize(torch.tensor([[float("nan"), 0.5, 0.5]]))
    with pytest.raises(ValueError):
        q.quantize(torch.ones(3))
    with pytest.raises(TypeError):
        q.quantize(torch.ones(2, 3, dtype=torch.long))
    q.quantize(torch.tensor([[0.5, 0.3, 0.2]]))
    with pytest.raises(ValueError, match="K=3"):
        q.quantize(torch.full((1, 4), 0.25))


class _Images(torch.utils.data.Dataset):
    def __init__(self, n=96):
        g = torch.Generator().manual_seed(5)
        self.data = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        self.targets = [0] * n

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i].float().div(255).unsqueeze(0), 0


def test_mgs_resumed_transfer_equals_uninterrupted(tmp_path):
    """The transfer step snapshots the banks after every batch: a run killed mid-way and resumed
    with a fresh defense releases exactly what the uninterrupted run releases."""
    torch.manual_seed(0)
    victim = get_net("lenet", "mnist", num_classes=10).eval()
    qs = _Images()
    eps = 0.02  # an untrained LeNet's posteriors are close together: a small radius so banks grow

    def attack():
        return KnockoffNets(budget=96, batch_size=16, progress=False)

    full = attack().build_transferset(ModelGuardS(victim, epsilon=eps), qs, tmp_path / "full", resume=False)
    assert 1 < len(torch.unique(full.y, dim=0)) < 96  # some answers shared, some new

    d = ModelGuardS(victim, epsilon=eps)
    calls = {"n": 0}
    real = d.defend

    def dies_on_the_4th_batch(x, y):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(x, y)

    d.defend = dies_on_the_4th_batch
    with pytest.raises(KeyboardInterrupt):
        attack().build_transferset(d, qs, tmp_path / "cut", resume=False)
    resumed = attack().build_transferset(ModelGuardS(victim, epsilon=eps), qs, tmp_path / "cut", resume=True)
    assert torch.equal(resumed.y, full.y)


# ------------------------------------------------------------------------------------------
# §6.6: Reverse Sigmoid (MG version) and the top-1 / rounding truncations


@pytest.mark.parametrize("beta, want", [(0.1, (0.68652356, 0.20413692, 0.10933947)),
                                        (1.28, (0.5508934, 0.24577211, 0.20333448))])
def test_reverse_sigmoid_mg_golden(beta, want):
    # MG's reversesigmoid.py is our ReverseSigmoid (no clamp, renormalised): same formula
    rs = ReverseSigmoid(Logits(3), beta=beta, gamma=0.2)
    y = torch.tensor([[0.7, 0.2, 0.1]])
    torch.testing.assert_close(rs.defend(None, y).y_prime, torch.tensor([want]), rtol=0, atol=1e-6)


def test_top1_and_rounding_not_renormalised():
    y = torch.full((2, 256), 1.0 / 256)
    out = Blackbox(Logits(256), rounding=1).defend(None, y).y_prime
    assert torch.equal(out, torch.zeros(2, 256))  # every entry < 0.05 rounds to 0
    y = torch.tensor([[0.44, 0.31, 0.25]])
    assert torch.equal(Blackbox(Logits(3), topk=1, rounding=0).defend(None, y).y_prime, torch.tensor([[1., 0, 0]]))
    torch.testing.assert_close(Blackbox(Logits(3), rounding=1).defend(None, y).y_prime,
                               torch.tensor([[0.4, 0.3, 0.2]]))  # sums to 0.9
