"""Memory over a long run: 10^6 defended queries through MAD with logging on.

    python tools/soak.py --queries 1000000 --out soak.json

A LeNet victim and proxy (K = 10) on random 28×28 inputs, MAD (argmax oracle, objmax,
l1, ε = 0.5) in batches, every query logged by a QueryLogger (distance TSV + per-query
binary log). Resident memory (RSS, /proc/self/statm) is sampled every `--sample-every`
batches; the JSON reports the samples, the growth after warm-up, and the log sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from ppoison_ext.defenses import MAD, QueryLogger
from ppoison_ext.models import get_net


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--sample-every", type=int, default=50)
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    victim, proxy = get_net("lenet", "mnist", num_classes=10), get_net("lenet", "mnist", num_classes=10)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="ppoison-soak-")
    logger = QueryLogger(log_dir, prefix="soak", every=1000)
    mad = MAD(victim, epsilon=0.5, proxy=proxy, oracle="argmax", objmax=True, logger=logger)
    x = torch.randn(args.batch, 1, 28, 28)
    samples = []
    n_batches = args.queries // args.batch
    t0 = time.time()
    for i in tqdm(range(n_batches), desc="soak", unit="batch"):
        x.normal_()
        mad(x)
        if i % args.sample_every == 0 or i == n_batches - 1:
            samples.append({"queries": (i + 1) * args.batch, "rss_mb": round(rss_mb(), 1)})
    logger.close()
    warm = [s["rss_mb"] for s in samples if s["queries"] >= 0.1 * args.queries]
    summary = {
        "queries": mad.call_count, "seconds": round(time.time() - t0, 1),
        "rss_first_mb": samples[0]["rss_mb"], "rss_last_mb": samples[-1]["rss_mb"],
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "rss_growth_after_10pct_mb": round(max(warm) - min(warm), 1) if warm else None,
        "distance_log_rows": len(open(logger.tsv_path).read().splitlines()) - 1,
        "query_log_mb": round(os.path.getsize(logger.bin_path) / 2**20, 1),
        "samples": samples,
    }
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
