"""End to end on small slices of the embedded MNIST: train-victim, the MAD proxy recipe,
train-attacker over budgets (order, files, resume-skip) and eval-bbox."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ppoison_ext.attacks import TransferSetWriter
from ppoison_ext.modeldir import load_model_dir
from ppoison_ext.datasets import get_dataset, get_transform
from ppoison_ext.models import get_net
from ppoison_ext.pipeline import attacker, evaluate, victim
from ppoison_ext.training import LOG_COLUMNS, seed_everything

FAST = ["-d", "-1", "-w", "0", "--no-progress"]
ORIGINAL_VICTIM_KEYS = {"dataset", "model_arch", "out_path", "device_id", "batch_size", "epochs", "lr",
                        "momentum", "log_interval", "resume", "lr_step", "lr_gamma", "num_workers",
                        "train_subset", "pretrained", "weighted_loss", "num_classes", "created_on"}


def _log(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim")
    rc = victim.main(["MNIST", "lenet", "-o", str(out), "--epochs", "1", "--train_subset", "256",
                      "--test_subset", "200", "--lr", "0.05"] + FAST)
    assert rc == 0
    return out


def test_train_victim_files(victim_dir):
    assert sorted(p.name for p in victim_dir.iterdir()) == [
        "checkpoint.pth.tar", "last.pth.tar", "params.json", "train.log.tsv"]
    params = json.loads((victim_dir / "params.json").read_text())
    assert ORIGINAL_VICTIM_KEYS <= set(params)
    assert params["num_classes"] == 10 and params["train_subset"] == 256 and params["epochs"] == 1
    assert params["lr_step"] == 30 and params["momentum"] == 0.5 and params["batch_size"] == 64
    header, rows = _log(victim_dir / "train.log.tsv")
    assert header == LOG_COLUMNS == ["run_id", "epoch", "split", "loss", "accuracy", "best_accuracy"]
    assert [(r[1], r[2]) for r in rows] == [("1", "train"), ("1", "test")]
    assert all(float(v) >= 0 for r in rows for v in r[3:])
    ckpt = torch.load(victim_dir / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["arch"] == "lenet" and ckpt["num_classes"] == 10
    model, _ = load_model_dir(victim_dir)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_make_proxy_keeps_initial_weights(tmp_path):
    model, summary = victim.make_proxy("MNIST", "lenet", tmp_path, device=-1, num_workers=0, test_subset=50,
                                       progress=False, seed=7)
    assert summary["params"]["lr"] == 0.0 and summary["params"]["train_subset"] == 10
    seed_everything(7)
    init = get_net("lenet", "mnist", num_classes=10)
    saved = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    for k, v in init.state_dict().items():
        assert torch.equal(saved[k], v), k
    with pytest.raises(TypeError, match="epochs"):
        victim.make_proxy("MNIST", "lenet", tmp_path, epochs=2)


def test_train_victim_rejects_bad_arguments(tmp_path):
    assert victim.main(["NoSuchSet", "lenet", "-o", str(tmp_path)] + FAST) == 2
    with pytest.raises(ValueError, match="train_subset"):
        victim.train_victim("MNIST", "lenet", tmp_path, device=-1, train_subset=0, progress=False)


@pytest.fixture(scope="module")
def transfer_dir(victim_dir, tmp_path_factory):
    """120 MNIST training images labelled by the victim (the real `transfer` step is elsewhere)."""
    out = tmp_path_factory.mktemp("transfer")
    model, _ = load_model_dir(victim_dir)
    ds = get_dataset("MNIST", train=True, transform=get_transform("mnist", "test"))
    idx = np.arange(1000, 1120)
    x = torch.stack([ds[int(i)][0] for i in idx])
    with torch.no_grad():
        y = F.softmax(model(x), 1)
    with TransferSetWriter(out, num_classes=10, kind="images", image_shape=[28, 28], resume=False) as w:
        w.append(torch.from_numpy(idx), ds.data[idx], y)
    return out


def test_train_attacker_budgets_order_and_resume(transfer_dir):
    args = [str(transfer_dir), "lenet", "MNIST", "--budgets", "80,40", "--epochs", "2"]
    args += ["--test_subset", "100"] + FAST
    assert attacker.main(args) == 0
    for b in (80, 40):
        header, rows = _log(transfer_dir / f"train.{b}.log.tsv")
        assert header == LOG_COLUMNS
        assert [(r[1], r[2]) for r in rows] == [(str(e), sp) for e in (1, 2) for sp in ("train", "test")]
        ckpt = torch.load(transfer_dir / f"checkpoint.{b}.pth.tar", weights_only=True)
        assert ckpt["arch"] == "lenet" and ckpt["num_classes"] == 10
        assert torch.load(transfer_dir / f"last.{b}.pth.tar", weights_only=True)["epoch"] == 2
    # budgets run in the given order (80 before 40) on one model
    run80 = _log(transfer_dir / "train.80.log.tsv")[1][0][0]
    run40 = _log(transfer_dir / "train.40.log.tsv")[1][0][0]
    assert run80 < run40
    params = json.loads((transfer_dir / "params_train.json").read_text())
    assert params["budgets"] == "80,40" and params["optimizer_choice"] == "sgdm" and params["lr"] == 0.01
    assert params["lr_step"] == 60 and "created_on" in params

    logs = {b: (transfer_dir / f"train.{b}.log.tsv").read_text() for b in (80, 40)}
    mtimes = {b: (transfer_dir / f"last.{b}.pth.tar").stat().st_mtime_ns for b in (80, 40)}
    model, summary = attacker.train_attacker(transfer_dir, "lenet", "MNIST", "80,40", device=-1, epochs=2,
                                             test_subset=100, progress=False)
    assert list(summary["results"]) == [80, 40]
    assert all(r["skipped"] for r in summary["results"].values())
    assert {b: (transfer_dir / f"train.{b}.log.tsv").read_text() for b in (80, 40)} == logs
    assert {b: (transfer_dir / f"last.{b}.pth.tar").stat().st_mtime_ns for b in (80, 40)} == mtimes
    final = torch.load(transfer_dir / "last.40.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_train_attacker_checks(transfer_dir, tmp_path):
    too_big = [str(transfer_dir), "lenet", "MNIST", "--budgets", "500"] + FAST
    assert attacker.main(too_big) == 2
    with pytest.raises(ValueError, match="budgets"):
        attacker.parse_budgets("10,x")
    assert attacker.parse_budgets("50, 100,,") == [50, 100]
    with TransferSetWriter(tmp_path, num_classes=5, kind="images", image_shape=[28, 28], resume=False) as w:
        w.append([0], np.zeros((1, 28, 28), np.uint8), torch.full((1, 5), 0.2))
    with pytest.raises(ValueError, match="K=5"):
        attacker.train_attacker(tmp_path, "lenet", "MNIST", "1", device=-1, progress=False)


@pytest.mark.parametrize("defense, args",
                         [("none", ""), ("topk", "topk:1,rounding:0"), ("mad", "epsilon:0.5")])
def test_eval_bbox(victim_dir, tmp_path, defense, args):
    out = tmp_path / defense
    rc = evaluate.main([str(victim_dir), defense, args, "--out_dir", str(out), "--test_subset", "200"] + FAST)
    assert rc == 0
    header, rows = _log(out / "bboxeval.200.log.tsv")
    assert header == LOG_COLUMNS and len(rows) == 1
    _, epoch, split, loss, acc, best = rows[0]
    assert (epoch, split, acc) == ("1", "test", best)
    model, _ = load_model_dir(victim_dir)
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    x = torch.stack([ds[i][0] for i in range(200)])
    labels = torch.tensor(ds.targets[:200])
    with torch.no_grad():
        p = F.softmax(model(x), 1)
    plain_acc = 100.0 * float((p.argmax(1) == labels).float().mean())
    dist = _log(out / "distancetest.log.tsv")
    assert dist[0] == ["call_count", "l1_mean", "l1_std", "l2_mean", "l2_std", "kl_mean", "kl_std"]
    assert dist[1][-1][0] == "200"
    l1 = float(dist[1][-1][1])
    params = json.loads((out / "params_evalbbox.json").read_text())
    assert params["log_prefix"] == "test" and params["defense"] == defense and params["batch_size"] == 256
    if defense == "none":
        assert float(acc) == pytest.approx(plain_acc) and l1 == pytest.approx(0, abs=1e-6)
        q = (p + 1e-7) / (p + 1e-7).sum(1, keepdim=True)
        nll = float(-torch.log(q).gather(1, labels[:, None]).mean())
        assert float(loss) == pytest.approx(nll, rel=1e-4)
    elif defense == "topk":
        assert float(acc) == pytest.approx(plain_acc)  # argmax preserved
        assert math.isinf(float(dist[1][-1][5]))  # KL(y || one-hot) = inf
    else:
        assert 0.4 < l1 <= 0.5 + 1e-5  # MAD spends its epsilon budget
        assert params["epsilon"] == 0.5


def test_eval_bbox_returns_results(victim_dir, tmp_path):
    res = evaluate.eval_bbox(victim_dir, "none", None, tmp_path, device=-1, test_subset=50, progress=False)
    assert res["n"] == 50 and 0 <= res["accuracy"] <= 100 and res["l1_mean"] == pytest.approx(0, abs=1e-6)
    assert (tmp_path / "bboxeval.50.log.tsv").is_file()
    with pytest.raises(ValueError, match="batch_size"):
        evaluate.eval_bbox(victim_dir, "none", None, tmp_path, batch_size=0)


def test_train_attacker_in_memory_datasets_change_nothing(transfer_dir, tmp_path, monkeypatch):
    """Holding the transformed transfer and test sets in memory gives the same weights and logs
    as decoding every image every epoch (the streaming datasets, in_memory patched out)."""
    import shutil

    from ppoison_ext.datasets import InMemory, in_memory

    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    sub = torch.utils.data.Subset(ds, list(range(50)))
    mem = in_memory(sub)
    assert isinstance(mem, InMemory) and len(mem) == 50
    for i in (0, 17, 49):
        assert torch.equal(mem[i][0], sub[i][0]) and int(mem[i][1]) == sub[i][1]
    assert in_memory(sub, max_bytes=1000) is sub  # too large: left as it is

    runs = {}
    for name in ("memory", "streaming"):
        if name == "streaming":
            monkeypatch.setattr(attacker, "in_memory", lambda d: d)
        folder = tmp_path / name
        folder.mkdir()
        for f in transfer_dir.glob("transferset*"):
            shutil.copy(f, folder / f.name)
        model, _ = attacker.train_attacker(folder, "lenet", "MNIST", "40,80", device=-1, epochs=2, test_subset=60,
                                           progress=False)
        logs = [line.split("\t")[1:] for line in (folder / "train.80.log.tsv").read_text().splitlines()[1:]]
        runs[name] = (model.state_dict(), logs)
    (w_mem, log_mem), (w_str, log_str) = runs["memory"], runs["streaming"]
    assert log_mem == log_str
    assert all(torch.equal(w_mem[k], w_str[k]) for k in w_mem)
