"""The transfer step: the original query order, files, qpi, resuming after SIGKILL, shards."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ppoison_ext.attacks.knockoff import RUN_TIMES_FILE, random_query_order
from ppoison_ext.attacks.transferset import Y_FILE, load_transferset
from ppoison_ext.checkpoint import save_checkpoint
from ppoison_ext.fileio import atomic_write_json
from ppoison_ext.defenses import read_queries
from ppoison_ext.defenses.querylog import DISTANCE_COLUMNS
from ppoison_ext.models import get_net
from ppoison_ext.pipeline import transfer as T

REPO = Path(__file__).resolve().parents[1]
QUERYSET = "notMNIST"  # embedded; 10,000 images


def make_victim(folder: Path, seed: int = 0) -> Path:
    """An untrained LeNet victim folder (params.json + checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_checkpoint(folder / "checkpoint.pth.tar", get_net("lenet", "mnist", num_classes=10), arch="lenet",
                    epoch=0, best_acc=0.0)
    atomic_write_json(folder / "params.json", {"model_arch": "lenet", "num_classes": 10, "dataset": "MNIST"})
    return folder


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    return make_victim(tmp_path_factory.mktemp("victim"))


def run(victim, out, defense="none", args="", **kw):
    kw.setdefault("device_id", -1)
    kw.setdefault("nworkers", 0)
    kw.setdefault("progress", False)
    return T.transfer("random", victim, defense, args, out_dir=out, queryset=QUERYSET, **kw)


def tsv(path):
    lines = Path(path).read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


# --------------------------------------------------------------------------------------------
# query order


def literal_original(n, budget, nqueries, batch_size):
    """PP:defenses/adversary/transfer.py RandomAdversaryIters, verbatim index logic."""
    np.random.seed(42)
    all_idxs = np.arange(n)
    np.random.shuffle(all_idxs)
    idx_set = set(all_idxs[:budget])
    out, n_done = [], 0
    for t, B in enumerate(range(0, nqueries, batch_size)):
        idxs = np.random.choice(list(idx_set), replace=False, size=min(batch_size, nqueries - n_done))
        idx_set = idx_set - set(idxs)
        if len(idx_set) == 0:
            idx_set = set(all_idxs[:budget])
        out.append(idxs)
        n_done += len(idxs)
    return out


ORDER_CASES = [(n, budget, B, nq) for n in (1, 2, 7, 50, 257, 1000)
               for budget in sorted({1, max(1, n // 3), n - 1 or 1, n})
               for B in (1, 3, 8, 64, 256)
               for nq in sorted({budget, max(1, budget // 2)} | ({2 * budget} if budget % B == 0 else set()))]


def test_query_order_equals_original_loop():
    for n, budget, B, nq in ORDER_CASES:
        want = literal_original(n, budget, nq, B)
        got = random_query_order(n, budget, nq, B)
        assert len(got) == len(want), (n, budget, B, nq)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w, err_msg=str((n, budget, B, nq)))


def test_query_order_larger():
    for n, budget, B in ((10000, 10000, 64), (10000, 3000, 16), (3000, 2999, 8), (4000, 4000, 1)):
        got = random_query_order(n, budget, None, B)
        want = literal_original(n, budget, budget, B)
        assert all(np.array_equal(g, w) for g, w in zip(got, want)) and len(got) == len(want)


def test_query_order_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        random_query_order(10, 11)
    with pytest.raises(ValueError, match="batch_size divides budget"):
        random_query_order(10, 10, 11, 4)  # the original crashes mid-run here
    with pytest.raises(ValueError, match="batch_size"):
        random_query_order(10, 10, 10, 0)
    with pytest.raises(TypeError, match="nqueries"):
        random_query_order(10, 10, 2.5, 1)
    assert sum(len(b) for b in random_query_order(10, 8, 20, 4)) == 20  # refill when B divides budget


# --------------------------------------------------------------------------------------------
# end to end


@pytest.mark.parametrize("defense,args", [
    ("none", ""), ("topk", "topk:1,rounding:0"), ("mad", "epsilon:0.5,objmax:True"),
    ("rand_noise", "epsilon_z:0.5,dist_z:l1"),
], ids=["none", "top1", "mad", "rand_noise"])
def test_transfer_writes_files(victim, tmp_path, defense, args):
    out = run(victim, tmp_path / "out", defense, args, budget=300, batch_size=64, export_pickle_file=True)
    ts = load_transferset(out)
    assert len(ts) == 300 and ts.kind == "images" and list(ts.images.shape) == [300, 28, 28]
    np.testing.assert_array_equal(ts.indices.numpy(), np.concatenate(random_query_order(10000, 300, None, 64)))
    if defense == "topk":
        assert set(ts.y.flatten().tolist()) == {0.0, 1.0} and (ts.y.sum(1) == 1).all()
    else:
        torch.testing.assert_close(ts.y.sum(1), torch.ones(300), atol=1e-5, rtol=0)
    header, rows = tsv(out / "distancetransfer.log.tsv")
    assert header == DISTANCE_COLUMNS and [r[0] for r in rows] == ["300"]  # the tail row, written at the end
    l1 = float(rows[0][1])
    if defense == "mad":
        assert 0.4 < l1 <= 0.5 + 1e-6
    elif defense == "none":
        assert l1 == 0.0
    summary = json.loads((out / "run_times_summary.json").read_text())
    assert set(summary) == {"batch_size", "mean", "std"} and summary["batch_size"] == 64 and summary["mean"] > 0
    assert np.fromfile(out / RUN_TIMES_FILE, dtype="<f8").size == 5
    params = json.loads((out / "params_transfer.json").read_text())
    for key in ("policy", "victim_model_dir", "defense", "defense_args", "out_dir", "budget", "nqueries", "qpi",
                "queryset", "batch_size", "device_id", "nworkers", "train_transform", "log_prefix", "created_on"):
        assert key in params, key
    assert params["budget"] == 300 and params["log_prefix"] == "transfer"
    rows_q = read_queries(out, "transfer")
    assert rows_q.shape == (300, 22)
    with open(out / "transferset.pickle", "rb") as f:  # the explicit export only
        items = pickle.load(f)
    assert len(items) == 300 and items[0][0].dtype == np.uint8 and torch.equal(items[0][1], ts.y[0])


def test_qpi_averages_repeated_calls(victim, tmp_path):
    out = run(victim, tmp_path / "q", "rand_noise", "epsilon_z:2,dist_z:l2", budget=128, batch_size=64, qpi=3)
    ts = load_transferset(out)
    rows = torch.from_numpy(read_queries(out, "transfer"))
    assert rows.shape[0] == 128 * 3
    for t in range(2):
        calls = [rows[t * 192 + c * 64: t * 192 + (c + 1) * 64, 10:20] for c in range(3)]
        assert not torch.equal(calls[0], calls[1])  # the noise differs between the repeats
        torch.testing.assert_close(ts.y[t * 64:(t + 1) * 64], torch.stack(calls).mean(0), rtol=0, atol=1e-7)
    assert np.fromfile(out / RUN_TIMES_FILE, dtype="<f8").size == 6
    # deterministic: a rerun from scratch gives the same noisy posteriors
    out2 = run(victim, tmp_path / "q2", "rand_noise", "epsilon_z:2,dist_z:l2", budget=128, batch_size=64, qpi=3)
    assert torch.equal(load_transferset(out2).y, ts.y)


def test_resume_refuses_other_settings(victim, tmp_path):
    out = tmp_path / "r"
    run(victim, out, budget=128, batch_size=64)
    with pytest.raises(ValueError, match="batch_size: 64 there, 32 now"):
        run(victim, out, budget=128, batch_size=32)
    run(victim, out, budget=128, batch_size=32, resume=False)
    assert load_transferset(out).meta["knockoff"]["batch_size"] == 32
    run(victim, out, budget=128, batch_size=32)  # complete: nothing to do, files unchanged
    assert [r[0] for r in tsv(out / "distancetransfer.log.tsv")[1]] == ["128"]


# --------------------------------------------------------------------------------------------
# SIGKILL and resume


def _cmd(victim, out, defense, args):
    return [sys.executable, "-m", "ppoison_ext.pipeline.transfer", "random", str(victim), defense, args,
            "--out_dir", str(out), "--queryset", QUERYSET, "--budget", "2000", "--batch_size", "64", "--qpi", "2",
            "-d", "-1", "-w", "0", "--no-progress"]


def _rows(out):
    p = out / Y_FILE
    return p.stat().st_size // 40 if p.exists() else 0


def test_sigkill_and_resume_equals_uninterrupted(victim, tmp_path):
    defense, args = "rand_noise", "epsilon_z:1,dist_z:l1"  # stochastic: the resumed noise must match too
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "killed"
    rng = random.Random(1234)
    kills = []
    # three kills spread over the run (early, middle, late), each at a random moment inside a
    # window of committed rows, plus a random delay that lands it anywhere in a batch (between
    # the query log's write and the transfer set's commit, too); the process must be alive
    for lo, hi in ((1, 500), (600, 1100), (1200, 1600)):
        threshold = max(_rows(out) + 1, rng.randrange(lo, hi))
        proc = subprocess.Popen(_cmd(victim, out, defense, args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 50
        while _rows(out) < threshold and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.02))
        assert proc.poll() is None, f"the run ended before the kill at {threshold} rows"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(_rows(out))
    assert 0 < kills[0] < kills[1] < kills[2] < 2000, kills  # it really was interrupted, three times
    assert T.main(_cmd(victim, out, defense, args)[3:]) == 0  # the rerun that completes it (in-process)
    ref = run(victim, tmp_path / "ref", defense, args, budget=2000, batch_size=64, qpi=2)
    a, b = load_transferset(out), load_transferset(ref)
    assert len(a) == len(b) == 2000
    assert torch.equal(a.indices, b.indices) and torch.equal(a.y, b.y)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    _, rb = tsv(ref / "distancetransfer.log.tsv")
    assert [r[0] for r in rb] == ["1024", "2048", "3008", "4000"]
    # byte for byte: the distance rows depend only on the queries before them
    assert (out / "distancetransfer.log.tsv").read_bytes() == (ref / "distancetransfer.log.tsv").read_bytes()
    np.testing.assert_array_equal(read_queries(out, "transfer"), read_queries(ref, "transfer"))
    assert np.fromfile(out / RUN_TIMES_FILE, dtype="<f8").size == 32 * 2


# --------------------------------------------------------------------------------------------
# shards


def test_two_shards_merged_equal_unsharded(victim, tmp_path):
    defense, args = "rand_noise", "epsilon_z:1,dist_z:l2"
    kw = dict(budget=1100, batch_size=64, qpi=2)
    ref = run(victim, tmp_path / "ref", defense, args, **kw)
    out = tmp_path / "sharded"
    for i in (1, 0):
        d = run(victim, out, defense, args, num_shards=2, shard_id=i, **kw)
        assert d == out / f"shard-{i}"
    assert len(load_transferset(out / "shard-0")) == 9 * 64 and len(load_transferset(out / "shard-1")) == 1100 - 576
    with pytest.raises(ValueError, match="not 0 of 3"):
        T.merge_shards(out, 3, progress=False)
    with pytest.raises(ValueError, match="incomplete"):
        (out / "shard-1" / Y_FILE).write_bytes((out / "shard-1" / Y_FILE).read_bytes()[:-40])
        try:
            T.merge_shards(out, 2, progress=False)
        finally:
            run(victim, out, defense, args, num_shards=2, shard_id=1, **kw)  # resumes the lost query
    assert T.main(["random", str(victim), defense, args, "--out_dir", str(out), "--queryset", QUERYSET,
                   "--merge-shards", "2", "--no-progress"]) == 0
    a, b = load_transferset(out), load_transferset(ref)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.y, b.y)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    assert a.meta["knockoff"] == b.meta["knockoff"]
    assert (out / "distancetransfer.log.tsv").read_text() == (ref / "distancetransfer.log.tsv").read_text()
    np.testing.assert_array_equal(read_queries(out, "transfer"), read_queries(ref, "transfer"))
    assert np.fromfile(out / RUN_TIMES_FILE, dtype="<f8").size == 18 * 2
    assert json.loads((out / "params_transfer.json").read_text())["merged_from_shards"] == 2


def test_shard_arguments(victim, tmp_path):
    with pytest.raises(ValueError, match="go together"):
        run(victim, tmp_path, num_shards=2)
    with pytest.raises(ValueError, match="shard_id"):
        run(victim, tmp_path, num_shards=2, shard_id=2)
    with pytest.raises(ValueError, match="sequential"):
        T.transfer("adaptive", victim, "none", "", out_dir=tmp_path, queryset=QUERYSET, num_shards=2, shard_id=0)


def test_torchrun_env_selects_shard(victim, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    d = run(victim, tmp_path / "tr", budget=200, batch_size=64)
    assert d == tmp_path / "tr" / "shard-1" and len(load_transferset(d)) == 64 + 8


def test_cli(victim, tmp_path):
    p = T.build_parser()
    a = p.parse_args(["random", "v", "none", "", "--out_dir", "o", "--queryset", "MNIST"])
    assert (a.batch_size, a.qpi, a.device_id, a.nworkers, a.budget, a.nqueries, a.resume, a.seed) == \
        (256, 1, 0, 10, None, None, True, 42)
    assert p.parse_args(["random", "v", "none", "", "--out_dir", "o", "--queryset", "MNIST", "--no-resume"]).resume is False
    out = tmp_path / "cli"
    assert T.main(["random", str(victim), "topk", "topk:2", "--out_dir", str(out), "--queryset", QUERYSET,
                   "--budget", "100", "--batch_size", "50", "-d", "-1", "-w", "0", "--no-progress"]) == 0
    assert len(load_transferset(out)) == 100
    bogus = ["random", str(victim), "mad", "bogus:1", "--out_dir", str(out), "--queryset", QUERYSET]
    assert T.main(bogus) == 2
