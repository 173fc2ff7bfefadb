"""Per-call times of a few native ops with timeit (min of 7 repeats), for comparing two builds of
ppoison_ext in one session: ``PYTHONPATH=<tree> python tools/time_ops.py LABEL``."""

import sys
import timeit

import torch

from ppoison_ext import ops

g = torch.Generator().manual_seed(0)


def probs(B: int, K: int) -> torch.Tensor:
    return torch.softmax(torch.randn(B, K, generator=g), -1)


for B, K in ((1, 10), (256, 10), (256, 100), (4096, 10)):
    y, p, h = probs(B, K), probs(B, K), torch.rand(B, generator=g)
    for name, fn in [("mad_oracle extreme objmax", lambda: ops.mad_oracle(y, p=p, h_sqnorm=h, objmax=True)),
                     ("mad_step l1", lambda: ops.mad_step(y, p, 0.2)),
                     ("project_simplex", lambda: ops.project_simplex(y * 3))]:
        n = max(20, 20000 // B)
        t = min(timeit.repeat(fn, number=n, repeat=7)) / n
        print(f"{sys.argv[1] if len(sys.argv) > 1 else ''} {name} B={B} K={K}: {t * 1e6:.1f} us")
