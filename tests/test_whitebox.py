"""White-box defenses (mad_wb, reverse_sigmoid_wb, rand_noise_wb): online attacker, logs, resume."""

import numpy as np
import pytest
import torch

from ppoison_ext.attacks.transferset import TransferSetWriter, load_transferset
from ppoison_ext.defenses import build_defense
from ppoison_ext.defenses.whitebox import ONLINE_COLUMNS, ONLINE_LOG, WhiteboxDefense
from ppoison_ext.checkpoint import save_checkpoint
from ppoison_ext.fileio import atomic_write_json
from ppoison_ext.modeldir import load_model_dir
from ppoison_ext.datasets import get_dataset, get_transform
from ppoison_ext.defenses import QueryLogger, read_queries
from ppoison_ext.models import get_net
from ppoison_ext.pipeline import transfer as T


def make_model_dir(folder, seed):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_checkpoint(folder / "checkpoint.pth.tar", get_net("lenet", "mnist"), arch="lenet", epoch=0, best_acc=0.0)
    atomic_write_json(folder / "params.json", {"model_arch": "lenet", "num_classes": 10, "dataset": "MNIST"})
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wb")
    tf = get_transform("mnist", "test")
    test = torch.utils.data.Subset(get_dataset("MNIST", train=False, transform=tf), range(200))
    query = get_dataset("notMNIST", train=True, transform=tf)
    xs = torch.stack([query[i][0] for i in range(300)])
    return {"victim": make_model_dir(root / "victim", 0), "proxy": make_model_dir(root / "proxy", 1),
            "testset": test, "x": xs}


def build(env, name, args, out, **kw):
    model, params = load_model_dir(env["victim"])
    qlog = QueryLogger(out, prefix="transfer")
    kw.setdefault("testset", env["testset"])
    kw.setdefault("train_size", 60000)
    kw.setdefault("log_every", 100)
    kw.setdefault("minitest_size", 100)
    wb = build_defense(name, args, model=model, logger=qlog, device=torch.device("cpu"), out_dir=out,
                       whitebox={"victim_params": params, **kw})
    return wb, qlog


def query(wb, x, B=50):
    return torch.cat([wb(x[i:i + B]) for i in range(0, len(x), B)])


def rows(out):
    lines = (out / ONLINE_LOG).read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def test_mad_wb_trains_attacker_and_logs(env, tmp_path):
    wb, qlog = build(env, "mad_wb", "epsilon:0.5,objmax:True,ydist:l1", tmp_path)
    assert isinstance(wb, WhiteboxDefense) and wb.defense.proxy is wb.attacker  # white box: the proxy IS the attacker
    before = [p.detach().clone() for p in wb.attacker.parameters()]
    y = query(wb, env["x"])
    assert y.shape == (300, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(300), atol=1e-5, rtol=0)
    assert all(not torch.equal(a, b) for a, b in zip(before, wb.attacker.parameters()))
    assert wb.attacker.training  # fixed: the original left it in eval mode after the first log
    assert wb.call_count == 300 and qlog.count == 300
    header, body = rows(tmp_path)
    assert header == ONLINE_COLUMNS
    assert [r[2] for r in body] == ["test", "test_vic"] * 3
    assert [float(r[1]) for r in body[::2]] == [100 / 60000, 200 / 60000, 300 / 60000]
    for r in body:
        assert len(r) == 12 and 0 <= float(r[4]) <= 100
    assert all(float(r[5]) == -1 for r in body[1::2])
    best = [float(r[5]) for r in body[::2]]
    assert best == sorted(best)
    assert 0.0 < float(body[1][6]) <= 0.5 + 1e-5  # defended victim: mean L1 within epsilon
    qlog.close()
    d = read_queries(tmp_path, "transfer")
    assert d.shape == (300, 22) and np.isfinite(d[:, 20]).all()  # MAD objective values logged


def test_attacker_argmax_releases_labels(env, tmp_path):
    wb, qlog = build(env, "mad_wb", "epsilon:0.5,attacker_argmax:True", tmp_path, log_every=1000)
    y = query(wb, env["x"][:100])
    assert set(y.flatten().tolist()) == {0.0, 1.0} and (y.sum(1) == 1).all()
    qlog.close()
    yp_logged = read_queries(tmp_path, "transfer")[:, 10:20]
    assert not np.isin(yp_logged, [0.0, 1.0]).all()  # the log holds y′ before the argmax


@pytest.mark.parametrize("name,args", [("reverse_sigmoid_wb", "beta:0.5,adv_optimizer:sgdm"),
                                       ("rand_noise_wb", "epsilon_z:0.5,dist_z:l2,adv_optimizer:adam")])
def test_other_wb_defenses(env, tmp_path, name, args):
    wb, _ = build(env, name, args, tmp_path)
    before = [p.detach().clone() for p in wb.attacker.parameters()]
    y = query(wb, env["x"][:100])
    torch.testing.assert_close(y.sum(1), torch.ones(100), atol=1e-5, rtol=0)
    assert any(not torch.equal(a, b) for a, b in zip(before, wb.attacker.parameters()))
    assert len(rows(tmp_path)[1]) == 2


