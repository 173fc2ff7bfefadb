"""Every registered defense's capabilities (batch_independent, keeps_top1, reseedable, stateful)
checked against what it actually does."""

import pytest
import torch

from ppoison_ext.checkpoint import save_checkpoint
from ppoison_ext.defenses import DEFENSE_NAMES, ModelGuardS, build_defense
from ppoison_ext.fileio import atomic_write_json
from ppoison_ext.models import get_net

B = 8
PARAMS = {"model_arch": "lenet", "num_classes": 10, "dataset": "MNIST"}

#: (name, defense_args, whether a proxy= is passed); every registered name at least once
CASES = [
    ("none", "", False), ("topk", "topk:2", False), ("topk", "topk:1,rounding:0", False),
    ("rounding", "rounding:2", False),
    ("mad", "epsilon:0.5", True), ("mad", "epsilon:0.5,oracle:argmax,objmax:True", True),
    ("mad", "epsilon:0.5,oracle:random,seed:3", True), ("mad", "epsilon:0.3,ydist:l2", False),
    ("reverse_sigmoid", "beta:0.5,gamma:0.2", False), ("rand_noise", "epsilon_z:0.5,seed:1", False),
    ("rand_noise", "epsilon_z:0.0", False),
    ("grad2", "epsilon:0.5", True), ("grad2", "epsilon:0.5,target:min_ip", True),
    ("grad2", "epsilon:0.5,target:min_ip,batch_independent:True", True),
    ("mad_gr", "epsilon:0.5", True), ("reverse_sigmoid_gr", "beta:0.5", False),
    ("rand_gr", "epsilon:0.5,seed:2", False),
    ("modelguard_w", "epsilon:1.0", False), ("modelguard_s", "epsilon:1.0", False),
    ("modelguard_s", "epsilon:1.0,frozen:1", False),
    ("mad_wb", "epsilon:0.5", False), ("mad_wb", "epsilon:0.5,oracle:argmax,attacker_argmax:True", False),
    ("reverse_sigmoid_wb", "beta:0.5", False), ("rand_noise_wb", "epsilon_z:0.5,seed:4", False),
    ("am", "tau:0.5", False),
]
IDS = [f"{name}[{args}]" for name, args, _ in CASES]
# defenses whose dependence on the rest of the batch the comparison below must see
COUPLED = {"mad[epsilon:0.5,oracle:random,seed:3]", "rand_noise[epsilon_z:0.5,seed:1]",
           "grad2[epsilon:0.5,target:min_ip]", "modelguard_s[epsilon:1.0]", "rand_gr[epsilon:0.5,seed:2]"}


def test_every_registered_defense_is_covered():
    assert {name for name, _, _ in CASES} == set(DEFENSE_NAMES)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("capabilities")
    torch.manual_seed(5)
    misinfo = root / "misinfo"
    misinfo.mkdir()
    save_checkpoint(misinfo / "checkpoint.pth.tar", get_net("lenet", "mnist"), arch="lenet", epoch=0,
                    best_acc=0.0)
    atomic_write_json(misinfo / "params.json", PARAMS)
    torch.manual_seed(0)
    return {"victim": get_net("lenet", "mnist").eval(), "proxy": get_net("lenet", "mnist").eval(),
            "misinfo": misinfo}


def make(env, name, args, with_proxy):
    """A fresh instance, the same each time (the white-box attacker's init included)."""
    torch.manual_seed(11)
    if name == "am":
        args += f",model_misinfo:{env['misinfo']}"
    return build_defense(name, args, model=env["victim"], proxy=env["proxy"] if with_proxy else None,
                         whitebox={"victim_params": PARAMS} if name.endswith("_wb") else None)


