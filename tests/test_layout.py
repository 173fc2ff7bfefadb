"""The package's one way to build a defense, the attack contract, the query log's own
truncation."""


import numpy as np
import pytest
import torch

from ppoison_ext.attacks import Attack, JacobianAdversary, KnockoffNets, TransferSet
from ppoison_ext.attacks.jbda import pixel_bounds
from ppoison_ext.checkpoint import save_checkpoint
from ppoison_ext.defenses import (MAD, Blackbox, DefenseSpec, QueryLogger, RandomNoise, ReverseSigmoid,
                                  WhiteboxDefense, build_defense, read_queries)
from ppoison_ext.fileio import atomic_write_json
from ppoison_ext.losses import soft_cross_entropy
from ppoison_ext.models import get_net


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("victim")
    torch.manual_seed(0)
    save_checkpoint(folder / "checkpoint.pth.tar", get_net("lenet", "mnist"), arch="lenet", epoch=1, best_acc=0.0)
    atomic_write_json(folder / "params.json", {"model_arch": "lenet", "num_classes": 10, "dataset": "MNIST"})
    return folder


def _victim():
    torch.manual_seed(0)
    return get_net("lenet", "mnist").eval()


# ---------------------------------------------------------------------------------------------
# build_defense


def test_build_defense_string_mapping_and_keywords_agree():
    victim, proxy = _victim(), get_net("lenet", "mnist")
    x = torch.rand(8, 1, 28, 28)
    a = build_defense("mad", "epsilon:0.5,objmax:True,ydist:l1,oracle:argmax", model=victim, proxy=proxy)
    b = build_defense("mad", {"epsilon": 0.5, "objmax": True, "ydist": "l1", "oracle": "argmax"}, model=victim,
                      proxy=proxy)
    c = build_defense("mad", "epsilon:0.5", objmax=True, ydist="l1", oracle="argmax", model=victim, proxy=proxy)
    d = build_defense(DefenseSpec.parse("mad", "epsilon:0.5,objmax:True", ydist="l1", oracle="argmax"),
                      model=victim, proxy=proxy)
    assert all(isinstance(m, MAD) for m in (a, b, c, d))
    ya = a(x)
    for other in (b, c, d):
        torch.testing.assert_close(other(x), ya, rtol=0, atol=0)
    # argmax keeps the victim's top-1 and stays within ε in L1
    with torch.no_grad():
        y = torch.softmax(victim(x), 1)
    assert torch.equal(ya.argmax(1), y.argmax(1))
    assert float((ya - y).abs().sum(1).max()) <= 0.5 + 1e-5


def test_build_defense_every_name_builds_its_class(victim_dir):
    cases = {"none": Blackbox, "topk": Blackbox, "rounding": Blackbox, "reverse_sigmoid": ReverseSigmoid,
             "rand_noise": RandomNoise, "mad": MAD}
    args = {"topk": "topk:1", "rounding": "rounding:2", "rand_noise": "epsilon_z:0.5", "mad": "epsilon:0.5"}
    x = torch.rand(4, 1, 28, 28)
    for name, cls in cases.items():
        d = build_defense(name, args.get(name), victim_dir=victim_dir, proxy=None)
        assert type(d) is cls, name
        out = d(x)
        assert out.shape == (4, 10)
        if name not in ("topk", "rounding"):  # neither is renormalised
            torch.testing.assert_close(out.sum(1), torch.ones(4), atol=1e-5, rtol=0)


def test_build_defense_whitebox_variant(victim_dir, tmp_path):
    log = QueryLogger(tmp_path, prefix="transfer")
    d = build_defense("mad_wb", "epsilon:0.5,attacker_argmax:True", victim_dir=victim_dir, logger=log,
                      out_dir=tmp_path, whitebox={"testset": [], "train_size": 100})
    assert isinstance(d, WhiteboxDefense) and isinstance(d.defense, MAD)
    out = d(torch.rand(3, 1, 28, 28))
    assert torch.equal(out.sum(1), torch.ones(3)) and torch.equal(out.max(1).values, torch.ones(3))
    log.close()
    assert read_queries(tmp_path, "transfer").shape == (3, 22)


@pytest.mark.parametrize("call, message", [
    (lambda m: build_defense("madd", model=m), "unknown defense 'madd'"),
    (lambda m: build_defense("mad", "ydist:l1", model=m), "needs epsilon"),
    (lambda m: build_defense("mad", "epsilon:0.5", epsilon=0.4, model=m), "given twice"),
    (lambda m: build_defense("mad", "epsilon:x", model=m), "epsilon:'x' is not a number"),
    (lambda m: build_defense("reverse_sigmoid", "epsilon:1", model=m), "unknown key 'epsilon'"),
    (lambda m: build_defense("none"), "needs the victim"),
    (lambda m: build_defense("none", model=m, whitebox={"log_every": 1}), "whitebox= settings are for"),
    (lambda m: build_defense("mad_wb", "epsilon:0.5", model=m), "needs the victim's params.json"),
])
def test_build_defense_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call(_victim())


def test_build_defense_type_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        build_defense("none", model=object())
    with pytest.raises(TypeError, match="name"):
        build_defense(3, model=_victim())


def test_defense_spec_str_round_trips():
    spec = DefenseSpec.parse("mad", "epsilon:0.25,objmax:True,ydist:kl,oracle:argmax")
    assert DefenseSpec.parse("mad", str(spec)) == spec


# ---------------------------------------------------------------------------------------------
# the attack contract


