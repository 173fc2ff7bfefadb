"""train_model under torchrun: 2 gloo processes on the CPU, DistributedDataParallel.

The test launches this file as the worker script:
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_distributed.py OUT``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _worker(out_dir: str) -> None:
    torch.set_num_threads(1)
    from torch import nn
    from torch.utils.data import TensorDataset

    from ppoison_ext import distributed
    from ppoison_ext.training import soft_cross_entropy, train_model

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=g)
    y = (x[:, 0] > 0).long()
    trainset, testset = TensorDataset(x, y), TensorDataset(x[:37], y[:37])  # odd size: uneven test shards
    soft = TensorDataset(x, torch.softmax(torch.randn(96, 2, generator=g), 1))
    torch.manual_seed(1234 + int(os.environ["RANK"]))  # different init per rank: DDP must sync it
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model, s1 = train_model(model, trainset, out_dir, testset=testset, epochs=2, batch_size=16, device="cpu",
                            seed=7, progress=False, arch="mlp")
    # a second call on the same model (as train-attacker does per budget) reuses the DDP wrapper
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    model, s2 = train_model(model, soft, out_dir, testset=testset, epochs=1, batch_size=16, device="cpu",
                            seed=7, progress=False, arch="mlp", optimizer=opt, criterion=soft_cross_entropy,
                            checkpoint_suffix=".96")
    ctx = distributed.get_context()
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().numpy().tobytes())
    # per-rank result files are this test's own output, not the library's
    Path(out_dir, f"rank{ctx.rank}.txt").write_text(
        f"{ctx.world_size} {h.hexdigest()} {s1['best_test_acc']} {s2['epochs_done']}\n")
    distributed.cleanup()


def test_train_model_two_gloo_ranks(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = (tmp_path / "rank0.txt").read_text().split()
    r1 = (tmp_path / "rank1.txt").read_text().split()
    assert r0[0] == r1[0] == "2"
    assert r0[1] == r1[1], "ranks finished with different parameters"
    assert r0[2] == r1[2] and r0[3] == r1[3] == "1"  # all-reduced metrics agree
    for name in ("checkpoint.pth.tar", "train.log.tsv", "last.pth.tar", "checkpoint.96.pth.tar",
                 "train.96.log.tsv"):
        assert (tmp_path / name).is_file(), name
    rows = (tmp_path / "train.log.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["run_id", "epoch", "split", "loss", "accuracy", "best_accuracy"]
    assert len(rows) == 1 + 2 * 2  # written once (rank 0 only), two rows per epoch
    ckpt = torch.load(tmp_path / "checkpoint.96.pth.tar", weights_only=True)
    assert ckpt["arch"] == "mlp" and not any(k.startswith("module.") for k in ckpt["state_dict"])
    # the saved weights are the weights both ranks ended with
    h = hashlib.sha256()
    last = torch.load(tmp_path / "last.96.pth.tar", weights_only=True)["state_dict"]
    for t in last.values():
        h.update(t.numpy().tobytes())
    assert h.hexdigest() == r0[1]


def test_single_process_context_is_noop(monkeypatch):
    from ppoison_ext import distributed

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.launched_with_torchrun()
    ctx = distributed.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    assert distributed.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert distributed.shard_indices(5, 1, 2) == [1, 3]
    assert distributed.is_main_process()


def test_env_world_rejects_garbage(monkeypatch):
    from ppoison_ext import distributed

    monkeypatch.setenv("RANK", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK"):
        distributed.env_world()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1])
