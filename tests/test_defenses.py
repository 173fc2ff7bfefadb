import itertools
import math
import threading

import numpy as np
import pytest
import torch
from torch import nn

from ppoison_ext.checkpoint import save_checkpoint

from ppoison_ext.fileio import atomic_write_json
from ppoison_ext.defenses import (MAD, Blackbox, Defense, ProxyView, QueryLogger, RandomNoise, ReverseSigmoid,
                                  build_defense, parse_defense_args, read_queries)
from ppoison_ext.defenses.querylog import DISTANCE_COLUMNS
from ppoison_ext.models import get_net
from ppoison_ext.testing import IdentityLogits


Logits = IdentityLogits


def _adversarial_logits(B, K, g):
    kinds = [
        torch.randn(B, K, generator=g) * 3,  # ordinary
        torch.randn(B, K, generator=g) * 1e3,  # one-hot with exact zeros
        torch.zeros(B, K),  # uniform
        torch.randint(0, 2, (B, K), generator=g).float() * 50,  # ties at the top, zeros elsewhere
        torch.full((B, K), -1e4).scatter(1, torch.randint(K, (B, 1), generator=g), 1e4),  # exact one-hot
        torch.randn(B, K, generator=g) * 40 - 80,  # tiny entries
    ]
    return torch.cat(kinds)


def _dist(y, yp, ydist):
    y, yp = y.double(), yp.double()
    if ydist == "l1":
        return (y - yp).abs().sum(1)
    if ydist == "l2":
        return (y - yp).norm(dim=1)
    return torch.where(y > 0, y * (y.log() - yp.log()), torch.zeros_like(y)).sum(1)


@pytest.mark.parametrize("K", [2, 10, 26, 100])
@pytest.mark.parametrize("optim", ["linesearch", "projections"])
def test_mad_guarantees_on_adversarial_inputs(device, K, optim):
    g = torch.Generator().manual_seed(K)
    victim = Logits(K).to(device)
    proxy = nn.Sequential(nn.Linear(K, 16), nn.ReLU(), nn.Linear(16, K)).to(device)
    x = _adversarial_logits(8, K, g).to(device)
    ydists = ["l1", "l2"] if optim == "projections" else ["l1", "l2", "kl"]
    for oracle, ydist, objmax, eps in itertools.product(["extreme", "argmax", "argmin", "random"], ydists,
                                                       [False, True], [0.0, 0.05, 0.5, 2.0]):
        out = MAD(victim, epsilon=eps, proxy=proxy, oracle=oracle, ydist=ydist, objmax=objmax, optim=optim,
                  seed=1).perturb(x)
        yp, y = out.y_prime, out.y
        case = (oracle, ydist, objmax, eps)
        assert torch.isfinite(yp).all() and torch.isfinite(out.obj).all() and torch.isfinite(out.sobj).all(), case
        assert (yp >= 0).all(), case
        assert ((yp.double().sum(1) - 1).abs() <= 1e-6).all(), case
        assert (_dist(y, yp, ydist) <= eps + 1e-5).all(), case
        if eps == 0.0:
            assert torch.equal(yp, y), case
        if oracle == "argmax":
            assert torch.equal(yp.argmax(1), y.argmax(1)), case


