"""The grid on Ray (``--executor ray``): the same files and ``results.csv`` byte for byte as the
local process pool, the local cluster on the loopback address only, and a Ray worker SIGKILLed
mid-cell retried by Ray and resumed by the cell to the uninterrupted result.

One Ray cluster (2 CPUs, started the way the executor starts one) serves the module; the first
test lets the grid start its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ppoison_ext.attacks.transferset import load_transferset
from ppoison_ext.pipeline import executors
from ppoison_ext.pipeline.executors import RayExecutor, is_gpu, open_executor

REPO = Path(__file__).resolve().parents[1]
# the compared runs are subprocesses with one environment (as in test_crash_safety.py); no Ray
# address inherited: the grid either starts its own cluster or is given the module's
ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
ENV["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install '.[ray]')")
needs_proc = pytest.mark.skipif(not Path("/proc/self/task").exists(),
                                reason="needs /proc to follow processes")

# test_crash_safety.py's grid, smaller: 1 victim, 3 defenses (one MAD), 2 budgets; 3 attack cells
GRID = """
[experiment]
name = "tiny"
seed = 7
device = -1
jobs = 2

[[victim]]
dataset = "MNIST"
arch = "lenet"
epochs = 1
lr = 0.05
momentum = 0.9
batch_size = 64
train_subset = 1000
test_subset = 200

[[attack]]
label = "knockoff-random"
policy = "random"
queryset = "notMNIST"
budget = 300
batch_size = 100
arch = "lenet"
budgets = [150, 300]
epochs = 2
lr = 0.02
momentum = 0.9
test_subset = 200

[eval]
batch_size = 100
test_subset = 200

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
CELLS = ("none/default", "random_noise/2.0", "MAD/0.5")


def _grid_cmd(cfg: Path, out: Path, *extra: str):
    return [sys.executable, "-m", "ppoison_ext.cli", "grid", str(cfg), "--out", str(out), "--no-progress",
            *extra]


def _run(cmd):
    subprocess.run(cmd, cwd=REPO, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    cfg.write_text(GRID)
    return cfg


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    """The grid on the local executor (the process pool), uninterrupted."""
    out = tmp_path_factory.mktemp("grid") / "local"
    _run(_grid_cmd(config, out, "--executor", "local"))
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs, started by the executor's own code; its GCS address."""
    pytest.importorskip("ray")
    import ray

    ex = RayExecutor(num_cpus=2)
    ex.__enter__()
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ex.__exit__(None, None, None)


def _markers(out: Path):
    """Every done.json of a grid run without its clock time, the output folder as ``{out}`` (MAD's
    arguments name the proxy's folder) and so without the fingerprint (a hash of the settings)."""
    found = {}
    for m in sorted(out.rglob("done.json")):
        d = json.loads(m.read_text().replace(str(out), "{out}"))
        d.pop("finished"), d.pop("fingerprint")
        found[str(m.relative_to(out))] = d
    return found


def _assert_same_grid(out: Path, ref: Path):
    def files(root):
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(out) == files(ref)
    assert (out / "results.csv").read_bytes() == (ref / "results.csv").read_bytes()
    assert json.loads((out / "results.json").read_text()) == json.loads((ref / "results.json").read_text())
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 6
    assert _markers(out) == _markers(ref)
    for sub in CELLS:
        a = load_transferset(out / "attack/MNIST-lenet/knockoff-random" / sub)
        b = load_transferset(ref / "attack/MNIST-lenet/knockoff-random" / sub)
        assert torch.equal(a.y, b.y) and torch.equal(a.indices, b.indices)


# --------------------------------------------------------------------------------------------
# processes and sockets, from /proc


def _descendants(pid: int):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and ("Z" in line or "X" in line) for line in f)
    except OSError:
        return False


def _busy_workers(root: int):
    """Ray workers under ``root`` running a cell (their title is ``ray::<task name>`` meanwhile)."""
    title = f"ray::{executors.TASK_NAME}"
    return [p for p in _descendants(root) if _cmdline(p).startswith(title) and _running(p)]


def _address(hex_addr: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hex_addr.split(":")[0])
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order 32-bit words
    return ipaddress.ip_address(raw)


