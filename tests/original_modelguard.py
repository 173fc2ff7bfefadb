"""Per-sample ports of ModelGuard's defenses, written from the spec (field-defenses.md §6):
the fidelity oracles of tests/test_modelguard.py and the "original" baselines of
benchmarks/test_bench_modelguard.py.

* :func:`mld_lp` — ModelGuard-W's LP (§6.1.1) for one row, solved by scipy's HiGHS
  (``linprog(method="highs")``). The original builds one PuLP/CBC LP per batch; with
  ``batch_constraint`` = 0 that LP separates into these per-row LPs.
* :class:`SequentialQuantizer` — ModelGuard-S (§6.2): sequential leader clustering per
  top-1 class, one query at a time, in plain Python lists.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linprog

MARGIN = 1e-4
LOG_OFFSET = 1e-6


def mld_lp(y, epsilon: float, margin: float = MARGIN, log_offset: float = LOG_OFFSET):
    """(x [K], objective, status) of the per-row LP; variables [x (K), z (K)]."""
    y = np.asarray(y, dtype=np.float64)
    K = y.size
    c = np.log(y + log_offset)
    m = int(np.argmax(y))
    cost = np.concatenate([c, np.zeros(K)])
    I = np.eye(K)
    rows = [np.hstack([-I, -I]), np.hstack([I, -I])]  # z ≥ y − x, z ≥ x − y
    rhs = [-y, y]
    rows.append(np.concatenate([np.zeros(K), np.ones(K)])[None])  # Σz ≤ ε
    rhs.append([epsilon])
    marg = np.zeros((K - 1, 2 * K))  # x_j − x_m ≤ −margin
    for r, j in enumerate(j for j in range(K) if j != m):
        marg[r, j], marg[r, m] = 1.0, -1.0
    rows.append(marg)
    rhs.append(np.full(K - 1, -margin))
    A_ub, b_ub = np.vstack(rows), np.concatenate([np.ravel(v) for v in rhs])
    A_eq = np.concatenate([np.ones(K), np.zeros(K)])[None]
    bounds = [(0.0, 1.0)] * K + [(0.0, None)] * K
    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=[1.0], bounds=bounds, method="highs")
    if res.status != 0:
        return None, None, res.status
    return res.x[:K], float(res.fun), 0


def mld_per_sample(ys, epsilon: float):
    """The LP row by row over a batch [B, K] (numpy), as the per-sample original."""
    return np.stack([mld_lp(y, epsilon)[0] for y in ys])


class SequentialQuantizer:
    """ModelGuard-S, ordered and not frozen (``optim`` = 0): one query at a time."""

    def __init__(self, epsilon: float, ydist: str = "l1"):
        self.epsilon = float(epsilon)
        self.p = 1 if ydist == "l1" else 2
        self.banks = {}

    def _dist(self, a, b):
        d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        return float(np.abs(d).sum()) if self.p == 1 else float(np.sqrt((d * d).sum()))

    def __call__(self, y):
        y = np.asarray(y)
        label = int(np.argmax(y))
        bank = self.banks.setdefault(label, [])
        for cen in bank:  # the first centroid within ε, the earliest created
            if self._dist(cen, y) <= self.epsilon:
                return cen
        bank.append(y.copy())
        return bank[-1]

    def frozen(self, y):
        """The lookup without appending: the first within ε, else the nearest; y if none."""
        y = np.asarray(y)
        bank = self.banks.get(int(np.argmax(y)), [])
        if not bank:
            return y
        d = [self._dist(cen, y) for cen in bank]
        for cen, di in zip(bank, d):
            if di <= self.epsilon:
                return cen
        return bank[int(np.argmin(d))]