def _images(n, seed):
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name, args, with_proxy", CASES, ids=IDS)
def test_batch_independent_matches_a_batch_vs_row_comparison(env, name, args, with_proxy):
    # the same rows 16 positions later in a batch of the same size, after other rows: equal bit for
    # bit when the defense says it is batch independent. (Float kernels vectorize in blocks and
    # round a block's tail differently; the server pads batches to multiples of 16 rows for that.)
    x = _images(32, 0)
    shifted = torch.cat([_images(16, 1), x[:16]])
    first = make(env, name, args, with_proxy)
    a = first(x)[:16]
    second = make(env, name, args, with_proxy)
    b = second(shifted)[16:]
    if first.batch_independent:
        assert torch.equal(a, b)
    elif f"{name}[{args}]" in COUPLED:
        assert not torch.equal(a, b)


def _posteriors(K=10):
    g = torch.Generator().manual_seed(7)
    logits = [
        torch.randn(16, K, generator=g) * 3,  # ordinary
        torch.randn(8, K, generator=g) * 1e3,  # near one-hot
        torch.zeros(2, K),  # uniform: every class tied
        torch.randint(0, 2, (16, K), generator=g).float() * 5,  # ties at the top
        torch.tensor([[1.0, 3.0, 3.0] + [0.0] * (K - 3), [0.0] * (K - 2) + [2.0, 2.0]]),  # two-way ties
    ]
    return torch.softmax(torch.cat(logits), dim=1)


@pytest.mark.parametrize("name, args, with_proxy", CASES, ids=IDS)
def test_keeps_top1_holds_on_random_and_tied_rows(env, name, args, with_proxy):
    d = make(env, name, args, with_proxy)
    if not d.keeps_top1:
        return
    y = _posteriors()
    x = _images(y.shape[0], 3)
    with torch.no_grad():
        released = d.defend(x, y).y_prime
    assert torch.equal(released.argmax(1), y.argmax(1))
    x = _images(B, 4)
    assert torch.equal(d(x).argmax(1), d.victim_probs(x).argmax(1))


@pytest.mark.parametrize("name, args, with_proxy", CASES, ids=IDS)
def test_reseed_restarts_the_stream(env, name, args, with_proxy):
    d = make(env, name, args, with_proxy)
    x = _images(B, 5)
    d.reseed(21)
    a = d(x)
    d(x)
    d.reseed(21)
    if d.stateful:
        return  # the answers also depend on the state
    b = d(x)
    assert torch.equal(a, b)
    if not d.reseedable:
        assert torch.equal(d(x), a)  # nothing random to restart: the same answers anyway


@pytest.mark.parametrize("name, args, with_proxy", CASES, ids=IDS)
def test_state_restored_on_a_fresh_instance_gives_the_same_answers(env, name, args, with_proxy):
    xs = [_images(B, 10 + i) for i in range(3)]
    uninterrupted = make(env, name, args, with_proxy)
    interrupted = make(env, name, args, with_proxy)
    if not uninterrupted.stateful:
        assert uninterrupted.get_state() == {}
        uninterrupted.set_state({})
        with pytest.raises(ValueError, match="keeps no state"):
            uninterrupted.set_state({"x": 1})
        return
    for x in xs[:2]:
        uninterrupted(x)
        interrupted(x)
    state = interrupted.get_state()
    assert all(isinstance(v, (torch.Tensor, int, float, str, bool, dict)) for v in state.values())
    fresh = make(env, name, args, with_proxy)
    fresh.set_state(state)
    assert fresh.call_count == uninterrupted.call_count
    for d in (fresh, uninterrupted):
        d.reseed(8)  # the random stream is not state: a resumed run reseeds each batch
    assert torch.equal(fresh(xs[2]), uninterrupted(xs[2]))


def test_modelguard_s_state_is_its_banks(env):
    d = ModelGuardS(env["victim"], epsilon=1.0)
    assert d.stateful and d.get_state() == {"call_count": 0}
    d(_images(B, 6))
    state = d.get_state()
    assert set(state) == {"call_count", "bank", "labels"} and state["bank"].shape[0] == d.num_centroids
    d.set_state({})
    assert d.num_centroids == 0 and d.call_count == 0