def test_mad_random_oracle_is_seeded():
    victim, proxy = Logits(10), Logits(10)
    x = torch.randn(64, 10)
    a = MAD(victim, epsilon=0.5, proxy=proxy, oracle="random", seed=3)(x)
    b = MAD(victim, epsilon=0.5, proxy=proxy, oracle="random", seed=3)(x)
    c = MAD(victim, epsilon=0.5, proxy=proxy, oracle="random", seed=4)(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


class BNProxy(nn.Module):
    def __init__(self, K=10, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * 26 * 26, K)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


def test_proxy_view_batches_train_mode_like_single_queries():
    proxy = BNProxy().train()
    with torch.no_grad():
        proxy.bn.weight.uniform_(0.5, 2)
        proxy.bn.bias.uniform_(-1, 1)
    state = {k: v.clone() for k, v in proxy.state_dict().items()}
    x = torch.randn(5, 1, 28, 28)
    view = ProxyView(proxy)
    with torch.no_grad():
        batched, h = view.forward_with_features(x)
    # the proxy's parameters and running statistics are untouched
    for k, v in proxy.state_dict().items():
        assert torch.equal(v, state[k]), k
    with torch.no_grad():
        single = torch.cat([proxy(x[i:i + 1]) for i in range(5)])
        naive = proxy(x)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(naive, single, atol=1e-3)  # a plain batched forward would differ
    assert h.shape == (5, 4 * 26 * 26)
    # eval mode: the plain forward
    proxy.load_state_dict(state)
    proxy.eval()
    with torch.no_grad():
        torch.testing.assert_close(view(x), proxy(x))


def test_proxy_dropout_is_active_in_train_mode():
    proxy = BNProxy(dropout=0.5).train()
    view = ProxyView(proxy)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(view(x), view(x))
        proxy.eval()
        assert torch.equal(view(x), view(x))


def test_fc_jacobian_needs_a_linear_head():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(10, 10)

        def forward(self, x):
            return 2 * self.fc(x)

    mad = MAD(Logits(10), epsilon=0.5, proxy=Scaled(), objmax=True, jacobian="fc")
    with pytest.raises(ValueError, match=r"Scaled.*jacobian='full'"):
        mad(torch.randn(2, 10))
    out = MAD(Logits(10), epsilon=0.5, proxy=Scaled(), objmax=True, jacobian="full")(torch.randn(2, 10))
    assert out.shape == (2, 10)


def test_full_jacobian_on_the_last_weight_equals_fc():
    victim = get_net("lenet", "mnist", num_classes=10)
    proxy = get_net("lenet", "mnist", num_classes=10).eval()
    x = torch.randn(6, 1, 28, 28)
    for oracle in ["extreme", "argmax"]:
        fc = MAD(victim, epsilon=0.4, proxy=proxy, oracle=oracle, objmax=True).perturb(x)
        full = MAD(victim, epsilon=0.4, proxy=proxy, oracle=oracle, objmax=True, jacobian="full",
                   jacobian_params=["fc2.weight"]).perturb(x)
        torch.testing.assert_close(full.y_prime, fc.y_prime, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full.obj, fc.obj, rtol=1e-4, atol=1e-5)


def test_victim_as_its_own_proxy():
    victim = get_net("lenet", "mnist", num_classes=10)
    x = torch.randn(4, 1, 28, 28)
    out = MAD(victim, epsilon=0.5, objmax=True).perturb(x)
    assert torch.isfinite(out.y_prime).all()
    assert (_dist(out.y, out.y_prime, "l1") <= 0.5 + 1e-5).all()


def test_blackbox_semantics():
    victim = Logits(5)
    x = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0], [0.6, 0.5, 0.0, 0.0, 0.0]])
    y = torch.softmax(x, 1)
    torch.testing.assert_close(Blackbox(victim)(x), y)
    top2 = Blackbox(victim, topk=2)(x)
    assert (top2 > 0).sum(1).tolist() == [2, 2] and (top2.sum(1) < 1).all()  # not renormalized
    assert torch.equal(Blackbox(victim, topk=1, rounding=0)(x), torch.tensor([[0.0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]))
    assert torch.equal(Blackbox(victim, rounding=0)(x), y)  # rounding 0 alone: no-op, as the original
    r2 = Blackbox(victim, rounding=2)(x)
    np.testing.assert_array_equal(r2.numpy(), np.round(y.numpy(), decimals=2))
    with pytest.raises(ValueError, match="topk"):
        Blackbox(victim, topk=0)
    with pytest.raises(TypeError, match="rounding"):
        Blackbox(victim, rounding=1.5)


def test_reverse_sigmoid_formula():
    victim = Logits(6)
    x = torch.randn(20, 6) * 3
    y = torch.softmax(x, 1).double()
    for beta, gamma in [(1.0, 1.0), (0.3, 0.5), (0.7, 2.0), (2.0, 1.0)]:
        out = ReverseSigmoid(victim, beta=beta, gamma=gamma)(x).double()
        z = torch.log(y / (1 - y))  # the original's inv_sigmoid, then sigmoid
        yhat = y - beta * (torch.sigmoid(gamma * z) - 0.5)
        torch.testing.assert_close(out, yhat / yhat.sum(1, keepdim=True), rtol=1e-5, atol=1e-6)
    uniform = ReverseSigmoid(victim, beta=1.0, gamma=1.0)(x)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 6))


