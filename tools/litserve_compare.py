"""LitServe against ``ppoison serve`` on 127.0.0.1: the same defended victim, the same load
(bounded: ``--clients`` concurrent clients × ``--requests-per-client`` requests, one image each).

    python tools/litserve_compare.py --victim-dir V --proxy-dir P --clients 64 --requests-per-client 8

Servers: ``ppoison serve`` (FastAPI on uvicorn, ``--max-batch 64 --max-wait-ms 2``, no API keys,
ledger and per-key log on) and LitServe 0.2.x (``LitAPI(max_batch_size=64, batch_timeout=0.002)``,
one inference worker, one API server process), both running ``build_defense("mad",
"epsilon:1.0,oracle:argmax,model_adv_proxy:P")`` (or ``--defense none``). Wire formats differ as
each server's native one: float32 npy bodies for ``ppoison serve``, JSON with a base64 npy field
for LitServe (``{"x": ...}`` → ``{"y": ...}``). Reports throughput (answered requests / s),
p50 / p99 latency, and checks that both released the same y′ for the same image. Without
``--victim-dir`` a small LeNet victim and proxy are trained first (~15 s). Needs ``litserve``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

from ppoison_ext.client.wire import NPY, decode_npy, encode_npy  # noqa: E402
from ppoison_ext.serve.process import ServerProcess, free_port  # noqa: E402


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(encode_npy(np.ascontiguousarray(a, dtype=np.float32))).decode("ascii")


try:
    import litserve as ls
except ImportError:  # pragma: no cover - depends on the installation
    ls = None

if ls is not None:
    class DefendedAPI(ls.LitAPI):
        """The defended victim behind LitServe (module level: LitServe pickles it into its worker)."""

        def __init__(self, victim_dir: str, defense: str, args: str, **kwargs):
            super().__init__(**kwargs)
            self.victim_dir, self.defense_name, self.defense_args = victim_dir, defense, args

        def setup(self, device):
            import torch

            from ppoison_ext.defenses import build_defense

            torch.set_num_threads(2)
            self.defense = build_defense(self.defense_name, self.defense_args, victim_dir=self.victim_dir,
                                         device="cpu")

        def decode_request(self, request):
            import torch

            return torch.from_numpy(decode_npy(base64.b64decode(request["x"])))

        def batch(self, inputs):
            import torch

            return torch.cat(inputs)

        def predict(self, x):
            return self.defense(x).numpy()

        def unbatch(self, output):
            return [output[i:i + 1] for i in range(output.shape[0])]

        def encode_response(self, output):
            return {"y": _b64(output)}


def serve_litserve(victim_dir: str, defense: str, args: str, port: int, max_batch: int, timeout_s: float) -> None:
    """Runs the LitServe server (blocking; started as a child process by :func:`main`)."""
    if ls is None:
        raise SystemExit("litserve is not installed: pip install litserve")
    api = DefendedAPI(victim_dir, defense, args, max_batch_size=max_batch, batch_timeout=timeout_s)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


async def _load(url: str, path: str, make_request, clients: int, per_client: int, images: np.ndarray):
    import httpx

    lat, answers, failures = [], {}, []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:
        async def worker(w: int) -> None:
            for r in range(per_client):
                i = (w * per_client + r) % len(images)
                kwargs, read = make_request(images[i])
                t0 = time.perf_counter()
                try:
                    resp = await client.post(path, **kwargs)
                except httpx.HTTPError as err:
                    failures.append(type(err).__name__)
                    continue
                if resp.status_code != 200:
                    failures.append(str(resp.status_code))
                    continue
                lat.append(time.perf_counter() - t0)
                answers[i] = read(resp)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    lat = np.array(lat)
    return {"answered": len(lat), "failures": len(failures), "wall_s": round(wall, 2),
            "throughput_rps": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1) if len(lat) else None}, answers


def _ours(img):
    return ({"content": encode_npy(img), "headers": {"Content-Type": NPY, "Accept": NPY}},
            lambda r: decode_npy(r.content))


def _lit(img):
    return {"json": {"x": _b64(img)}}, lambda r: decode_npy(base64.b64decode(r.json()["y"]))


def _wait(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the LitServe server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"LitServe did not answer /health within {seconds} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--victim-dir")
    p.add_argument("--proxy-dir")
    p.add_argument("--defense", default="mad", choices=["mad", "none"])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--work-dir")
    p.add_argument("--json")
    p.add_argument("--_litserve-port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not (1 <= a.clients <= 256 and 1 <= a.requests_per_client <= 1000):
        p.error("--clients in [1, 256], --requests-per-client in [1, 1000]")
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="ppoison-litserve-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.victim_dir and a.proxy_dir:
        victim_dir, proxy_dir = Path(a.victim_dir), Path(a.proxy_dir)
    else:
        from ppoison_ext.pipeline import victim

        victim_dir, proxy_dir = work / "victim", work / "proxy"
        victim.train_victim("MNIST", "lenet", victim_dir, device=-1, epochs=1, train_subset=2000,
                            test_subset=100, lr=0.05, progress=False)
        victim.make_proxy("MNIST", "lenet", proxy_dir, device=-1, test_subset=100, progress=False)
    dargs = f"epsilon:1.0,oracle:argmax,model_adv_proxy:{proxy_dir}" if a.defense == "mad" else ""
    if a._litserve_port:
        serve_litserve(str(victim_dir), a.defense, dargs, a._litserve_port, a.max_batch, a.max_wait_ms / 1000)
        return 0
    images = np.random.default_rng(0).standard_normal((256, 1, 1, 28, 28), dtype=np.float32)
    rows, answers = {}, {}

    srv = ServerProcess([victim_dir, "--defense", a.defense, "--defense-args", dargs, "--log-dir", work / "logs",
                         "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms)],
                        log_path=work / "ppoison.out").start()
    try:
        asyncio.run(_load(srv.url, "/v1/predict", _ours, a.clients, 2, images))  # warm-up
        rows["ppoison serve (FastAPI/uvicorn)"], answers["ours"] = asyncio.run(
            _load(srv.url, "/v1/predict", _ours, a.clients, a.requests_per_client, images))
    finally:
        srv.stop()

    port = free_port()
    log = open(work / "litserve.out", "wb")
    proc = subprocess.Popen([sys.executable, __file__, "--victim-dir", str(victim_dir), "--proxy-dir", str(proxy_dir),
                             "--defense", a.defense, "--max-batch", str(a.max_batch), "--max-wait-ms",
                             str(a.max_wait_ms), "--_litserve-port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(_ROOT))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc, 120)
        asyncio.run(_load(url, "/predict", _lit, a.clients, 2, images))  # warm-up
        rows["LitServe"], answers["lit"] = asyncio.run(
            _load(url, "/predict", _lit, a.clients, a.requests_per_client, images))
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    common = sorted(set(answers["ours"]) & set(answers["lit"]))
    same = sum(np.array_equal(answers["ours"][i], answers["lit"][i]) for i in common)
    out = {"defense": a.defense, "clients": a.clients, "requests_per_client": a.requests_per_client,
           "max_batch": a.max_batch, "max_wait_ms": a.max_wait_ms, "servers": rows,
           "same_answer": f"{same}/{len(common)} images bit for bit",
           "max_abs_diff": float(max((np.abs(answers["ours"][i] - answers["lit"][i]).max() for i in common),
                                     default=float("nan")))}
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
