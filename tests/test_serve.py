"""``ppoison serve`` against a real uvicorn server process on 127.0.0.1 (a free port):
endpoints, refusals naming the field, micro-batching that never changes an answer, budgets
that survive a restart, per-key query logs that match what was answered; ``create_app`` and
``create_router`` serving a user's own model on uvicorn in this process."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import sqlite3
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi", reason="ppoison serve needs the 'serve' extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serve tests need httpx")

from _serve_models import mad_args, models, png_b64  # noqa: E402
from ppoison_ext.client import RemoteBlackbox  # noqa: E402
from ppoison_ext.client.wire import NPY, decode_npy, encode_npy  # noqa: E402
from ppoison_ext.datasets import get_dataset, get_transform  # noqa: E402
from ppoison_ext.defenses import build_defense, read_queries  # noqa: E402
from ppoison_ext.serve.auth import append_key  # noqa: E402
from ppoison_ext.serve import create_app, create_router  # noqa: E402
from ppoison_ext.serve.process import ServerProcess, free_port  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return models(tmp_path_factory)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    path = folder / "keys.txt"
    out = {"file": path}
    for key_id, budget in (("alice", 100000), ("carol", 100000), ("bob", 5)):
        out[key_id] = append_key(path, key_id, budget)
    return out


@pytest.fixture(scope="module")
def server(dirs, keys, tmp_path_factory):
    victim_dir, proxy_dir = dirs
    logs = tmp_path_factory.mktemp("serve-logs")
    args = [victim_dir, "--defense", "mad", "--defense-args", mad_args(proxy_dir), "--api-keys", keys["file"],
            "--log-dir", logs, "--max-batch", "64", "--max-wait-ms", "30", "--max-request-images", "32",
            "--max-body-mb", "1"]
    with ServerProcess(args, log_path=logs / "server.out") as srv:
        srv.logs = logs
        yield srv


def test_server_process_takes_paths_relative_to_the_callers_directory(dirs, tmp_path, monkeypatch):
    victim_dir, _ = dirs
    monkeypatch.chdir(victim_dir.parent)
    with ServerProcess([victim_dir.name, "--defense", "none", "--log-dir", "logs-relative"],
                       log_path=tmp_path / "server.out") as srv:
        assert httpx.get(srv.url + "/v1/info", timeout=10).json()["num_classes"] == 10
    assert (victim_dir.parent / "logs-relative" / "ledger.sqlite").is_file()


def _h(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def mnist():
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    idx = np.arange(48)
    x = torch.stack([ds[int(i)][0] for i in idx])
    return ds.data[idx], x


def _npy_post(url, key, x, **headers):
    return httpx.post(url + "/v1/predict", content=encode_npy(np.asarray(x, dtype=np.float32)),
                      headers={**_h(key), "Content-Type": NPY, "Accept": NPY, **headers}, timeout=30)


def test_health_info_metrics(server, keys, dirs):
    assert httpx.get(server.url + "/v1/health").json()["status"] == "ok"
    assert httpx.get(server.url + "/v1/info").status_code == 401
    r = httpx.get(server.url + "/v1/info", headers=_h(keys["alice"]))
    info = r.json()
    assert info["num_classes"] == 10 and info["defense"] == "mad" and info["model"] == "lenet"
    assert info["dataset"] == "MNIST" and info["input_shape"] == [1, 28, 28] and len(info["classes"]) == 10
    assert info["batch_independent"] is True and info["key_id"] == "alice"
    assert str(dirs[1]) not in r.text and "proxy" not in r.text and "epsilon" not in r.text
    text = httpx.get(server.url + "/metrics").text
    for name in ("ppoison_requests_total", "ppoison_request_latency_seconds_bucket",
                 "ppoison_batch_size_images_bucket", "ppoison_queries_total"):
        assert name in text


def test_predict_png_and_npy_agree_with_in_process(server, keys, dirs, mnist):
    raw, x = mnist
    x16, raw16 = x[:16], raw[:16]
    r = httpx.post(server.url + "/v1/predict", json={"images": [png_b64(a) for a in raw16]},
                   headers=_h(keys["alice"]), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    y_png = np.asarray(body["posteriors"], dtype=np.float64).astype(np.float32)
    assert np.array_equal(y_png.astype(np.float64), np.asarray(body["posteriors"]))  # exact float32 values
    assert body["labels"] == y_png.argmax(1).tolist() and re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    r = _npy_post(server.url, keys["alice"], x16.numpy())
    assert r.status_code == 200 and r.headers["content-type"] == NPY
    y_npy = decode_npy(r.content)
    assert y_npy.dtype == np.float32 and y_npy.shape == (16, 10)
    assert r.headers["x-top1"] == ",".join(map(str, y_npy.argmax(1)))
    assert np.array_equal(y_png, y_npy)
    local = build_defense("mad", mad_args(dirs[1]), victim_dir=dirs[0])
    assert np.array_equal(local(x16).numpy(), y_npy)


def test_refusals_name_the_field(server, keys, mnist):
    url, key = server.url, keys["alice"]
    _, x = mnist
    png = png_b64(np.zeros((28, 28), np.uint8))

    def check(r, status, field):
        assert r.status_code == status, (r.status_code, r.text)
        assert r.json()["field"] == field and field in r.json()["detail"], r.text

    check(httpx.post(url + "/v1/predict", json={"images": [png]}), 401, "authorization")
    check(httpx.post(url + "/v1/predict", json={"images": [png]}, headers=_h("wrong")), 401, "authorization")
    check(_npy_post(url, key, np.zeros((33, 1, 28, 28))), 413, "body.shape[0]")
    check(httpx.post(url + "/v1/predict", json={"images": [png] * 33}, headers=_h(key)), 413, "images")
    check(_npy_post(url, key, np.zeros((80, 1, 64, 64))), 413, "body")  # 1.25 MB > --max-body-mb 1
    check(_npy_post(url, key, np.zeros((2, 3, 28, 28))), 422, "body.shape")
    check(_npy_post(url, key, np.zeros((0, 1, 28, 28))), 422, "body.shape[0]")
    r = httpx.post(url + "/v1/predict", content=encode_npy(np.zeros((1, 1, 28, 28))),
                   headers={**_h(key), "Content-Type": NPY})
    check(r, 422, "body.dtype")
    bad = x[:2].numpy().copy()
    bad[1, 0, 3, 3] = np.nan
    check(_npy_post(url, key, bad), 422, "body")
    check(httpx.post(url + "/v1/predict", content=b"\x93NUMPYgarbage", headers={**_h(key), "Content-Type": NPY}),
          400, "body")
    check(httpx.post(url + "/v1/predict", content=b"{not json", headers={**_h(key), "Content-Type": "application/json"}),
          400, "body")
    check(httpx.post(url + "/v1/predict", json={"imgs": []}, headers=_h(key)), 422, "images")
    check(httpx.post(url + "/v1/predict", json={"images": "abc"}, headers=_h(key)), 422, "images")
    check(httpx.post(url + "/v1/predict", json={"images": [png, 7]}, headers=_h(key)), 422, "images[1]")
    check(httpx.post(url + "/v1/predict", json={"images": [png, "@@@"]}, headers=_h(key)), 400, "images[1]")
    check(httpx.post(url + "/v1/predict", json={"images": ["aGVsbG8="]}, headers=_h(key)), 400, "images[0]")
    from PIL import Image
    import base64
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(buf, "PNG")
    check(httpx.post(url + "/v1/predict", json={"images": [base64.b64encode(buf.getvalue()).decode()]},
                     headers=_h(key)), 422, "images[0]")
    check(httpx.post(url + "/v1/predict", content=b"x", headers={**_h(key), "Content-Type": "text/plain"}),
          415, "content-type")
    assert httpx.get(url + "/v1/health").status_code == 200
    text = httpx.get(url + "/metrics").text
    assert 'status="500"' not in text


def test_batching_never_changes_an_answer(server, keys, mnist):
    """Each image sent alone, then the same images in concurrent requests of 1..12 images
    (gathered into shared batches): the same bits."""
    _, x = mnist
    x = x[:24].numpy()
    key = keys["alice"]
    alone = np.concatenate([decode_npy(_npy_post(server.url, key, x[i:i + 1]).content) for i in range(24)])

    def scrape():
        text = httpx.get(server.url + "/metrics").text
        get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
        return get("ppoison_batch_size_requests_sum"), get("ppoison_batch_size_requests_count")

    s0, c0 = scrape()
    cuts = [(i, i + 1) for i in range(12)] + [(12, 17), (17, 24)]
    with concurrent.futures.ThreadPoolExecutor(len(cuts)) as pool:
        answers = list(pool.map(lambda c: _npy_post(server.url, key, x[c[0]:c[1]]), cuts))
    assert all(r.status_code == 200 for r in answers)
    together = np.concatenate([decode_npy(r.content) for r in answers])
    s1, c1 = scrape()
    assert (s1 - s0) / (c1 - c0) > 1.5, "the concurrent requests were not batched together"
    assert np.array_equal(alone, together)


def _ledger(logs):
    db = sqlite3.connect(f"file:{logs / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        used = dict(db.execute("SELECT key_id, used FROM keys"))
        reqs = db.execute("SELECT request_id, key_id, n, first_row, client_request_id FROM requests "
                          "ORDER BY seq").fetchall()
    finally:
        db.close()
    return used, reqs


def test_per_key_query_logs_hold_what_was_answered(server, keys, mnist):
    _, x = mnist
    r = _npy_post(server.url, keys["carol"], x[:7].numpy(), **{"X-Request-Id": "carol-1"})
    y = decode_npy(r.content)
    used, reqs = _ledger(server.logs)
    rows = read_queries(server.logs / "carol", "serve")
    assert rows.shape[0] == used["carol"] == sum(n for _, k, n, _, _ in reqs if k == "carol")
    (rid, _, n, first, cid), = [q for q in reqs if q[0] == r.headers["x-request-id"]]
    assert (n, cid) == (7, "carol-1")
    assert np.array_equal(rows[first:first + n, 10:20], y)  # the y' columns are the released answers
    assert np.allclose(rows[first:first + n, :10].sum(1), 1, atol=1e-5)  # the undefended y, a posterior
    alice = read_queries(server.logs / "alice", "serve")
    assert alice.shape[0] == used["alice"] == sum(n for _, k, n, _, _ in reqs if k == "alice")
    meta = json.loads((server.logs / "carol" / "queriesserve.json").read_text())
    assert meta["num_classes"] == 10


def test_budget_429_and_it_survives_a_kill(dirs, keys, tmp_path, mnist):
    _, x = mnist
    victim_dir, _ = dirs
    args = [victim_dir, "--defense", "reverse_sigmoid", "--defense-args", "beta:0.7,gamma:0.4",
            "--api-keys", keys["file"], "--log-dir", tmp_path, "--max-wait-ms", "0"]
    srv = ServerProcess(args, log_path=tmp_path / "server.out").start()
    try:
        assert _npy_post(srv.url, keys["bob"], x[:3].numpy()).status_code == 200
        r = _npy_post(srv.url, keys["bob"], x[:3].numpy())
        assert r.status_code == 429 and r.json()["field"] == "budget"
        r = _npy_post(srv.url, keys["bob"], x[:2].numpy())
        assert r.status_code == 200 and r.headers["x-budget-remaining"] == "0"
    finally:
        srv.kill()  # kill -9: no shutdown code runs
    srv = ServerProcess(args, log_path=tmp_path / "server.out").start()
    try:
        info = httpx.get(srv.url + "/v1/info", headers=_h(keys["bob"])).json()
        assert info["budget_remaining"] == 0
        assert _npy_post(srv.url, keys["bob"], x[:1].numpy()).status_code == 429
        assert _npy_post(srv.url, keys["alice"], x[:1].numpy()).status_code == 200
        bb = RemoteBlackbox(srv.url, api_key=keys["alice"])
        assert bb(x[:40]).shape == (40, 10) and bb.call_count == 40  # split over two requests of <= 32
    finally:
        srv.stop()
    used, reqs = _ledger(tmp_path)
    assert used == {"bob": 5, "alice": 41}
    assert read_queries(tmp_path / "bob", "serve").shape[0] == 5


# --- any model: create_app / create_router on uvicorn in this process ---------------------------


@contextlib.contextmanager
def _uvicorn(app):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _tiny_model(seed: int, hidden: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    if hidden:
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5))
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 5))


def test_create_app_serves_a_user_model():
    defense = build_defense("mad", "epsilon:0.5,oracle:argmax", model=_tiny_model(0), proxy=_tiny_model(1, False))
    x = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with _uvicorn(create_app(defense, input_shape=(1, 4, 4))) as url, RemoteBlackbox(url) as bb:
        assert bb.num_classes == 5 and bb.info["classes"] == ["0", "1", "2", "3", "4"]
        assert bb.info["defense"] == "MAD" and bb.info["key_id"] == "anonymous"
        assert bb.info["budget_remaining"] is None
        y = bb(x)
        assert httpx.get(url + "/no-such-page").status_code == 404
        assert httpx.get(url + "/v1/predict").status_code == 405
        text = httpx.get(url + "/metrics").text
    assert torch.equal(y, defense(x))
    assert 'ppoison_requests_total{endpoint="/v1/predict",status="200"} 1.0' in text
    assert 'ppoison_requests_total{endpoint="other",status="404"} 1.0' in text
    assert 'ppoison_requests_total{endpoint="/v1/predict",status="405"} 1.0' in text


def test_router_mounts_into_an_existing_app(tmp_path):
    from fastapi import FastAPI

    defense = build_defense("reverse_sigmoid", "beta:0.7,gamma:0.4", model=_tiny_model(0))
    key = append_key(tmp_path / "keys.txt", "team", 20)
    app = FastAPI()

    @app.get("/hello")
    def hello():
        return {"hello": "world"}

    app.include_router(create_router(defense, input_shape=(1, 4, 4), api_keys=tmp_path / "keys.txt",
                                     log_dir=tmp_path / "logs", classes="abcde"), prefix="/defended")
    x = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    with _uvicorn(app) as url:
        assert httpx.get(url + "/hello").json() == {"hello": "world"}
        assert httpx.get(url + "/defended/v1/info").status_code == 401
        with RemoteBlackbox(url + "/defended", api_key=key) as bb:
            assert bb.info["classes"] == list("abcde") and bb.info["budget_remaining"] == 20
            y = bb(x)
        info = httpx.get(url + "/defended/v1/info", headers=_h(key)).json()
        assert info["budget_remaining"] == 4 and info["key_id"] == "team"
    assert torch.equal(y, defense(x))
    logged = read_queries(tmp_path / "logs" / "team", "serve")  # written and closed by the lifespan
    assert logged.shape[0] == 16 and np.array_equal(logged[:, 5:10], y.numpy())


def test_stateful_defense_state_survives_a_kill(dirs, keys, tmp_path):
    """ModelGuard-S (answers depend on earlier queries): 1,000 queries to an uninterrupted server
    vs 500, kill -9, restart on the same ledger, 500 — the last 500 answers are the same bits; a
    fresh server (no history) answers them differently, so the state is what is compared."""
    victim_dir, _ = dirs
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    x = torch.stack([ds[i][0] for i in range(1000)]).numpy()

    def serve(log_dir):
        log_dir.mkdir(exist_ok=True)
        args = [victim_dir, "--defense", "modelguard_s", "--defense-args", "epsilon:1.0", "--api-keys",
                keys["file"], "--log-dir", log_dir, "--max-batch", "10", "--max-wait-ms", "0"]
        return ServerProcess(args, log_path=log_dir / "server.out")

    def ask(srv, rows):
        out = []
        for lo in range(rows.start, rows.stop, 10):
            r = _npy_post(srv.url, keys["alice"], x[lo:lo + 10])
            assert r.status_code == 200, r.text
            out.append(decode_npy(r.content))
        return np.concatenate(out)

    with serve(tmp_path / "whole") as srv:
        whole = ask(srv, range(0, 1000))
    srv = serve(tmp_path / "killed").start()
    try:
        ask(srv, range(0, 500))
    finally:
        srv.kill()  # kill -9: no shutdown code runs
    with serve(tmp_path / "killed") as srv:
        resumed = ask(srv, range(500, 1000))
    with serve(tmp_path / "fresh") as srv:
        fresh = ask(srv, range(500, 1000))
    assert np.array_equal(resumed, whole[500:])
    assert not np.array_equal(fresh, whole[500:])
