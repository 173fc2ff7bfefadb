"""Per-key extraction detection in ``ppoison serve``, on a real server process: a JBDA-like key is
refused before its budget ends while ten benign keys never are; a kill -9 mid-stream and a restart
leave every key's flag and scores as an uninterrupted server's; ``serve-audit`` reports them; a
flagged key is answered by another defense through ``create_app``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi", reason="ppoison serve needs the 'serve' extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx")

from _serve_models import models  # noqa: E402
from test_serve import _npy_post, _uvicorn  # noqa: E402
from ppoison_ext.client import RemoteBlackbox  # noqa: E402
from ppoison_ext.datasets import get_dataset, get_transform  # noqa: E402
from ppoison_ext.defenses import build_defense  # noqa: E402
from ppoison_ext.detectors import DADD  # noqa: E402
from ppoison_ext.serve import create_app  # noqa: E402
from ppoison_ext.serve.audit import audit  # noqa: E402
from ppoison_ext.serve.auth import append_key  # noqa: E402
from ppoison_ext.serve.ledger import Ledger, LedgerEntry  # noqa: E402
from ppoison_ext.serve.process import ServerProcess  # noqa: E402

BENIGN = [f"user{i}" for i in range(10)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return models(tmp_path_factory)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    out = {"file": path}
    for key_id in BENIGN + ["thief"]:
        out[key_id] = append_key(path, key_id, 2000)
    return out


@pytest.fixture(scope="module")
def streams():
    """Ten benign accounts of 150 MNIST test images each, and a JBDA-like stream: 10 seeds, five
    rounds in which every query so far spawns a child at 0.1·sign(noise) (pixel units), 320 queries."""
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    x = torch.stack([ds[i][0] for i in range(1510)])
    benign = [x[10 + 150 * i:10 + 150 * (i + 1)] for i in range(10)]
    g = torch.Generator().manual_seed(7)
    q = list(x[:10])
    for _ in range(5):
        q += [p + (0.1 / 0.3081) * torch.randn(p.shape, generator=g).sign() for p in list(q)]
    return benign, torch.stack(q)


def _send(url, key, x, size=16):
    """Sends x in requests of ``size``; the status of each."""
    return [_npy_post(url, key, x[i:i + size].numpy()).status_code for i in range(0, x.shape[0], size)]


def test_jbda_key_refused_benign_keys_never(dirs, keys, streams, tmp_path):
    benign, thief = streams
    args = [dirs[0], "--api-keys", keys["file"], "--log-dir", tmp_path, "--detector", "prada",
            "--on-detect", "refuse", "--max-wait-ms", "0"]
    with ServerProcess(args, log_path=tmp_path / "server.out") as srv:
        for key_id, x in zip(BENIGN, benign):
            assert set(_send(srv.url, keys[key_id], x)) == {200}
        codes = _send(srv.url, keys["thief"], thief)
        r = _npy_post(srv.url, keys["thief"], thief[:1].numpy())
        metrics = httpx.get(srv.url + "/metrics").text
        info = httpx.get(srv.url + "/v1/info", headers={"X-API-Key": keys["thief"]}).json()
    first = codes.index(403)
    assert codes[0] == 200 and codes[first:] == [403] * (len(codes) - first)
    assert r.status_code == 403 and r.json()["field"] == "detector" and "prada" in r.json()["detail"]
    assert info["budget_remaining"] == 2000 - 16 * codes.index(403)  # refusals charge nothing
    assert "ppoison_detector_flagged_keys 1.0" in metrics and info["detector"] == "prada"
    rows = {r["key_id"]: r for r in audit(tmp_path)}
    assert not any(rows[k]["flagged"] for k in BENIGN) and all(rows[k]["queries"] == 150 for k in BENIGN)
    assert rows["thief"]["flagged"] and rows["thief"]["flagged_since"] <= rows["thief"]["queries"] < 320


def test_kill_mid_stream_restores_flag_and_scores(dirs, keys, streams, tmp_path):
    benign, thief = streams
    runs = {}
    for name in ("straight", "killed"):
        logs = tmp_path / name
        args = [dirs[0], "--api-keys", keys["file"], "--log-dir", logs, "--detector", "prada",
                "--detector-args", "latch:false", "--on-detect", "log", "--max-wait-ms", "0"]
        srv = ServerProcess(args, log_path=tmp_path / f"{name}.out").start()
        try:
            _send(srv.url, keys["user0"], benign[0][:70])
            _send(srv.url, keys["thief"], thief[:150])
            if name == "killed":
                srv.kill()  # kill -9 mid-stream: no shutdown code runs
                srv = ServerProcess(args, log_path=tmp_path / f"{name}.out").start()
            _send(srv.url, keys["user0"], benign[0][70:])
            assert set(_send(srv.url, keys["thief"], thief[150:])) == {200}
        finally:
            srv.stop()
        runs[name] = audit(logs)
    assert runs["killed"] == runs["straight"]
    thief_row = next(r for r in runs["killed"] if r["key_id"] == "thief")
    assert thief_row["detector_queries"] == 320 and thief_row["last_score"] is not None


def test_flagged_key_is_answered_by_the_other_defense(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))
    defense = build_defense("none", "", model=model)
    other = build_defense("topk", "topk:1", model=model)
    detector = DADD(torch.zeros(5, 8), torch.eye(8).expand(5, 8, 8), tau=-1.0, window=4)  # every window flags
    x = torch.randn(12, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    app = create_app(defense, input_shape=(1, 4, 4), log_dir=tmp_path, detector=detector, on_detect=other)
    with _uvicorn(app) as url, RemoteBlackbox(url) as bb:
        first = bb(x[:4])  # fills the first window: flagged from the next request on
        second = bb(x[4:])
        assert bb.info["on_detect"] == type(other).__name__
    assert torch.equal(first, defense(x[:4])) and torch.equal(second, other(x[4:]))
    row = audit(tmp_path)[0]
    assert row["flagged"] and row["flagged_since"] == 4 and row["detector_queries"] == 12


def test_ledger_records_cut_back_to_committed_rows(tmp_path):
    ledger = Ledger(tmp_path, {"k": None}, record_width=3, record_tag="t")
    y = torch.full((2, 4), 0.25)
    ledger.commit([LedgerEntry("r1", "k", y, y, records=torch.arange(6.0).view(2, 3))])
    ledger.close()
    with open(tmp_path / "k" / "records.f32", "ab") as f:  # a batch appended, its transaction lost
        f.write(np.ones(5, np.float32).tobytes())
    ledger = Ledger(tmp_path, {"k": None}, record_width=3, record_tag="t")
    assert torch.equal(ledger.read_records("k"), torch.arange(6.0).view(2, 3))
    ledger.close()
    other = Ledger(tmp_path, {"k": None}, record_width=4, record_tag="u")  # another detector: a new stream
    assert other.read_records("k").shape == (0, 4)
    assert json.loads((tmp_path / "k" / "records.json").read_text())["first_row"] == 2
    other.close()


def test_detector_process_equals_in_process_and_reports_its_death():
    """The child's summaries equal the detector run in this process on the same record stream (in
    uneven pieces); a failing observation is logged and the child goes on; a dead child makes
    summary() raise (the server answers 503) instead of waiting forever."""
    from ppoison_ext.detectors import PRADA
    from ppoison_ext.serve.watcher import DetectorProcess

    det = PRADA([8], delta=0.99)
    g = torch.Generator().manual_seed(0)
    classes = torch.randint(3, (300, 1), generator=g).float()
    records = torch.cat([torch.randn(300, 8, generator=g), classes], 1)
    want = det.new_state()
    det.observe(want, records)
    proc = DetectorProcess(det)
    try:
        for lo, hi in ((0, 1), (1, 65), (65, 200), (200, 300)):
            proc.observe("k", records[lo:hi])
        got = proc.summary("k")
        assert (got.queries, got.flag, got.flagged_at) == (300, want.flag, want.flagged_at)
        assert got.score == want.score
        proc.observe("bad", torch.zeros(2, 5))  # the wrong width: observe raises in the child
        assert proc.summary("bad").queries == 0 and proc.summary("k").queries == 300
        proc._proc.kill()
        proc._proc.join()
        proc.observe("k", records[:1])  # into a closed pipe: no error here (the records are committed)
        with pytest.raises(RuntimeError, match="detector process failed"):
            proc.summary("k")
    finally:
        proc.close()