def test_gray_box_proxy(env, tmp_path):
    args = f"epsilon:0.5,model_adv_proxy:{env['proxy']},adv_optimizer:sgdm"
    for kw, trains in (({}, True), ({"original_bugs": True}, False)):
        wb, _ = build(env, "mad_wb", args, tmp_path / str(trains), log_every=1000, **kw)
        assert wb.proxy is not None and wb.defense.proxy is wb.proxy
        before = [p.detach().clone() for p in wb.proxy.parameters()]
        query(wb, env["x"][:100])
        changed = any(not torch.equal(a, b) for a, b in zip(before, wb.proxy.parameters()))
        assert changed == trains  # the original's proxy optimizer held the attacker's parameters
    wb, _ = build(env, "mad_wb", args + ",model_adv_proxy_notrain:True", tmp_path / "nt", log_every=1000)
    before = [p.detach().clone() for p in wb.proxy.parameters()]
    query(wb, env["x"][:100])
    assert all(torch.equal(a, b) for a, b in zip(before, wb.proxy.parameters()))


def test_model_adv_from_dir(env, tmp_path):
    wb, _ = build(env, "mad_wb", f"epsilon:0.1,model_adv:{env['proxy']}", tmp_path)
    ref = get_net("lenet", "mnist")
    ref.load_state_dict(torch.load(env["proxy"] / "checkpoint.pth.tar", weights_only=True)["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), wb.attacker.parameters()))


def test_resume_state_roundtrip(env, tmp_path):
    x = env["x"][:200]
    torch.manual_seed(0)
    wb1, _ = build(env, "mad_wb", "epsilon:0.5,adv_optimizer:sgdm", tmp_path / "a")
    query(wb1, x[:100])
    snap = wb1.resume_state()
    query(wb1, x[100:])
    torch.manual_seed(0)
    (tmp_path / "b").mkdir()
    other = "other-run\t0.1\ttest" + "\t0" * 9 + "\n"
    (tmp_path / "b" / ONLINE_LOG).write_text((tmp_path / "a" / ONLINE_LOG).read_text() + other)  # 2 events + 1
    wb2, _ = build(env, "mad_wb", "epsilon:0.5,adv_optimizer:sgdm", tmp_path / "b")
    assert len(rows(tmp_path / "b")[1]) == 5  # appended to, as the original
    wb2.load_resume_state(snap)
    assert wb2.run_id == wb1.run_id
    body = rows(tmp_path / "b")[1]
    assert len(body) == 3 and body[-1][0] == "other-run"  # this run cut back to its 1 event of the snapshot
    y2 = query(wb2, x[100:])
    assert wb2.call_count == 200
    assert all(torch.equal(a, b) for a, b in zip(wb1.attacker.parameters(), wb2.attacker.parameters()))
    assert [r[0] for r in rows(tmp_path / "b")[1]].count(wb1.run_id) == 4
    assert y2.shape == (100, 10)


def test_pipeline_mad_wb_interrupted_and_resumed(env, tmp_path, monkeypatch):
    def run(out):
        return T.transfer("random", env["victim"], "mad_wb", "epsilon:0.5,objmax:True", out_dir=out,
                          queryset="notMNIST", budget=300, batch_size=50, device_id=-1, nworkers=0, progress=False)

    ref = run(tmp_path / "ref")
    assert (ref / ONLINE_LOG).read_text().splitlines() == ["\t".join(ONLINE_COLUMNS)]  # < 1000 queries: no rows
    original = TransferSetWriter.append
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # after the 4th batch was queried (and its state saved), before it is committed
            raise KeyboardInterrupt("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(TransferSetWriter, "append", flaky)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut")
    monkeypatch.setattr(TransferSetWriter, "append", original)
    assert len(load_transferset(tmp_path / "cut")) == 150
    out = run(tmp_path / "cut")
    a, b = load_transferset(out), load_transferset(ref)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.y, b.y)  # the online attacker resumed exactly
    np.testing.assert_array_equal(read_queries(out, "transfer"), read_queries(ref, "transfer"))


def test_bad_arguments(env, tmp_path):
    with pytest.raises(ValueError, match="adv_optimizer"):
        build(env, "mad_wb", "epsilon:0.5,adv_optimizer:rmsprop", tmp_path)
    with pytest.raises(ValueError, match=r"whitebox= settings are for the \*_wb defenses, not 'mad'"):
        build(env, "mad", "epsilon:0.5", tmp_path)
    with pytest.raises(ValueError, match="unknown key"):
        build(env, "reverse_sigmoid_wb", "model_adv_proxy:x", tmp_path)
    with pytest.raises(FileNotFoundError, match="model_adv"):
        build(env, "mad_wb", f"epsilon:0.5,model_adv:{tmp_path / 'nope'}", tmp_path)
    with pytest.raises(ValueError, match="needs epsilon"):
        build(env, "mad_wb", "ydist:l2", tmp_path)
