"""GRAD2 vs its floor and vs the per-sample port, timed round-robin (min of N per impl), for a
loaded machine where pytest-benchmark's one-cell-after-another timings drift with the load.

    python tools/bench_grad2_interleaved.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import original_grad2 as orig  # noqa: E402
from test_bench_grad2 import _floor, _models  # noqa: E402

from ppoison_ext import ops, reference  # noqa: E402
from ppoison_ext.defenses import GRAD2  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    cells = [("lenet", 1, "all_ones"), ("lenet", 256, "all_ones"), ("lenet", 256, "min_ip"),
             ("vgg16_bn", 1, "all_ones"), ("vgg16_bn", 8, "all_ones")]
    print("| model | batch | target | GRAD2 (ms) | floor (ms) | GRAD2 / floor | floor_jvp (ms) | GRAD2 / floor_jvp "
          "| port (ms) | speed-up vs port |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, B, target in cells:
        victim, surrogate, shape = _models(model, dev)
        x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1))
        d = GRAD2(victim, epsilon=0.5, surrogate=surrogate, target=target)
        t = None if target == "min_ip" else -torch.ones(sum(p.numel() for p in surrogate.parameters()))
        impls = {"grad2": lambda: d.perturb(x), "floor": _floor(victim, surrogate, x, target, True),
                 "floor_jvp": _floor(victim, surrogate, x, target, False),
                 "port": lambda: orig.grad2_per_sample(x, victim, surrogate, [0.5], t)}
        best = {k: float("inf") for k in impls}
        for fn in impls.values():
            fn()  # warm-up
        for _ in range(args.rounds):
            for k, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        g, f, fj, p = (best[k] * 1e3 for k in ("grad2", "floor", "floor_jvp", "port"))
        print(f"| {model} | {B} | {target} | {g:.2f} | {f:.2f} | {g / f:.2f}× | {fj:.2f} | {g / fj:.2f}× | {p:.1f} "
              f"| {p / g:.1f}× |", flush=True)
    print()
    print("| op B | K | E | native (ms) | twin (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for B, K, E in [(1, 10, 1), (256, 10, 1), (256, 10, 11), (256, 100, 11), (8192, 10, 11), (8192, 100, 11)]:
        g = torch.Generator().manual_seed(B + K)
        pr = torch.softmax(3 * torch.randn(B, K, generator=g), 1)
        c = torch.randn(B, K, generator=g)
        eps = [0.5] if E == 1 else [i / 10 for i in range(11)]
        best = {"native": float("inf"), "twin": float("inf")}
        fns = {"native": lambda: ops.grad2_allocate(pr, c, eps), "twin": lambda: reference.grad2_allocate(pr, c, eps)}
        for _ in range(args.rounds * 4):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
        print(f"| {B} | {K} | {E} | {best['native'] * 1e3:.3f} | {best['twin'] * 1e3:.3f} "
              f"| {best['twin'] / best['native']:.1f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
