"""Per-query logs of a defended black box, two files per ``prefix`` (e.g. ``transfer``):

* ``distance<prefix>.log.tsv`` (columns :data:`DISTANCE_COLUMNS`): a row each time the query
  count crosses a multiple of ``every``, with the mean and population std of ‖y − y′‖₁,
  ‖y − y′‖₂ and KL(y‖y′) over *all* queries so far, and a last row for the tail at
  :meth:`QueryLogger.close`. The sums are exact per block of ``every`` queries aligned at
  query 0, so a row never depends on how the queries were batched or resumed.
* ``queries<prefix>.f32`` + ``.json``: every query appended as little-endian float32 rows
  ``[y (K), y′ (K), obj, sobj]`` (NaN without an objective), read by :func:`read_queries`
  even while written; a row cut short by a crash is ignored.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..checks import int_arg
from ..fileio import AppendFile, append_text, atomic_write_text, truncate_file

__all__ = ["QueryLogger", "read_queries", "DISTANCE_COLUMNS", "distances"]

DISTANCE_COLUMNS = ["call_count", "l1_mean", "l1_std", "l2_mean", "l2_std", "kl_mean", "kl_std"]


def distances(y: Tensor, y_prime: Tensor) -> Tensor:
    """[B, 3] float64: ‖y − y′‖₁, ‖y − y′‖₂, KL(y‖y′) (0·log 0 = 0; +inf where y′ = 0 < y)."""
    y, yp = y.double(), y_prime.double()
    d = y - yp
    pos = y > 0
    with torch.no_grad():
        kl_terms = torch.where(pos, y * (torch.log(torch.where(pos, y, torch.ones_like(y))) - torch.log(yp)),
                               torch.zeros_like(y))
    return torch.stack([d.abs().sum(-1), d.norm(dim=-1), kl_terms.sum(-1)], dim=1)


_HEADER = "\t".join(DISTANCE_COLUMNS) + "\n"


class QueryLogger:
    """Streams a defense's queries to the files in ``out_dir`` (see the module docs).

    ``save_queries=False`` writes the distance file only. ``resume`` continues existing files
    (the counts and sums are rebuilt from the query file); otherwise they are replaced.

    Example:
        >>> with QueryLogger("out", prefix="transfer") as log:
        ...     defense = MAD(model, epsilon=0.5, logger=log)
        ...     defense(x)
    """

    def __init__(self, out_dir, prefix: str = "", *, every: int = 1000, save_queries: bool = True,
                 resume: bool = False):
        int_arg(every, "every")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.every = every
        self.save_queries = save_queries
        self.tsv_path = self.out_dir / f"distance{prefix}.log.tsv"
        self.bin_path = self.out_dir / f"queries{prefix}.f32"
        self.meta_path = self.out_dir / f"queries{prefix}.json"
        self._lock = threading.Lock()
        self._bin = AppendFile(self.bin_path)
        self._reset()
        if resume:
            self._restore()
        else:
            for p in (self.tsv_path, self.bin_path, self.meta_path):
                p.unlink(missing_ok=True)
        if not self.tsv_path.exists():
            atomic_write_text(self.tsv_path, _HEADER)

    def _reset(self) -> None:
        self.count = 0
        # per distance, the Σd and Σd² of each full block of `every` queries so far
        self._sums = [([], []) for _ in range(3)]
        self._pending = np.zeros((0, 3), dtype=np.float64)  # distances of the block in progress
        self._last_row_at = 0
        self._K: Optional[int] = None

    def _restore(self, keep: Optional[int] = None) -> None:
        """Rebuilds the counts and sums from the query file (its first ``keep`` rows when
        given), drops a row cut short by a crash and the distance rows past the kept queries."""
        self._reset()
        if self.meta_path.exists() and self.bin_path.exists():
            rows, K = read_queries(self.out_dir, self.prefix, with_k=True)
            if keep is not None:
                rows = rows[:keep]
            self._K = K
            truncate_file(self.bin_path, rows.shape[0] * (2 * K + 2) * 4)
            if rows.shape[0]:
                self._add(distances(torch.from_numpy(rows[:, :K]), torch.from_numpy(rows[:, K:2 * K])).numpy())
            self.count = rows.shape[0]
        elif keep == 0:
            self.bin_path.unlink(missing_ok=True)
        if self.tsv_path.exists():
            kept = []
            for line in self.tsv_path.read_text().splitlines()[1:]:
                try:
                    c = int(float(line.split("\t")[0]))
                except (ValueError, IndexError):
                    continue
                # a row is written when the count passes a multiple of `every`; a row that
                # passes none is close()'s tail row, rewritten when the run ends
                if c <= self.count and c // self.every > self._last_row_at // self.every:
                    kept.append(line)
                    self._last_row_at = c
            atomic_write_text(self.tsv_path, _HEADER + "".join(k + "\n" for k in kept))

    def truncate(self, n_queries: int) -> None:
        """Forgets every query after the first ``n_queries`` (e.g. answered but never committed
        by a run that crashed): the query file, the distance rows and the sums go back to
        what they were after those queries."""
        int_arg(n_queries, "n_queries", low=0)
        with self._lock:
            self._bin.close()
            self._restore(keep=n_queries)

    def _add(self, d: np.ndarray) -> None:
        """Adds distance rows [n, 3] (queries count+1 … count+n) to the block sums."""
        rows = np.concatenate([self._pending, d]) if self._pending.size else d
        full = rows.shape[0] // self.every * self.every
        for lo in range(0, full, self.every):
            block = rows[lo:lo + self.every]
            for j in range(3):
                self._sums[j][0].append(math.fsum(block[:, j]))
                self._sums[j][1].append(math.fsum(block[:, j] * block[:, j]))
        self._pending = rows[full:].copy()

    def log(self, y: Tensor, y_prime: Tensor, obj: Optional[Tensor] = None, sobj: Optional[Tensor] = None) -> None:
        """Records a batch of queries: y, y′ [B, K]; obj, sobj [B] or None."""
        if y.shape != y_prime.shape or y.dim() != 2:
            raise ValueError(f"y and y_prime must both be [B, K], got {tuple(y.shape)} and {tuple(y_prime.shape)}")
        B, K = y.shape
        if B == 0:
            return
        d = distances(y, y_prime).cpu().numpy()
        with self._lock:
            if self._K is None:
                self._K = K
                if self.save_queries:
                    self.meta_path.write_text(json.dumps({
                        "format": "little-endian float32 rows", "num_classes": K,
                        "columns": [f"y_{k}" for k in range(K)] + [f"y_prime_{k}" for k in range(K)] + ["obj", "sobj"],
                    }, indent=1))
            elif K != self._K:
                raise ValueError(f"this log holds K={self._K} classes, got a batch with K={K}")
            if self.save_queries:
                nan = torch.full((B, 1), float("nan"), dtype=torch.float32)
                cols = [y.detach().float().cpu(), y_prime.detach().float().cpu(),
                        nan if obj is None else obj.detach().float().cpu().reshape(B, 1),
                        nan if sobj is None else sobj.detach().float().cpu().reshape(B, 1)]
                rows = torch.cat(cols, dim=1).numpy().astype("<f4", copy=False)
                self._bin.append(rows.tobytes())
            self._add(d)
            self.count += B
            if self.count // self.every > self._last_row_at // self.every:
                self._write_row()

    def stats(self) -> Tuple[float, ...]:
        """(l1_mean, l1_std, l2_mean, l2_std, kl_mean, kl_std) over all queries so far."""
        n = max(self.count, 1)
        out = []
        for j, (s, s2) in enumerate(self._sums):
            col = self._pending[:, j]
            mean = math.fsum(s + [math.fsum(col)]) / n
            with np.errstate(invalid="ignore"):
                var = math.fsum(s2 + [math.fsum(col * col)]) / n - mean * mean
            std = math.sqrt(max(var, 0.0)) if math.isfinite(var) else float("nan")
            out += [mean, std]
        return tuple(out)

    def _write_row(self) -> None:
        row = [str(self.count)] + [repr(float(v)) for v in self.stats()]
        append_text(self.tsv_path, "\t".join(row) + "\n")
        self._last_row_at = self.count

    def close(self) -> None:
        """Writes the row for queries after the last multiple of ``every``; closes files."""
        with self._lock:
            if self.count and self._last_row_at != self.count:
                self._write_row()
            self._bin.close()

    def __enter__(self) -> "QueryLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QueryLogger(out_dir={str(self.out_dir)!r}, prefix={self.prefix!r}, every={self.every})"


def read_queries(out_dir, prefix: str = "", *, with_k: bool = False):
    """The logged rows as a float32 array [N, 2K + 2] (y, y′, obj, sobj); a cut-off last row is dropped."""
    out_dir = Path(out_dir)
    meta_path = out_dir / f"queries{prefix}.json"
    try:
        meta = json.loads(meta_path.read_text())
        K = int(meta["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{meta_path}: not a valid query-log description ({err})") from err
    width = 2 * K + 2
    data = np.fromfile(out_dir / f"queries{prefix}.f32", dtype="<f4")
    n = data.size // width
    rows = data[: n * width].reshape(n, width)
    return (rows, K) if with_k else rows
