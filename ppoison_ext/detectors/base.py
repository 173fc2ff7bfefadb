"""The contract of a per-key extraction detector, and the victim forward that feeds it.

A detector watches one API key's stream of queries. Of each query it keeps a fixed-width float32
*record* (what it needs: the input, the victim's class, the victim's penultimate features, an
encoding), computed by :meth:`Detector.records` from the batch and one victim forward. A key's
:class:`KeyState` is a pure function of its records in order: :meth:`Detector.observe` updates it
with a chunk of records and gives the same state and scores however the stream is chunked. The
server therefore persists records (append-only, under the ledger's commit rule) and restores a key
by replaying them (:meth:`Detector.observe` from a new state).

None of the original detectors has accounts: each keeps one state for all traffic. Here each key
has its own (docs/differences.md, "Detection").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_bools
from ..fileio import atomic_write, atomic_write_json
from ..models import last_linear

__all__ = ["Detector", "KeyState", "Rows", "Values", "victim_forward", "pair_distances", "nearest_candidates",
           "pairwise_earlier", "with_class", "DETECTOR_FILE",
           "TENSORS_FILE"]

DETECTOR_FILE = "detector.json"
TENSORS_FILE = "tensors.pt"
PIECE = 64  # records a detector handles at once: bounds its [PIECE, PIECE] work


def victim_forward(model: nn.Module, x: Tensor, head: Optional[nn.Linear] = None) -> Tuple[Tensor, Tensor]:
    """``(logits [B, K], h [B, d])`` of one forward of ``model`` (eval mode, no grad), h the input
    of its last ``nn.Linear`` ``head`` (found once by :func:`~ppoison_ext.models.last_linear` when
    not given): the penultimate activation, flattened."""
    head = last_linear(model) if head is None else head
    seen = []
    handle = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return logits, seen[-1].flatten(1)


def with_class(rows: Tensor, logits: Tensor) -> Tensor:
    """``rows`` flattened to [B, d] float32 on the CPU, with the victim's class (first argmax of
    ``logits``) as one more column: the records of PRADA and D-ADD."""
    c = logits.argmax(1).to(torch.float32).cpu()
    return torch.cat([rows.detach().flatten(1).to(torch.float32).cpu(), c[:, None]], 1)


class Rows:
    """A growable [n, d] float64 tensor and its rows' squared norms (appends amortised by doubling)."""

    def __init__(self, d: int):
        self._buf, self._sq = torch.empty(16, d, dtype=torch.float64), torch.empty(16, dtype=torch.float64)
        self.n = 0

    def extend(self, rows: Tensor) -> None:
        """Appends rows [m, d]."""
        m = rows.shape[0]
        while self.n + m > self._buf.shape[0]:
            self._buf = torch.cat([self._buf, torch.empty_like(self._buf)])
            self._sq = torch.cat([self._sq, torch.empty_like(self._sq)])
        self._buf[self.n:self.n + m] = rows
        self._sq[self.n:self.n + m] = (rows * rows).sum(1)
        self.n += m

    @property
    def data(self) -> Tensor:
        return self._buf[:self.n]


class Values:
    """A growable float64 vector (numpy) with its running mean and sum of squared deviations
    (Welford's update)."""

    def __init__(self):
        self.array, self.n, self.mean, self.m2 = np.empty(16), 0, 0.0, 0.0

    def append(self, value: float) -> None:
        if self.n == self.array.shape[0]:
            self.array = np.concatenate([self.array, np.empty_like(self.array)])
        self.array[self.n] = value
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    def mean_minus_std(self) -> float:
        """mean − population std of the values."""
        return self.mean - math.sqrt(self.m2 / self.n)

    @property
    def values(self) -> np.ndarray:
        return self.array[:self.n]


def pair_distances(a: Tensor, b: Tensor) -> Tensor:
    """The L2 distances [P] between the rows of a and b [P, d], each summed directly (no
    ‖a‖² − 2a·b + ‖b‖² expansion: a repeated query is at distance exactly 0, and a pair's distance
    has the same bits in any batch)."""
    return ((a - b) ** 2).sum(1).sqrt()


def nearest_candidates(x: Tensor, rows: Rows, k: int) -> List[np.ndarray]:
    """For each row of x [m, d] (float64), the exact distances (:func:`pair_distances`) to a subset
    of ``rows`` that holds its k nearest: one matrix product ranks all rows, then only those within
    a rounding bound of the k-th smallest are measured exactly, so the k smallest exact distances
    are those of an exhaustive search."""
    if rows.n == 0:
        return [np.empty(0)] * x.shape[0]
    if x.shape[0] * rows.n <= 4096:  # few pairs: all of them, exactly (the same bits as below)
        return list(((x[:, None] - rows.data[None]) ** 2).sum(-1).sqrt().numpy())
    sq, rsq = (x * x).sum(1), rows._sq[:rows.n]
    approx = torch.addmm(sq[:, None] + rsq[None], x, rows.data.T, alpha=-2.0)
    kth = approx.min(1).values if k == 1 else approx.topk(min(k, rows.n), 1, largest=False).values[:, -1]
    # the expansion's rounding error is below 1e-12 of the squared norms (d < 10^4): 1e-9 is wide
    i, j = (approx <= (kth + 1e-9 * (sq + rsq.max()))[:, None]).nonzero(as_tuple=True)
    d = pair_distances(x[i], rows.data[j]).numpy()
    return np.split(d, np.cumsum(np.bincount(i.numpy(), minlength=x.shape[0]))[:-1])


