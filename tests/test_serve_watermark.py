"""DAWN in ``ppoison serve``, on real server processes: a Knockoff clone stolen over HTTP is claimed
by ``ppoison verify`` at α = 0.01 while an independently trained MNIST LeNet is not, and a kill -9
mid-stream plus a restart leaves the marked set and every answer as an uninterrupted server's."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="ppoison serve needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="the serve tests need httpx")

from _serve_models import models  # noqa: E402
from test_serve import _npy_post  # noqa: E402
from ppoison_ext import cli  # noqa: E402
from ppoison_ext.client.wire import NPY, encode_npy  # noqa: E402
from ppoison_ext.pipeline import attacker, transfer, verify, victim  # noqa: E402
from ppoison_ext.serve import create_app  # noqa: E402
from ppoison_ext.serve.auth import append_key  # noqa: E402
from ppoison_ext.serve.process import ServerProcess  # noqa: E402

RATE = "0.05"  # ~100 marks among the thief's 2,000 queries: enough for α = 0.01 in a short test


def _watermarks(log_dir):
    with sqlite3.connect(log_dir / "ledger.sqlite") as db:
        return db.execute("SELECT * FROM watermarks ORDER BY key_id, row").fetchall()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    victim_dir, _ = models(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("watermark")
    assert cli.main(["serve-keygen", "--watermark-key", str(tmp / "wm.key")]) == 0
    (tmp / "thief.key").write_text(append_key(tmp / "keys.txt", "thief") + "\n")
    return victim_dir, tmp


def _server_args(victim_dir, tmp, logs):
    return [victim_dir, "--api-keys", tmp / "keys.txt", "--log-dir", logs, "--watermark-key", tmp / "wm.key",
            "--watermark-rate", RATE, "--max-wait-ms", "0"]


def test_stolen_clone_is_claimed_and_an_innocent_is_not(setup):
    victim_dir, tmp = setup
    with ServerProcess(_server_args(victim_dir, tmp, tmp / "logs"), log_path=tmp / "server.out") as srv:
        assert transfer.main(["random", srv.url, "--api-key-file", str(tmp / "thief.key"),
                              "--out_dir", str(tmp / "clone"), "--queryset", "notMNIST", "--budget", "2000",
                              "--batch_size", "50", "-d", "-1", "-w", "0", "--seed", "3", "--no-progress"]) == 0
    marks = _watermarks(tmp / "logs")
    assert 0.03 < len(marks) / 2000 < 0.07
    attacker.train_attacker(tmp / "clone", "lenet", "MNIST", "2000", device=-1, epochs=30, lr=0.05,
                            momentum=0.9, test_subset=200, num_workers=0, progress=False)
    # the suspect as a model folder, as the owner would receive it: the thief's final weights (the
    # best-on-test checkpoint can be an early epoch that has not yet fit the isolated wrong labels)
    (tmp / "clone" / "params.json").write_text(json.dumps({"model_arch": "lenet", "num_classes": 10,
                                                           "dataset": "MNIST"}))
    shutil.copy(tmp / "clone" / "last.2000.pth.tar", tmp / "clone" / "checkpoint.pth.tar")
    victim.train_victim("MNIST", "lenet", tmp / "innocent", device=-1, epochs=1, train_subset=2000,
                        test_subset=100, lr=0.05, seed=11, progress=False)
    claims = {}
    for name, folder in (("clone", tmp / "clone"), ("innocent", tmp / "innocent")):
        out = tmp / f"{name}.json"
        assert verify.main([str(folder), "--watermark-log", str(tmp / "logs"), "--key-id", "thief",
                            "--alpha", "0.01", "--out", str(out), "-d", "-1"]) == 0
        claims[name] = json.loads(out.read_text())
    assert claims["clone"]["n"] == claims["innocent"]["n"] == len({m[3] for m in marks})
    assert claims["clone"]["claimed"] and claims["clone"]["p_chance"] <= 0.01
    assert not claims["innocent"]["claimed"] and claims["innocent"]["wsr"] < claims["clone"]["wsr"]


def test_kill_mid_stream_keeps_the_marked_set(setup):
    victim_dir, tmp = setup
    from ppoison_ext.datasets import get_dataset, get_transform

    ds = get_dataset("notMNIST", train=True, transform=get_transform("mnist", "test"))
    x = torch.stack([ds[i][0] for i in range(600)])
    key = (tmp / "thief.key").read_text().strip()
    runs = {}
    for name in ("straight", "killed"):
        logs, answers = tmp / f"kill-{name}", []
        srv = ServerProcess(_server_args(victim_dir, tmp, logs), log_path=tmp / f"{name}.out").start()
        try:
            for lo in range(0, 600, 40):
                if name == "killed" and lo == 320:
                    srv.kill()  # kill -9: no shutdown code runs
                    srv = ServerProcess(_server_args(victim_dir, tmp, logs), log_path=tmp / f"{name}.out")
                    srv.start()
                r = _npy_post(srv.url, key, x[lo:lo + 40].numpy())
                assert r.status_code == 200
                answers.append(np.load(io.BytesIO(r.content)))
        finally:
            srv.stop()
        runs[name] = (_watermarks(logs), np.concatenate(answers))
    assert runs["killed"][0] == runs["straight"][0] and len(runs["straight"][0]) > 10
    assert runs["killed"][1].tobytes() == runs["straight"][1].tobytes()


def test_create_app_records_what_dawn_marks(setup, tmp_path):
    from fastapi.testclient import TestClient

    from ppoison_ext.defenses import DAWN, build_defense, read_watermark_key
    from ppoison_ext.modeldir import load_model_dir

    victim_dir, tmp = setup
    model = load_model_dir(victim_dir, device="cpu")[0]
    d = DAWN(build_defense("none", model=model), key=read_watermark_key(tmp / "wm.key"), rate=0.3)
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with TestClient(create_app(d, input_shape=(1, 28, 28), log_dir=tmp_path)) as client:
        r = client.post("/v1/predict", content=encode_npy(x.numpy()), headers={"content-type": NPY})
        assert r.status_code == 200
        labels = r.json()["labels"]
    want = d.perturb(x).marks
    rows = _watermarks(tmp_path)
    assert [m[1] for m in rows] == (want >= 0).nonzero().flatten().tolist()
    assert [m[2] for m in rows] == want[want >= 0].tolist() == [labels[m[1]] for m in rows]
    stored = torch.stack([torch.frombuffer(bytearray(m[5]), dtype=torch.float32).view(1, 28, 28)
                          for m in rows])
    assert torch.equal(stored, x[want >= 0])
