"""Served latency with and without an extraction detector, measured by wrk (a C load generator).

    python tools/wrk_detect.py VICTIM_DIR [--detectors DIR ...] [--duration 10] [--connections 4]
        [--keys 16] [--threads N] [--repeat R]

For each request size b in --batches (images per request) and each configuration (no detector, then
each detector folder or 'prada'), starts ``ppoison serve VICTIM_DIR --defense none`` on loopback
(one process, --max-batch 64, --keys API keys, a fresh --log-dir), warms it up, then runs
``wrk -t1 -c C -d D --latency`` with a Lua script that cycles through 256 different MNIST test
requests of b images (npy bodies), the requests taking turns over the keys. With --repeat R every
configuration runs R times, interleaved. Prints one markdown table: requests/s, p50 and p99
latency (medians over the runs), and each row's p50 relative to the no-detector row of the same b.
Needs ``wrk`` (Debian package).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppoison_ext.client.wire import NPY, encode_npy  # noqa: E402
from ppoison_ext.datasets import get_dataset, get_transform  # noqa: E402
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
  k = k %% #keys + 1
  return wrk.format(nil, "/v1/predict", {["Content-Type"] = "%(npy)s", ["Accept"] = "%(npy)s",
                                         ["Authorization"] = "Bearer " .. keys[k]}, bodies[i])
end
"""


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
    parser.add_argument("--detectors", nargs="*", default=["prada"], help="detector folders or 'prada'")
    parser.add_argument("--batches", default="1,64", help="images per request (default 1,64)")
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--keys", type=int, default=16, help="API keys the requests take turns with")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of every configuration, interleaved; the table gives their medians")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    runs: dict = {}  # (images/request, detector) -> wrk results
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keys = ", ".join(f'"{append_key(tmp / "keys.txt", f"k{i}")}"' for i in range(args.keys))
        threads = [] if args.threads is None else ["--threads", str(args.threads)]
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
                for det in [None, *args.detectors]:
                    logs = tmp / f"logs-{rep}-{b}-{len(runs)}"
                    extra = [] if det is None else ["--detector", det]
                    cmd = [args.victim_dir, "--defense", "none", "--log-dir", logs, "--max-batch", "64",
                           "--api-keys", tmp / "keys.txt", *threads, *extra]
                    with ServerProcess(cmd) as srv:
                        run_wrk(srv.url, script, args.connections, 2)  # warm-up
                        r = run_wrk(srv.url, script, args.connections, args.duration)
                    runs.setdefault((b, Path(det).name if det else "none"), []).append(r)
    print("| images/request | detector | req/s | p50 ms | p99 ms | p50 vs none |\n|---|---|---|---|---|---|")
    for (b, name), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
        base = statistics.median(r["p50"] for r in runs[(b, "none")])
        print(f"| {b} | {name} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} "
              f"| {med['p50'] / base:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
