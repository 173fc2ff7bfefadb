"""Per-query logs of a defended black box.

Two files per ``prefix`` (``transfer`` while building a transfer set, ``test`` during
utility evaluation), in ``out_dir``:

* ``distance<prefix>.log.tsv`` — the original's file: header
  ``call_count l1_mean l1_std l2_mean l2_std kl_mean kl_std``; one row each time the query
  count crosses a multiple of ``every`` (default 1000), with the mean and population std of
  ‖y − y′‖₁, ‖y − y′‖₂ and KL(y‖y′) over *all* queries so far. Running sums make each row
  O(1) (the original recomputed everything: O(N²) in all), and :meth:`QueryLogger.close`
  writes a last row for the tail after the last multiple (the original dropped it).
* ``queries<prefix>.f32`` + ``queries<prefix>.json`` — every query, appended as it comes:
  little-endian float32 rows ``[y (K), y′ (K), obj, sobj]`` (NaN where a defense has no
  objective), described by the JSON sidecar. No pickle: read it with
  :func:`read_queries` (``numpy.fromfile``), even while it is being written. A row cut
  short by a crash is ignored.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

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


def _fmt(v: float) -> str:
    return repr(float(v)) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


class QueryLogger:
    """Streams a defense's queries to disk (see module docs).

    Args:
        out_dir: folder for the files (created).
        prefix: file-name infix, e.g. ``"transfer"`` → ``distancetransfer.log.tsv``.
        every: write a distance row each time the query count crosses a multiple of this.
        save_queries: also append every (y, y′, obj, sobj) row.
        resume: continue existing files (the counts and running sums are rebuilt from the
            query file); otherwise existing files are replaced.

    Example:
        >>> with QueryLogger("out", prefix="transfer") as log:
        ...     defense = MAD(model, epsilon=0.5, logger=log)
        ...     defense(x)
    """

    def __init__(self, out_dir, prefix: str = "", *, every: int = 1000, save_queries: bool = True,
                 resume: bool = False):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.every = every
        self.save_queries = save_queries
        self.tsv_path = self.out_dir / f"distance{prefix}.log.tsv"
        self.bin_path = self.out_dir / f"queries{prefix}.f32"
        self.meta_path = self.out_dir / f"queries{prefix}.json"
        self._lock = threading.Lock()
        self.count = 0
        self._sums = np.zeros((3, 2), dtype=np.float64)  # per distance: Σd, Σd²
        self._last_row_at = 0
        self._K: Optional[int] = None
        self._bin = None
        if resume:
            self._restore()
        else:
            for p in (self.tsv_path, self.bin_path, self.meta_path):
                if p.exists():
                    p.unlink()
        if not self.tsv_path.exists():
            self.tsv_path.write_text("\t".join(DISTANCE_COLUMNS) + "\n")

    # -- restoring ----------------------------------------------------------------------
    def _restore(self) -> None:
        if self.meta_path.exists() and self.bin_path.exists():
            rows, K = read_queries(self.out_dir, self.prefix, with_k=True)
            self._K = K
            keep = rows.shape[0] * (2 * K + 2) * 4
            with open(self.bin_path, "r+b") as f:  # drop a row cut short by a crash
                f.truncate(keep)
            if rows.shape[0]:
                d = distances(torch.from_numpy(rows[:, :K]), torch.from_numpy(rows[:, K:2 * K])).numpy()
                self._sums[:, 0] = d.sum(0)
                self._sums[:, 1] = (d * d).sum(0)
            self.count = rows.shape[0]
        if self.tsv_path.exists():
            lines = self.tsv_path.read_text().splitlines()
            kept = [lines[0]] if lines else ["\t".join(DISTANCE_COLUMNS)]
            for line in lines[1:]:
                try:
                    c = int(float(line.split("\t")[0]))
                except (ValueError, IndexError):
                    continue
                if c <= self.count:
                    kept.append(line)
                    self._last_row_at = c
            self.tsv_path.write_text("\n".join(kept) + "\n")
        if not self.count:
            self._last_row_at = 0

    # -- logging --------------------------------------------------------------------------
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
                if self._bin is None:
                    self._bin = open(self.bin_path, "ab")
                self._bin.write(rows.tobytes())
                self._bin.flush()
            with np.errstate(invalid="ignore"):
                self._sums[:, 0] += d.sum(0)
                self._sums[:, 1] += (d * d).sum(0)
            self.count += B
            if self.count // self.every > self._last_row_at // self.every:
                self._write_row()

    def stats(self) -> Tuple[float, ...]:
        """(l1_mean, l1_std, l2_mean, l2_std, kl_mean, kl_std) over all queries so far."""
        n = max(self.count, 1)
        out = []
        with np.errstate(invalid="ignore"):
            for s, s2 in self._sums:
                mean = s / n
                var = s2 / n - mean * mean
                std = math.sqrt(max(var, 0.0)) if math.isfinite(var) else float("nan")
                out += [mean, std]
        return tuple(out)

    def _write_row(self) -> None:
        row = [str(self.count)] + [_fmt(v) for v in self.stats()]
        with open(self.tsv_path, "a") as f:
            f.write("\t".join(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._last_row_at = self.count

    def close(self) -> None:
        """Writes the row for queries after the last multiple of ``every``; closes files."""
        with self._lock:
            if self.count and self._last_row_at != self.count:
                self._write_row()
            if self._bin is not None:
                os.fsync(self._bin.fileno())
                self._bin.close()
                self._bin = None

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