def _listening(pids):
    """(pid, address) of every TCP socket listening, or UDP socket bound, in those processes."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                owner[link[8:-1]] = pid
    found = []
    for table, state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] == state and cols[9] in owner:
                found.append((owner[cols[9]], _address(cols[1])))
    return found


def _loopback(ip) -> bool:
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


# --------------------------------------------------------------------------------------------
# no Ray needed


def test_executor_choice_and_gpu_requests():
    assert open_executor("local").__enter__() is None
    with pytest.raises(ValueError, match="--address needs --executor ray"):
        open_executor("local", address="127.0.0.1:6379")
    with pytest.raises(ValueError, match="executor must be one of"):
        open_executor("dask")
    assert isinstance(open_executor("ray", workers=0), RayExecutor)
    assert [is_gpu(d) for d in (-1, "-1", None, "cpu", 0, "1", "cuda", "cuda:1")] == [False] * 4 + [True] * 4
    addresses = (None, "127.0.0.1:6379", "localhost:1", "[::1]:2", "ray://127.0.0.1:10001",
                 "10.0.0.5:6379", "auto")
    assert [executors._loopback(a) for a in addresses] == [True] * 5 + [False] * 2

    @dataclasses.dataclass
    class Step:
        device_id: object = 3
        out_dir: str = "x"

    job = {"folder": "f", "settings": {"device_id": 3}, "eval": Step()}
    moved = executors._on_assigned_gpu(job)
    assert moved["eval"] == Step(device_id=0) and moved["settings"] == {"device_id": 3}
    assert job["eval"].device_id == 3  # a copy
    assert executors._target(json.dumps) == "json:dumps"


# --------------------------------------------------------------------------------------------
# on Ray


@needs_ray
def test_ray_grid_writes_what_the_local_grid_writes(config, reference, tmp_path):
    out = tmp_path / "ray"
    _run(_grid_cmd(config, out, "--executor", "ray"))  # no --address: it starts its own cluster
    _assert_same_grid(out, reference)


@needs_ray
@needs_proc
def test_local_cluster_listens_on_loopback_only(cluster):
    import ray

    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]
    assert cluster.startswith("127.0.0.1:")
    sockets = _listening([os.getpid()] + _descendants(os.getpid()))
    assert len(sockets) >= 3, sockets  # the GCS, the raylet, this driver at least
    assert all(_loopback(ip) for _, ip in sockets), [(p, str(ip), _cmdline(p)[:60]) for p, ip in sockets]


@needs_ray
def test_ray_executor_results_gpu_fallback_and_errors(cluster, caplog):
    ex = RayExecutor(address=cluster)
    with ex, caplog.at_level(logging.WARNING, logger=executors.__name__):
        out = dict(ex.run(json.dumps, [{"a": 1}, {"b": 2}, {"c": 3}], gpu=True))
        assert out == {0: '{"a": 1}', 1: '{"b": 2}', 2: '{"c": 3}'}
        assert "no GPU" in caplog.text
        with pytest.raises(TypeError):  # json.loads of a dict: raised here once the others finished
            list(ex.run(json.loads, [{"a": 1}, '{"b": 2}']))
    assert ex._started is False  # a connection it found was not its to shut down
    import ray

    # a worker that dies fails its cell once the retries are spent (none here); the kill test
    # below passes because Ray retried
    with pytest.raises(ray.exceptions.RayError):
        list(RayExecutor(address=cluster, max_retries=0).run(os._exit, [3]))


@needs_ray
@needs_proc
def test_ray_worker_killed_mid_cell_is_retried_and_resumes_to_the_uninterrupted_result(
        cluster, config, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = _grid_cmd(config, out, "--executor", "ray", "--address", cluster)
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rng = random.Random(11)
    # kill 1: once eval-bbox cells have begun; kill 2: once attacker training has begun in a cell
    stages = [lambda: any((out / "eval").rglob("started.json")) if (out / "eval").exists() else False,
              lambda: any((out / "attack").rglob("train.*.log.tsv")) if (out / "attack").exists() else False]
    killed = []
    try:
        for ready in stages:
            deadline = time.monotonic() + 240
            while not ready() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            busy = []
            while not busy and proc.poll() is None and time.monotonic() < deadline:
                busy = [p for p in _busy_workers(os.getpid()) if p not in killed]
                time.sleep(0.005)
            assert busy, "no Ray worker was running a cell"
            victim = rng.choice(busy)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the killed tasks came back: without a retry the grid fails (WorkerCrashedError)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert len(set(killed)) == 2 and not any(_running(p) for p in killed)
    _assert_same_grid(out, reference)
