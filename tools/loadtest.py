"""Load and fault tests of ``ppoison serve`` on 127.0.0.1 (bounded in requests and seconds).

    python tools/loadtest.py --victim-dir V --proxy-dir P --clients 64 --requests 2000 --json out.json
    python tools/loadtest.py ... --scenarios kill --requests 600      # kill -9 mid-load, restart, audit

Scenarios (each its own server process, one image per request, ``--clients`` concurrent
clients spread over 8 API keys): ``none``/``mad`` (micro-batched, ``--max-batch 64``) and
``none-b1``/``mad-b1`` (``--max-batch 1``); MAD is ``epsilon:1.0,oracle:argmax`` with the proxy.
Each reports throughput (answered requests / s), p50/p99 latency and the mean batch size
(from ``/metrics``), then audits the ledger: per key, log rows = ``used`` = Σ n of its
request records, every 200 answered exactly once in the records and the log, with the bytes
that were released. ``kill``: SIGKILL of the server after ``--kill-after`` answers, then a
restart on the same ``--log-dir`` and the same audit, reporting how many requests were
committed without their 200 having reached the client (allowed: see ppoison_ext.serve.ledger).
Without ``--victim-dir`` a small LeNet victim and proxy are trained first (~15 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppoison_ext.client.wire import NPY, decode_npy, encode_npy  # noqa: E402
from ppoison_ext.defenses import read_queries  # noqa: E402
from ppoison_ext.serve.auth import append_key  # noqa: E402
from ppoison_ext.serve.process import ServerProcess  # noqa: E402

N_KEYS = 8


def _images(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 1, 1, 28, 28), dtype=np.float32)


async def _load(url, keys, n_requests, clients, images, stop_after=None, on_stop=None, timeout=30.0,
                prefix="r"):
    import httpx

    results = {}  # client request id -> (status, latency, body bytes or None, key index)
    next_id = iter(range(n_requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    answered = 0
    stopped = asyncio.Event()

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        async def worker(w):
            nonlocal answered
            key_i = w % len(keys)
            headers = {"Authorization": f"Bearer {keys[key_i]}", "Content-Type": NPY, "Accept": NPY}
            for i in next_id:
                if stopped.is_set():
                    return
                rid = f"{prefix}{i}"
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", content=encode_npy(images[i % len(images)]),
                                          headers={**headers, "X-Request-Id": rid})
                    results[rid] = (r.status_code, time.perf_counter() - t0,
                                    r.content if r.status_code == 200 else None, key_i)
                except httpx.HTTPError:
                    results[rid] = (None, time.perf_counter() - t0, None, key_i)
                if results[rid][0] == 200:
                    answered += 1
                    if stop_after is not None and answered == stop_after and on_stop is not None:
                        on_stop()
                        stopped.set()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    return results, wall


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def audit(log_dir: Path, key_ids, results) -> dict:
    """Checks the ledger and the per-key logs against what the clients saw (see module docs)."""
    db = sqlite3.connect(f"file:{log_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    used = dict(db.execute("SELECT key_id, used FROM keys"))
    reqs = db.execute("SELECT key_id, n, first_row, client_request_id FROM requests ORDER BY seq").fetchall()
    db.close()
    problems = []
    by_cid = {}
    for key_id, n, first, cid in reqs:
        by_cid.setdefault(cid, []).append((key_id, n, first))
    logs = {}
    for k in key_ids:
        folder = log_dir / k
        logs[k] = read_queries(folder, "serve") if (folder / "queriesserve.json").exists() else np.zeros((0, 22))
        n_req = sum(n for key_id, n, _, _ in reqs if key_id == k)
        if not (logs[k].shape[0] == used.get(k, 0) == n_req):
            problems.append(f"{k}: log rows {logs[k].shape[0]}, used {used.get(k, 0)}, Σ requests {n_req}")
    ok200 = {rid: v for rid, v in results.items() if v[0] == 200}
    for rid, (_, _, body, _) in ok200.items():
        recs = by_cid.get(rid, [])
        if len(recs) != 1:
            problems.append(f"{rid}: answered 200 but recorded {len(recs)} times")
            continue
        key_id, n, first = recs[0]
        if logs[key_id][first:first + n, 10:20].tobytes() != decode_npy(body).tobytes():
            problems.append(f"{rid}: the logged y' differs from the answer")
    dup = sum(1 for v in by_cid.values() if len(v) > 1)
    committed_not_200 = sorted(cid for cid in by_cid if cid not in ok200)
    return {"answered_200": len(ok200), "committed": len(reqs), "duplicates": dup,
            "lost_200": sum(1 for rid in ok200 if rid not in by_cid),
            "committed_without_200": len(committed_not_200), "problems": problems[:10],
            "n_problems": len(problems)}


def run_scenario(name, victim_dir, proxy_dir, work: Path, clients, n_requests, kill_after=None):
    defense = "mad" if name.startswith("mad") or name == "kill" else "none"
    max_batch = "1" if name.endswith("-b1") else "64"
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "keys.txt"
    key_ids = [f"client{i}" for i in range(N_KEYS)]
    keys = [append_key(key_file, k) for k in key_ids]
    dargs = f"epsilon:1.0,oracle:argmax,model_adv_proxy:{proxy_dir}" if defense == "mad" else ""
    args = [victim_dir, "--defense", defense, "--defense-args", dargs, "--api-keys", key_file,
            "--log-dir", folder / "logs", "--max-batch", max_batch, "--max-wait-ms", "2"]
    images = _images(256)
    srv = ServerProcess(args, log_path=folder / "server.out").start()
    # warm-up (first-call costs), not counted
    warm, _ = asyncio.run(_load(srv.url, keys, 2 * clients, clients, images, prefix="w"))
    killed_at = None
    try:
        import urllib.request

        before = urllib.request.urlopen(srv.url + "/metrics").read().decode()
        if kill_after is None:
            results, wall = asyncio.run(_load(srv.url, keys, n_requests, clients, images))
        else:
            def kill():
                nonlocal killed_at
                srv.kill()
                killed_at = time.perf_counter()
            results, wall = asyncio.run(_load(srv.url, keys, n_requests, clients, images, kill_after, kill, 10.0))
        after = None if kill_after is not None else urllib.request.urlopen(srv.url + "/metrics").read().decode()
    finally:
        if kill_after is None:
            srv.stop()
    if kill_after is not None:  # restart on the same ledger and logs, then audit
        srv = ServerProcess(args, log_path=folder / "server.out").start()
        srv.stop()
    out = {"scenario": name, "defense": defense, "max_batch": int(max_batch), "clients": clients}
    lat = np.array([v[1] for v in results.values() if v[0] == 200])
    ok = len(lat)
    out.update(requests=len(results), answered_200=ok, wall_s=round(wall, 3),
               throughput_rps=round(ok / wall, 1) if wall > 0 else None,
               p50_ms=round(float(np.percentile(lat, 50)) * 1000, 2) if ok else None,
               p99_ms=round(float(np.percentile(lat, 99)) * 1000, 2) if ok else None,
               other_status={str(s): sum(1 for v in results.values() if v[0] == s)
                             for s in {v[0] for v in results.values()} if s != 200})
    if after is not None:
        s = _metric(after, "ppoison_batch_size_images_sum") - _metric(before, "ppoison_batch_size_images_sum")
        c = _metric(after, "ppoison_batch_size_images_count") - _metric(before, "ppoison_batch_size_images_count")
        out["mean_batch"] = round(s / c, 2) if c else None
    out["audit"] = audit(folder / "logs", key_ids, {**warm, **results})  # the warm-up is in the ledger too
    return out


def _train(work: Path):
    from ppoison_ext.pipeline import victim

    victim.train_victim("MNIST", "lenet", work / "victim", device=-1, epochs=1, train_subset=2000,
                        test_subset=100, lr=0.05, progress=False)
    victim.make_proxy("MNIST", "lenet", work / "proxy", device=-1, test_subset=100, progress=False)
    return work / "victim", work / "proxy"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--victim-dir")
    p.add_argument("--proxy-dir")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--scenarios", default="none,none-b1,mad,mad-b1")
    p.add_argument("--kill-after", type=int, default=None, help="kill scenario: answers before the kill "
                                                                "(default: a third of --requests)")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.clients < 1 or a.requests < 1 or a.requests > 100000 or a.clients > 256:
        p.error("--clients in [1, 256], --requests in [1, 100000]")
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="ppoison-loadtest-"))
    if a.victim_dir and a.proxy_dir:
        victim_dir, proxy_dir = Path(a.victim_dir), Path(a.proxy_dir)
    else:
        victim_dir, proxy_dir = _train(work)
    rows = []
    for name in a.scenarios.split(","):
        kill_after = (a.kill_after or max(1, a.requests // 3)) if name == "kill" else None
        row = run_scenario(name, victim_dir, proxy_dir, work, a.clients, a.requests, kill_after)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["scenario"]: r for r in rows}
    ratios = {}
    if "mad" in by and "mad-b1" in by:
        ratios["mad_batched_over_mad_b1"] = round(by["mad"]["throughput_rps"] / by["mad-b1"]["throughput_rps"], 2)
    if "mad" in by and "none" in by:
        ratios["mad_batched_over_none_batched"] = round(by["mad"]["throughput_rps"] / by["none"]["throughput_rps"], 2)
    if ratios:
        print(json.dumps({"ratios": ratios}), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"scenarios": rows, "ratios": ratios}, indent=1))
    bad = sum(r["audit"]["n_problems"] + r["audit"]["duplicates"] + r["audit"]["lost_200"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