def pairwise_earlier(x: Tensor, same: Tensor) -> np.ndarray:
    """[m, m] exact distances (:func:`pair_distances`) from each row i of x to each earlier row
    j < i where ``same[i, j]``; +inf elsewhere."""
    out = np.full((x.shape[0], x.shape[0]), np.inf)
    if x.shape[0] == 1:
        return out
    i, j = (same & torch.ones_like(same).tril(-1)).nonzero(as_tuple=True)
    out[i.numpy(), j.numpy()] = pair_distances(x[i], x[j]).numpy()
    return out


@dataclass
class KeyState:
    """One key's detector state: queries observed, the flag, the 1-based query at which it was
    first raised, the last decision's score (NaN before any), and the detector's own ``data``."""

    queries: int = 0
    flag: bool = False
    flagged_at: Optional[int] = None
    score: float = math.nan
    data: Dict[str, Any] = field(default_factory=dict)


class Detector:
    """Base class. Subclasses set ``name`` and ``record_width`` and implement :meth:`records` and
    :meth:`_piece` (a piece of the stream: each query's decision score, or NaN when it decides
    nothing, and the flag the detector itself would then give), and :meth:`config` / :meth:`tensors` /
    :meth:`from_saved` for a detector folder. ``latch`` (default True): once raised, a key's flag
    stays raised; False follows the detector (PRADA's own flag can fall again)."""

    name = "detector"
    record_width = 0
    inputs_only = False  # records(x, None, None) works: they need neither logits nor features

    def __init__(self, *, latch: bool = True):
        check_bools(latch=latch)
        self.latch = latch

    def records(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:  # pragma: no cover
        """The records [B, record_width] (float32, CPU) of a batch x, from the victim's logits and
        penultimate features of that batch."""
        raise NotImplementedError

    def _piece(self, state: KeyState, records: Tensor) -> Tuple[List[float], List[bool]]:  # pragma: no cover
        """The scores (NaN: no decision) and the detector's own flags of up to ``PIECE`` records in
        order; updates ``state.data`` (``state.queries`` still counts the earlier queries)."""
        raise NotImplementedError

    def new_state(self) -> KeyState:
        return KeyState()

    def observe(self, state: KeyState, records: Tensor) -> Tensor:
        """Feeds a key's next records [n, record_width] in order; returns each query's score [n]
        (NaN where it decided nothing) and updates ``state`` (flag, first flag, last score)."""
        if records.dim() != 2 or records.shape[1] != self.record_width:
            raise ValueError(f"records must have shape [n, {self.record_width}], got {tuple(records.shape)}")
        scores: List[float] = []
        for piece in records.split(PIECE):
            piece_scores, own = self._piece(state, piece)
            for score, flag in zip(piece_scores, own):
                state.queries += 1
                if not math.isnan(score):
                    state.score = score
                state.flag = flag or (self.latch and state.flag)
                if state.flag and state.flagged_at is None:
                    state.flagged_at = state.queries
            scores += piece_scores
        return torch.tensor(scores, dtype=torch.float64)

    def run(self, model: nn.Module, x: Tensor, state: Optional[KeyState] = None,
            batch: int = 512) -> Tuple[Tensor, KeyState]:
        """One key's inputs ``x`` (in query order) through the victim ``model`` and the detector:
        each query's score [n] and the state (``state`` continued, or a new one)."""
        state = self.new_state() if state is None else state
        device = next(model.parameters()).device
        head, scores = last_linear(model), []
        for chunk in x.split(batch):
            logits, h = victim_forward(model, chunk.to(device), head)
            scores.append(self.observe(state, self.records(chunk, logits, h)))
        return (torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)), state

    def config(self) -> Dict[str, Any]:
        """The constructor's JSON-able keywords (what :meth:`from_saved` needs besides tensors)."""
        return {"latch": self.latch}

    def tensors(self) -> Dict[str, Tensor]:
        """Fitted tensors (reference statistics, an encoder's weights), saved beside the config."""
        return {}

    @classmethod
    def from_saved(cls, config: Dict[str, Any], tensors: Dict[str, Tensor], model: nn.Module) -> "Detector":
        """The detector of a folder, for the victim ``model``."""
        return cls(**config)

    def save(self, folder) -> Path:
        """Writes ``detector.json`` (name and config) and ``tensors.pt`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu() for k, v in self.tensors().items()}
        atomic_write(folder / TENSORS_FILE, lambda f: torch.save(tensors, f))
        atomic_write_json(folder / DETECTOR_FILE, {"name": self.name, **self.config()})
        return folder
