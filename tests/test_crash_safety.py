"""SIGKILL at random moments during attacker training and the experiment grid: nothing finished
is lost or redone, and the resumed run ends exactly where an uninterrupted one does. Plus
same-seed determinism of transfer sets and attackers on CPU.

(Transfer-set construction has its own kill test in test_transfer.py.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_grid
from ppoison_ext.attacks.transferset import load_transferset
from ppoison_ext.pipeline import attacker, victim
from ppoison_ext.pipeline.grid import collect_results, run_grid
from ppoison_ext.pipeline.transfer import transfer

REPO = Path(__file__).resolve().parents[1]
FAST = ["-d", "-1", "-w", "0", "--no-progress"]
# every run that is compared runs as a subprocess with this environment: same thread count, so
# the same floating-point reduction order
ENV = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(cmd):
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("victim")
    assert victim.main(["MNIST", "lenet", "-o", str(out), "--epochs", "1", "--train_subset", "1000",
                        "--test_subset", "200", "--lr", "0.05", "--momentum", "0.9"] + FAST) == 0
    return out


def _transfer(victim_dir, out, defense="rand_noise", args="epsilon_z:1,dist_z:l1,seed:3", budget=600):
    transfer("random", victim_dir, defense, args, out_dir=out, queryset="notMNIST", budget=budget, batch_size=100,
             device_id=-1, nworkers=0, progress=False)
    return out


def _log_rows(path: Path):
    """Per-epoch rows without the run id (a resumed run has several)."""
    if not path.exists():
        return []
    return [line.split("\t")[1:] for line in path.read_text().splitlines()[1:]]


def _state(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _kill_when(proc, ready, rng, timeout=120.0, jitter=0.05, watch=lambda: None):
    """SIGKILLs ``proc`` once ``ready()`` holds, plus a random 0 to ``jitter`` s; ``watch()`` runs at
    every poll and just before the kill. True if the process was still running."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        watch()
        time.sleep(0.002)
    time.sleep(rng.uniform(0, jitter))
    watch()
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


# --------------------------------------------------------------------------------------------
# attacker training


ATTACKER_ARGS = ["lenet", "MNIST", "--budgets", "300,600", "--epochs", "4", "--test_subset", "300",
                 "--lr", "0.02", "--momentum", "0.9"]


def test_attacker_sigkill_and_resume_equals_uninterrupted(victim_dir, tmp_path):
    ref = _transfer(victim_dir, tmp_path / "ref")
    killed = tmp_path / "killed"
    shutil.copytree(ref, killed)
    cmd = [sys.executable, "-m", "ppoison_ext.pipeline.attacker", str(killed)] + ATTACKER_ARGS + FAST
    rows = lambda: len(_log_rows(killed / "train.300.log.tsv")) + len(_log_rows(killed / "train.600.log.tsv"))  # noqa: E731
    rng = random.Random(99)
    seen = []
    for _ in range(2):  # two kills at random epochs of the 16 log rows (2 budgets x 4 epochs x 2)
        threshold = rows() + rng.randrange(1, 6)
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _kill_when(proc, lambda: rows() >= threshold, rng), "finished before it could be killed"
        seen.append(rows())
    assert 0 < seen[0] < 16 and seen[1] < 16, seen
    _run(cmd)
    _run([sys.executable, "-m", "ppoison_ext.pipeline.attacker", str(ref)] + ATTACKER_ARGS + FAST)
    for b in (300, 600):
        assert _log_rows(killed / f"train.{b}.log.tsv") == _log_rows(ref / f"train.{b}.log.tsv")
        for name in (f"last.{b}.pth.tar", f"checkpoint.{b}.pth.tar"):
            a, r = _state(killed / name), _state(ref / name)
            assert a.keys() == r.keys() and all(torch.equal(a[k], r[k]) for k in a), name


# --------------------------------------------------------------------------------------------
# the experiment grid


GRID = tiny_grid.HEAD + """
[[defense]]
label = "none"
name = "none"
args = ""

[[defense]]
label = "random noise"
name = "rand_noise"
param = "epsilon_z"
values = [2.0]
args = "epsilon_z:{value},dist_z:l1,seed:5"

[[defense]]
label = "MAD"
name = "mad"
param = "epsilon"
values = [0.5]
args = "epsilon:{value},objmax:True,oracle:argmax,model_adv_proxy:{proxy}"
"""