@pytest.mark.parametrize("dist_z", ["l1", "l2"])
@pytest.mark.parametrize("strat", ["uniform", "gaussian"])
def test_random_noise(device, dist_z, strat):
    victim = Logits(10).to(device)
    x = torch.randn(300, 10, device=device)
    d = RandomNoise(victim, epsilon_z=0.5, dist_z=dist_z, strat=strat, seed=0)
    noise = d.noise((300, 10), torch.float32, torch.device(device))
    norm = noise.abs().sum(1) if dist_z == "l1" else noise.norm(dim=1)
    assert (norm <= 0.5 + 1e-5).all()
    out = RandomNoise(victim, epsilon_z=0.5, dist_z=dist_z, strat=strat, seed=0)(x)
    assert torch.isfinite(out).all() and ((out.sum(1) - 1).abs() < 1e-5).all()
    again = RandomNoise(victim, epsilon_z=0.5, dist_z=dist_z, strat=strat, seed=0)(x)
    assert torch.equal(out, again)
    assert torch.equal(RandomNoise(victim, epsilon_z=0.0, dist_z=dist_z)(x), torch.softmax(x, 1))


def test_query_logger_matches_recomputation(tmp_path):
    g = torch.Generator().manual_seed(0)
    log = QueryLogger(tmp_path, prefix="transfer", every=100)
    ys, yps = [], []
    for B in [37, 64, 1, 99, 250, 49]:  # 500 queries in uneven batches
        y = torch.softmax(torch.randn(B, 4, generator=g), 1)
        yp = torch.softmax(torch.randn(B, 4, generator=g), 1)
        log.log(y, yp, torch.rand(B), torch.rand(B))
        ys.append(y)
        yps.append(yp)
    log.close()
    lines = (tmp_path / "distancetransfer.log.tsv").read_text().splitlines()
    assert lines[0].split("\t") == DISTANCE_COLUMNS
    counts = [int(line.split("\t")[0]) for line in lines[1:]]
    assert counts == [101, 201, 451, 500]  # each crossing of a multiple of 100, plus the tail
    y, yp = torch.cat(ys).double(), torch.cat(yps).double()
    l1 = (y - yp).abs().sum(1).numpy()
    l2 = (y - yp).norm(dim=1).numpy()
    kl = (y * (y.log() - yp.log())).sum(1).numpy()
    last = [float(v) for v in lines[-1].split("\t")[1:]]
    want = [l1.mean(), l1.std(), l2.mean(), l2.std(), kl.mean(), kl.std()]  # np.std: population std
    np.testing.assert_allclose(last, want, rtol=1e-9)
    rows = read_queries(tmp_path, "transfer")
    assert rows.shape == (500, 10)
    np.testing.assert_allclose(rows[:, :4], y.numpy(), rtol=1e-6)


def test_query_logger_resumes_and_drops_a_cut_row(tmp_path):
    log = QueryLogger(tmp_path, prefix="t", every=10)
    y = torch.softmax(torch.randn(25, 3), 1)
    log.log(y, y.flip(1))
    log.close()
    with open(tmp_path / "queriest.f32", "ab") as f:
        f.write(b"\x00" * 7)  # a row cut short by a crash
    log2 = QueryLogger(tmp_path, prefix="t", every=10, resume=True)
    assert log2.count == 25
    log2.log(y[:5], y[:5].flip(1))
    log2.close()
    assert read_queries(tmp_path, "t").shape == (30, 8)
    counts = [int(l.split("\t")[0]) for l in (tmp_path / "distancet.log.tsv").read_text().splitlines()[1:]]
    assert counts == [25, 30]  # one row per batch that crosses a multiple, one for the tail


