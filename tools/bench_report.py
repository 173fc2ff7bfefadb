"""Ratios from a pytest-benchmark JSON: native ops vs their twins, and defended-query throughput.

    python tools/bench_report.py bench.json [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def op_table(benches):
    cells = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        key = (info["op"], info.get("dev", "cpu"), info["B"], info["K"])
        cells[key][info["impl"]] = b["stats"]["median"]
    rows = []
    for (op, dev, B, K), t in sorted(cells.items()):
        if "native" in t and "reference" in t:
            rows.append((op, dev, B, K, t["native"], t["reference"], t["reference"] / t["native"]))
    return rows


def defense_table(benches):
    cells = defaultdict(dict)
    for b in benches:
        info = b.get("extra_info", {})
        if "model" not in info:
            continue
        qps = info["queries"] / b["stats"]["median"]
        cells[(info["model"], info["B"])][info["impl"]] = qps
    rows = []
    for (model, B), q in sorted(cells.items()):
        for impl in ("mad_extreme", "mad_argmax"):
            if impl not in q:
                continue
            bare = q.get("bare")
            port = q.get("port_" + impl.split("_")[1])
            rows.append((model, B, impl, q[impl], bare / q[impl] if bare else None, q[impl] / port if port else None))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    args = ap.parse_args(argv)
    data = json.load(open(args.json))
    benches = data["benchmarks"]
    ops = op_table(benches)
    if ops:
        print("| op | device | B | K | native (ms) | twin (ms) | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for op, dev, B, K, tn, tr, r in ops:
            print(f"| {op} | {dev} | {B} | {K} | {tn * 1e3:.3f} | {tr * 1e3:.3f} | {r:.1f}x |")
    dfs = defense_table(benches)
    if dfs:
        print("\n| model | batch | defense | queries/s | cost vs bare victim+proxy forward | vs per-sample original |")
        print("|---|---|---|---|---|---|")
        for model, B, impl, qps, cost, speed in dfs:
            c = f"{cost:.2f}x" if cost else "-"
            s = f"{speed:.0f}x" if speed else "-"
            print(f"| {model} | {B} | {impl} | {qps:.1f} | {c} | {s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
