"""Served throughput and latency measured by wrk (a C load generator), against the bare-framework floor.

    python tools/wrk_serve.py VICTIM_DIR [--proxy-dir P] [--configs bare,none,none-b1,mad,mad-b1]
        [--detectors DIR ...] [--batches 1] [--duration 10] [--connections 64] [--keys 0]
        [--threads N] [--repeat R]

For each request size b in --batches (images per request) and each configuration, starts a server on
loopback (one process), warms it up, then runs ``wrk -t1 -c C -d D --latency`` with a Lua script that
cycles through 256 different MNIST test requests of b images (npy bodies), taking turns over --keys
API keys (0: no keys). Configurations:

* ``bare``: the floor, a FastAPI app on the same uvicorn whose one endpoint only decodes the npy body
  and answers an npy of K zeros per image;
* ``none`` / ``mad``: ``ppoison serve VICTIM_DIR`` undefended / MAD (``epsilon:1.0,oracle:argmax``
  with the --proxy-dir model), ``--max-batch 64``, a fresh ``--log-dir`` (the ledger and the query
  logs on); ``none-b1`` / ``mad-b1``: the same with ``--max-batch 1``;
* ``none+NAME``: ``none`` with each --detectors folder (or ``prada``);
* ``none+dawn`` / ``mad+dawn``: ``none`` / ``mad`` with a DAWN watermark (a new key,
  ``--watermark-rate``, default 0.005).

With --repeat R every configuration runs R times, interleaved. Prints one markdown table: requests/s,
p50 and p99 latency (medians over the runs), requests/s relative to ``bare`` and p50 relative to
the configuration without its ``+`` addition (``none+X`` vs ``none``) of the same b. Needs ``wrk``
(Debian package). State the machine's load average beside the
figures: wrk and the server share its cores.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppoison_ext.client.wire import NPY, encode_npy  # noqa: E402
from ppoison_ext.datasets import get_dataset, get_transform  # noqa: E402
from ppoison_ext.defenses import new_watermark_key  # noqa: E402
from ppoison_ext.serve.auth import append_key  # noqa: E402
from ppoison_ext.serve.process import ServerProcess  # noqa: E402

LUA = """
local bodies, keys, i, k = {}, {%(keys)s}, 0, 0
for n = 1, %(n)d do
  local f = io.open("%(dir)s/" .. n .. ".npy", "rb"); bodies[n] = f:read("*all"); f:close()
end
wrk.method = "POST"
request = function()
  i = i %% %(n)d + 1
  local headers = {["Content-Type"] = "%(npy)s", ["Accept"] = "%(npy)s"}
  if #keys > 0 then
    k = k %% #keys + 1
    headers["Authorization"] = "Bearer " .. keys[k]
  end
  return wrk.format(nil, "/v1/predict", headers, bodies[i])
end
"""

#: the floor: FastAPI on uvicorn (as ``ppoison serve`` runs it), decoding the npy body only
BARE_APP = """
import io, sys
import numpy as np
import uvicorn
from fastapi import FastAPI, Request, Response

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

@app.post("/v1/predict")
async def predict(request: Request):
    x = np.load(io.BytesIO(await request.body()), allow_pickle=False)
    buf = io.BytesIO()
    np.save(buf, np.zeros((x.shape[0], 10), dtype=np.float32))
    return Response(buf.getvalue(), media_type="application/x-npy")

@app.get("/v1/health")
async def health():
    return {"status": "ok"}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[sys.argv.index("--port") + 1]), log_level="warning",
            access_log=False)
