"""PRADA (Juuti et al., EuroS&P 2019) per key: growing sets of each victim class's queries, the
minimum distance of every new query to its class's set, and every 10 queries a Shapiro–Wilk test
of the pooled distances; a key is flagged while W < δ.

Per query x of victim class c (first argmax): the first query of c starts G_c = [x], Gd_c = [0],
T_c = 0; later ones record d = min ‖g − x‖ over G_c in D_c, and when d > T_c join G_c (d joins
Gd_c; T_c ← max(mean(Gd_c) − std(Gd_c), T_c), population std). When the number of earlier queries
is a multiple of 10, the distances of classes with ≥ 10 of them are pooled, those within 3 std of
the pool's mean (strict) are kept, and if more than 100 remain, W of them decides the flag;
otherwise the flag keeps its value. Distances are float64 L2 on the victim's input tensor as served
(after the dataset's fixed normalisation).

Differs from the original: per-key state (the original has one for all traffic); float distances
(the original's uint8 path wraps differences modulo 256); the flag latches by default (``latch``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import real_arg
from .base import Detector, KeyState, Rows, Values, nearest_candidates, pairwise_earlier, with_class

__all__ = ["PRADA", "pooled", "shapiro_w"]

_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)


def _poly(c: Sequence[float], x: float) -> float:
    return sum(ci * x ** i for i, ci in enumerate(c))


def shapiro_w(values) -> float:
    """The Shapiro–Wilk statistic W of ``values`` (n ≥ 3), by Royston's coefficients (AS R94), in
    float64 with the exact normal quantiles."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = x.size
    if n < 3:
        raise ValueError(f"values: the Shapiro-Wilk statistic needs at least 3 values, got {n}")
    half = n // 2
    if n == 3:
        a = np.array([math.sqrt(0.5)])
    else:
        m = torch.special.ndtri((torch.arange(1, half + 1, dtype=torch.float64) - 0.375) / (n + 0.25)).numpy()
        summ2 = 2.0 * float((m * m).sum())
        rsn = 1.0 / math.sqrt(n)
        fixed = [_poly(_C1, rsn) - float(m[0]) / math.sqrt(summ2)]
        if n > 5:
            fixed.append(-float(m[1]) / math.sqrt(summ2) + _poly(_C2, rsn))
        rest = summ2 - 2.0 * float((m[:len(fixed)] ** 2).sum())
        fac = math.sqrt(rest / (1.0 - 2.0 * sum(v * v for v in fixed)))
        a = np.concatenate([fixed, -m[len(fixed):] / fac])
    ssq = float(((x - x.mean()) ** 2).sum())
    if ssq == 0.0:
        return 1.0
    return float((a * (x[::-1][:half] - x[:half])).sum()) ** 2 / ssq


def pooled(distances) -> np.ndarray:
    """The test's pool: the distance vectors of ≥ 10 values, concatenated, without the values 3 or
    more population std from their mean."""
    pool = np.concatenate([np.asarray(ds, dtype=np.float64).ravel() for ds in distances if len(ds) >= 10]
                          or [np.zeros(0)])
    return pool[np.abs(pool - pool.mean()) < 3.0 * pool.std()] if pool.size else pool


class PRADA(Detector):
    """PRADA on inputs of ``input_shape``, flagging while W < ``delta`` (the original's demo: 0.9;
    :meth:`calibrate` fits it on benign accounts). Records: the flattened input and the class."""

    name = "prada"

    def __init__(self, input_shape: Sequence[int], *, delta: float = 0.9, latch: bool = True):
        super().__init__(latch=latch)
        self.input_shape = [int(v) for v in input_shape]
        if not self.input_shape or min(self.input_shape) < 1:
            raise ValueError(f"input_shape must be a non-empty list of positive sizes, got {input_shape}")
        self.delta = real_arg(delta, "delta", high=1.0)
        self.record_width = math.prod(self.input_shape) + 1

    def records(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        return with_class(x, logits)

    def _piece(self, state: KeyState, records: Tensor) -> Tuple[List[float], List[bool]]:
        data = state.data
        if not data:
            data.update(G={}, Gd={}, T={}, D={}, own=False)
        x, classes = records[:, :-1].double(), records[:, -1].long()
        old = torch.full((x.shape[0],), math.inf, dtype=torch.float64)  # nearest earlier G_c, exact
        added: Dict[int, List[int]] = {}  # per class of the piece: its rows that join G_c
        for c in classes.unique().tolist():
            added[c] = []
            if c not in data["G"]:
                data["G"][c], data["Gd"][c], data["D"][c] = Rows(x.shape[1]), Values(), Values()
                data["T"][c] = 0.0
            rows = (classes == c).nonzero()[:, 0]
            nearest = nearest_candidates(x[rows], data["G"][c], 1)
            old[rows] = torch.tensor([float(d.min(initial=math.inf)) for d in nearest], dtype=torch.float64)
        within = pairwise_earlier(x, classes[:, None] == classes[None])  # to this piece's earlier rows
        scores, own = [], []
        for i, (c, d_old) in enumerate(zip(classes.tolist(), old.tolist())):
            if data["G"][c].n == 0 and not added[c]:  # the class's first query
                added[c].append(i)
                data["Gd"][c].append(0.0)
            else:
                d = min(d_old, float(within[i, added[c]].min(initial=math.inf)))
                data["D"][c].append(d)
                if d > data["T"][c]:
                    added[c].append(i)
                    data["Gd"][c].append(d)
                    data["T"][c] = max(data["Gd"][c].mean_minus_std(), data["T"][c])
            score = math.nan
            if (state.queries + i) % 10 == 0:
                pool = pooled(v.values for v in data["D"].values())
                if pool.size > 100:
                    score, data["pool_size"] = shapiro_w(pool), pool.size
                    data["own"] = score < self.delta
            scores.append(score)
            own.append(data["own"])
        for c, rows in added.items():
            if rows:
                data["G"][c].extend(x[rows])
        return scores, own

    def config(self) -> Dict[str, Any]:
        return {"input_shape": self.input_shape, "delta": self.delta, **super().config()}

    @classmethod
    def from_saved(cls, config: Dict[str, Any], tensors: Dict[str, Tensor], model: nn.Module) -> "PRADA":
        return cls(**config)

    @classmethod
    def calibrate(cls, model: nn.Module, *, benign: List[Tensor], fpr: float, **_: Any) -> "PRADA":
        """δ such that at most ``fpr`` of the ``benign`` accounts (inputs in query order) would ever
        be flagged: the ⌊fpr·N⌋-th smallest of the accounts' minimum W (flag means W < δ). Uses
        neither the training split nor the victim beyond its classes."""
        if not benign:
            raise ValueError("benign: PRADA's calibration needs at least one benign account")
        probe = cls(benign[0].shape[1:], delta=0.0)
        minima = []
        for x in benign:
            w = probe.run(model, x)[0]
            minima.append(float(w[~w.isnan()].min()) if (~w.isnan()).any() else math.inf)
        minima.sort()
        return cls(benign[0].shape[1:], delta=min(1.0, minima[int(fpr * len(minima))]))