def test_topk_kl_is_inf_in_logs(tmp_path):
    with QueryLogger(tmp_path, prefix="x", every=1) as log:
        d = Blackbox(Logits(4), topk=1, rounding=0, logger=log)
        d(torch.randn(3, 4))
    row = (tmp_path / "distancex.log.tsv").read_text().splitlines()[-1].split("\t")
    assert row[5] == "inf"


# -- defense_args ------------------------------------------------------------------------

def test_parse_defense_args_fixes_the_traps():
    a = parse_defense_args("epsilon:0.5, objmax:False ,ydist:l1,model_adv_proxy:C:/models/proxy,,")
    assert a == {"epsilon": 0.5, "objmax": False, "ydist": "l1", "model_adv_proxy": "C:/models/proxy"}
    assert parse_defense_args("objmax:1,disable_jacobian:true")["disable_jacobian"] is True
    assert parse_defense_args("topk:1,rounding:0", "topk") == {"topk": 1, "rounding": 0}
    assert isinstance(parse_defense_args("epsilon:1")["epsilon"], float)


@pytest.mark.parametrize("args,defense,match", [
    ("epsilon:0.5,epsilon:0.1", None, "given twice"),
    ("epsilonn:0.5", None, r"unknown key 'epsilonn'.*accepted keys"),
    ("beta:1", "mad", r"unknown key 'beta' for defense 'mad'"),
    ("epsilon:big", "mad", r"epsilon:'big' is not a number"),
    ("objmax:yes", "mad", r"objmax:'yes' is not a boolean"),
    ("topk:1.5", "topk", r"topk:'1.5' is not an integer"),
    ("epsilon", "mad", "not of the form key:value"),
    (":3", None, "empty key"),
])
def test_parse_defense_args_rejects(args, defense, match):
    with pytest.raises(ValueError, match=match):
        parse_defense_args(args, defense)


def test_build_defense_by_reference_names(tmp_path):
    victim = get_net("lenet", "mnist", num_classes=10)
    proxy_dir = tmp_path / "proxy"
    proxy_dir.mkdir()
    save_checkpoint(proxy_dir / "checkpoint.pth.tar", get_net("lenet", "mnist", num_classes=10), arch="lenet",
                    epoch=1, best_acc=0.0)
    atomic_write_json(proxy_dir / "params.json", {"model_arch": "lenet", "num_classes": 10, "dataset": "MNIST"})
    made = {
        "none": build_defense("none", "", model=victim),
        "topk": build_defense("topk", "topk:1,rounding:0", model=victim),
        "rounding": build_defense("rounding", "rounding:2", model=victim),
        "mad": build_defense("mad", f"epsilon:0.5,objmax:True,ydist:l1,model_adv_proxy:{proxy_dir}", model=victim),
        "reverse_sigmoid": build_defense("reverse_sigmoid", "beta:0.5,gamma:0.2", model=victim),
        "rand_noise": build_defense("rand_noise", "epsilon_z:0.5,dist_z:l2,seed:1", model=victim),
    }
    assert isinstance(made["mad"], MAD) and made["mad"].proxy.training  # the original never calls .eval()
    x = torch.randn(3, 1, 28, 28)
    for name, d in made.items():
        assert isinstance(d, Defense) and d(x).shape == (3, 10), name
    with pytest.raises(ValueError, match="unknown defense"):
        build_defense("madd", "", model=victim)
    with pytest.raises(ValueError, match="needs epsilon"):
        build_defense("mad", "ydist:l1", model=victim)


def test_defenses_are_modules_and_thread_safe():
    victim = get_net("lenet", "mnist", num_classes=10)
    proxy = BNProxy().train()
    mad = MAD(victim, epsilon=0.5, proxy=proxy, oracle="argmax", objmax=True)
    served = nn.Sequential(mad)  # sits inside a served model
    xs = [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    serial = [served(x) for x in xs]
    results = [None] * 8

    def work(i):
        results[i] = served(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(serial, results):
        assert torch.equal(a, b)
    assert mad.call_count == 16 * 16
    mad.eval()
    assert proxy.training  # the defense never switches the proxy's mode