class _Queryset(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.data = (torch.rand(n, 28, 28, generator=g) * 255).to(torch.uint8)
        self.targets = torch.randint(0, 5, (n,), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i].float().div(255).unsqueeze(0), int(self.targets[i])


def test_attacks_implement_the_contract():
    assert issubclass(KnockoffNets, Attack) and issubclass(JacobianAdversary, Attack)
    with pytest.raises(TypeError):
        Attack()  # abstract


def test_knockoff_contract_without_an_output_folder():
    bb = build_defense("none", model=_victim())
    attack = KnockoffNets(strategy="random", budget=40, batch_size=16, progress=False)
    ts = attack(bb, _Queryset(60))
    assert isinstance(ts, TransferSet) and len(ts) == 40 and ts.folder.is_dir()
    # the stored posteriors are the black box's answers for the stored images
    x = torch.stack([_Queryset(60)[int(i)][0] for i in ts.indices])
    torch.testing.assert_close(torch.as_tensor(np.asarray(ts.y)), bb(x), atol=1e-6, rtol=0)
    assert "KnockoffNets(strategy='random', budget=40" in repr(attack)


def test_jbda_contract_builds_a_transferset(tmp_path):
    victim = _victim()
    bb = build_defense("none", model=victim)
    mean, std = (0.1307,), (0.3081,)
    attack = JacobianAdversary(policy="jbda", budget=24, model_adv_name="lenet", modelfamily="mnist",
                               num_classes=10, testset=None, out_dir=tmp_path / "train", train_epochs=1,
                               final_train_epochs=1, query_batch_size=8, bounds=pixel_bounds(mean, std),
                               progress=False)
    x_seed = (torch.rand(8, 1, 28, 28) - 0.1307) / 0.3081
    ts = attack.build_transferset(bb, x_seed, tmp_path / "ts", seed_indices=range(100, 108))
    assert len(ts) == 24 and bb.call_count == 24
    assert np.asarray(ts.indices)[:8].tolist() == list(range(100, 108))
    assert int((np.asarray(ts.indices) == -1).sum()) == 16  # 8 seeds, 16 synthetic rows
    torch.testing.assert_close(torch.as_tensor(np.asarray(ts.y[:8])), bb(x_seed), atol=1e-6, rtol=0)


def test_one_soft_cross_entropy():
    z, t = torch.randn(5, 4, dtype=torch.float64), torch.softmax(torch.randn(5, 4, dtype=torch.float64), 1)
    ref = -(t * torch.log(torch.softmax(z, 1))).sum(1)
    torch.testing.assert_close(soft_cross_entropy(z, t, reduction="none"), ref)
    torch.testing.assert_close(soft_cross_entropy(z, t), ref.mean())
    torch.testing.assert_close(soft_cross_entropy(z, t, reduction="sum"), ref.sum())
    with pytest.raises(ValueError, match="reduction"):
        soft_cross_entropy(z, t, reduction="max")


# ---------------------------------------------------------------------------------------------
# the query log truncates itself; its distance rows do not depend on crashes


def _log_in_batches(folder, y, yp, bs, stop=None):
    lg = QueryLogger(folder, prefix="t", every=100)
    for i in range(0, y.shape[0] if stop is None else stop, bs):
        lg.log(y[i:i + bs], yp[i:i + bs])
    return lg


def test_querylog_truncate_then_continue_equals_uninterrupted(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.softmax(torch.randn(530, 10, generator=g) * 3, 1)
    yp = torch.softmax(torch.randn(530, 10, generator=g) * 3, 1)
    ref = _log_in_batches(tmp_path / "ref", y, yp, 10)
    ref.close()
    run = _log_in_batches(tmp_path / "run", y, yp, 10, stop=260)  # 260 logged, 150 committed
    run.truncate(150)
    assert run.count == 150 and read_queries(tmp_path / "run", "t").shape[0] == 150
    for i in range(150, 530, 10):
        run.log(y[i:i + 10], yp[i:i + 10])
    run.close()
    assert (tmp_path / "run" / "distancet.log.tsv").read_bytes() == (tmp_path / "ref" / "distancet.log.tsv").read_bytes()
    # and after a crash: a new logger resumes from the files alone
    crashed = _log_in_batches(tmp_path / "crash", y, yp, 10, stop=370)
    crashed._bin.close()
    resumed = QueryLogger(tmp_path / "crash", prefix="t", every=100, resume=True)
    resumed.truncate(300)
    for i in range(300, 530, 10):
        resumed.log(y[i:i + 10], yp[i:i + 10])
    resumed.close()
    assert (tmp_path / "crash" / "distancet.log.tsv").read_bytes() == (tmp_path / "ref" / "distancet.log.tsv").read_bytes()


def test_querylog_rows_are_the_exact_statistics(tmp_path):
    g = torch.Generator().manual_seed(3)
    y = torch.softmax(torch.randn(250, 6, generator=g), 1)
    yp = torch.softmax(torch.randn(250, 6, generator=g), 1)
    lg = _log_in_batches(tmp_path, y, yp, 7)
    lg.close()
    rows = [line.split("\t") for line in (tmp_path / "distancet.log.tsv").read_text().splitlines()[1:]]
    l1 = (y.double() - yp.double()).abs().sum(1)
    for row in rows:
        n = int(row[0])
        torch.testing.assert_close(float(row[1]), float(l1[:n].mean()), rtol=1e-12, atol=0)
        torch.testing.assert_close(float(row[2]), float(l1[:n].std(unbiased=False)), rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="n_queries"):
        lg.truncate(-1)