def _children(pid: int):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to follow the worker processes")
def test_grid_sigkill_resume_skips_finished_cells_and_equals_uninterrupted(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(GRID)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ppoison_ext.cli", "grid", str(cfg), "--out", str(out), "--no-progress"]
    markers = lambda: sorted((out / "attack").rglob("done.json")) if (out / "attack").exists() else []  # noqa: E731
    cells = lambda: [m for m in markers() if m.parent.name != "transfer"]  # noqa: E731
    rng = random.Random(5)

    # kill 1: somewhere in victim training or eval; kill 2: after a cell finished, mid-way through the rest
    stages = [lambda: (out / "victims").exists() and any((out / "victims").rglob("train.log.tsv")),
              lambda: len(cells()) >= 1]
    for ready in stages:
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        workers = set()
        alive = _kill_when(proc, ready, rng, timeout=300, jitter=0.3, watch=lambda: workers.update(_children(proc.pid)))
        assert alive, "the grid finished before it could be killed"
        # orphaned workers notice and exit instead of racing the rerun
        deadline = time.monotonic() + 20
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_running(w) for w in workers), workers
    done_before = {m: m.stat().st_mtime_ns for m in cells()}
    assert 1 <= len(done_before) < 3, done_before

    _run(cmd)
    resumed = collect_results(out, write=False)
    for m, mtime in done_before.items():  # finished cells were not redone
        assert m.stat().st_mtime_ns == mtime, m
    _run(cmd[:-3] + ["--out", str(tmp_path / "uninterrupted"), "--no-progress"])
    reference = collect_results(tmp_path / "uninterrupted", write=False)
    assert len(resumed["rows"]) == len(reference["rows"]) == 6
    assert resumed["rows"] == reference["rows"]
    assert json.loads((out / "results.json").read_text())["rows"] == reference["rows"]
    for sub in ("none/default", "random_noise/2.0", "MAD/0.5"):
        a = load_transferset(out / "attack/MNIST-lenet/knockoff-random" / sub)
        b = load_transferset(tmp_path / "uninterrupted/attack/MNIST-lenet/knockoff-random" / sub)
        assert torch.equal(a.y, b.y) and torch.equal(a.indices, b.indices)


def test_grid_rerun_is_a_no_op_and_changed_settings_rerun(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(GRID.replace("jobs = 2", "jobs = 1").replace('values = [2.0]', 'values = [2.0, 4.0]'))
    out = tmp_path / "g"
    first = run_grid(cfg, out, progress=False, only_defenses=["none", "random noise"])
    markers = {m: m.stat().st_mtime_ns for m in out.rglob("done.json")}
    again = run_grid(cfg, out, progress=False, only_defenses=["none", "random noise"])
    assert again["rows"] == first["rows"]
    assert {m: m.stat().st_mtime_ns for m in out.rglob("done.json")} == markers
    # one changed attack setting: every attack cell reruns, victims and evals are kept
    cfg.write_text(cfg.read_text().replace("epochs = 3", "epochs = 2"))
    run_grid(cfg, out, progress=False, only_defenses=["none"])
    changed = {m for m in markers if m.stat().st_mtime_ns != markers[m]}
    assert changed and all("attack" in m.parts for m in changed)
    # the old 3-epoch attacker was not resumed: its files were replaced, not appended to
    cell = out / "attack/MNIST-lenet/knockoff-random/none/default"
    assert [r[:2] for r in _log_rows(cell / "train.200.log.tsv")] == [["1", "train"], ["1", "test"],
                                                                      ["2", "train"], ["2", "test"]]
    assert torch.load(cell / "last.400.pth.tar", weights_only=True)["epoch"] == 2
    assert all(m.stat().st_mtime_ns == t for m, t in markers.items() if "victims" in m.parts or "eval" in m.parts)


# --------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("defense, args", [("rand_noise", "epsilon_z:2,dist_z:l2,seed:11"),
                                           ("mad", "epsilon:0.5,objmax:True,oracle:random")])
def test_same_seed_gives_identical_transfer_sets_and_attackers(victim_dir, tmp_path, defense, args):
    runs = []
    for name in ("a", "b"):
        out = _transfer(victim_dir, tmp_path / name, defense, args, budget=300)
        model, summary = attacker.train_attacker(out, "lenet", "MNIST", "300", device=-1, epochs=2,
                                                 test_subset=200, progress=False)
        runs.append((load_transferset(out), model.state_dict(), _log_rows(out / "train.300.log.tsv")))
    (ta, sa, la), (tb, sb, lb) = runs
    assert torch.equal(ta.y, tb.y) and torch.equal(ta.indices, tb.indices)
    np.testing.assert_array_equal(np.asarray(ta.images), np.asarray(tb.images))
    assert la == lb and len(la) == 4
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_transfer_set_from_another_victim_is_refused(victim_dir, tmp_path):
    out = _transfer(victim_dir, tmp_path / "t", "none", "", budget=100)
    params = json.loads((victim_dir / "params.json").read_text())
    other = tmp_path / "other_victim"
    shutil.copytree(victim_dir, other)
    (other / "params.json").write_text(json.dumps({**params, "dataset": "FashionMNIST"}))
    meta_file = out / "transferset.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "victim_model_dir": str(other)}))
    with pytest.raises(ValueError, match=r"transferset.json.*FashionMNIST.*MNIST"):
        attacker.train_attacker(out, "lenet", "MNIST", "100", device=-1, epochs=1, progress=False)