"""


class BareServer(ServerProcess):
    """:data:`BARE_APP` as a child process (ServerProcess's start, health wait and stop)."""

    def __init__(self, app_file: Path):
        super().__init__([])
        self.app_file = app_file

    def start(self) -> "BareServer":
        self.proc = subprocess.Popen([sys.executable, str(self.app_file), "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/v1/health", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the bare server did not answer")


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise RuntimeError(f"wrk: unreadable latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(url: str, script: Path, connections: int, duration: int) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"wrk saw {non2xx.group(1)} failed requests:\n{out}")
    if "50%" not in out:
        raise RuntimeError(f"wrk printed no latency distribution:\n{out}")
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
            "p99": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("victim_dir")
    parser.add_argument("--proxy-dir", default=None, help="MAD's proxy model folder (configs mad, mad-b1)")
    parser.add_argument("--configs", default="bare,none,none-b1,mad,mad-b1",
                        help="comma-separated: bare, none, none-b1, mad, mad-b1 (module docs)")
    parser.add_argument("--detectors", nargs="*", default=[], help="detector folders or 'prada' (none+NAME)")
    parser.add_argument("--batches", default="1", help="images per request (default 1)")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--keys", type=int, default=0, help="API keys the requests take turns with (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--watermark-rate", default="0.005", help="DAWN's rate in the +dawn configurations")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of every configuration, interleaved; the table gives their medians")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    configs = [c for c in args.configs.split(",") if c] + [f"none+{d}" for d in args.detectors]
    for c in configs:
        if c.split("+")[0] not in ("bare", "none", "none-b1", "mad", "mad-b1"):
            sys.exit(f"--configs: unknown configuration {c!r}")
        if c.startswith("mad") and args.proxy_dir is None:
            sys.exit(f"--configs {c}: needs --proxy-dir")
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    runs: dict = {}  # (images/request, configuration) -> wrk results
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keys = ", ".join(f'"{append_key(tmp / "keys.txt", f"k{i}")}"' for i in range(args.keys))
        common = ["--threads", str(args.threads)] if args.threads is not None else []
        new_watermark_key(tmp / "wm.key")
        if args.keys:
            common += ["--api-keys", tmp / "keys.txt"]
        (tmp / "bare.py").write_text(BARE_APP)
        scripts = {}
        for b in (int(v) for v in args.batches.split(",")):
            bodies = tmp / f"b{b}"
            bodies.mkdir()
            for n in range(256):
                x = np.stack([ds[(n * b + j) % len(ds)][0].numpy() for j in range(b)]).astype(np.float32)
                (bodies / f"{n + 1}.npy").write_bytes(encode_npy(x))
            scripts[b] = tmp / f"b{b}.lua"
            scripts[b].write_text(LUA % {"n": 256, "dir": bodies, "npy": NPY, "keys": keys})
        for rep in range(args.repeat):
            for b, script in scripts.items():
                for config in configs:
                    base, _, det = config.partition("+")
                    cmd = [args.victim_dir, "--log-dir", tmp / f"logs-{rep}-{b}-{config.replace('/', '_')}",
                           "--max-batch", "1" if base.endswith("-b1") else "64", *common]
                    if base.startswith("mad"):
                        cmd += ["--defense", "mad", "--defense-args",
                                f"epsilon:1.0,oracle:argmax,model_adv_proxy:{args.proxy_dir}"]
                    else:
                        cmd += ["--defense", "none"]
                    if det == "dawn":
                        cmd += ["--watermark-key", tmp / "wm.key", "--watermark-rate", args.watermark_rate]
                    elif det:
                        cmd += ["--detector", det]
                    with BareServer(tmp / "bare.py") if base == "bare" else ServerProcess(cmd) as srv:
                        run_wrk(srv.url, script, args.connections, 2)  # warm-up
                        r = run_wrk(srv.url, script, args.connections, args.duration)
                    name = base if not det else f"{base}+{Path(det).name}"
                    runs.setdefault((b, name), []).append(r)
    print("| images/request | server | req/s | p50 ms | p99 ms | req/s vs bare | p50 vs its base |\n"
          "|---|---|---|---|---|---|---|")
    for (b, name), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
        ratio = {}
        # p50 against the configuration without the addition: none+X vs none, mad+dawn vs mad
        for col, ref, key in (("bare", "bare", "rps"), ("base", name.partition("+")[0], "p50")):
            if (b, ref) in runs and (col == "bare" or "+" in name):
                ratio[col] = f"{med[key] / statistics.median(r[key] for r in runs[(b, ref)]):.2f}×"
        print(f"| {b} | {name} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} "
              f"| {ratio.get('bare', '')} | {ratio.get('base', '')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
