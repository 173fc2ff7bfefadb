"""A transfer-set run's state besides the transfer set: per-batch seeds, call times, snapshots.

Before batch t, the global RNGs and every defense in the black box are reseeded from
``(seed, t)``, so a batch's answers do not depend on interruptions or sharding. Query-dependent
state (the adaptive policy, stateful defenses) is snapshotted after every batch, before it is
committed, into two alternating files ``resume_state.{0,1}.pt``. Per-call wall times go to
``run_times.f64`` (float64).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from ..defenses import Defense
from ..fileio import AppendFile, atomic_write, truncate_file

__all__ = ["batch_seed", "reseed_blackbox", "RunTimes", "StateSlots", "RUN_TIMES_FILE", "STATE_FILES"]

logger = logging.getLogger(__name__)

RUN_TIMES_FILE = "run_times.f64"
STATE_FILES = ("resume_state.0.pt", "resume_state.1.pt")


def batch_seed(seed: int, batch_index: int) -> int:
    """The 32-bit seed used before batch ``batch_index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(batch_index)]).generate_state(1)[0])


def reseed_blackbox(blackbox: Any, seed: int) -> None:
    """Seeds torch's and numpy's global RNGs with ``seed`` and calls ``reseed(seed)`` on every
    :class:`~ppoison_ext.defenses.Defense` inside ``blackbox``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    if not isinstance(blackbox, nn.Module):
        return
    for m in blackbox.modules():
        if isinstance(m, Defense):
            m.reseed(seed)


class RunTimes:
    """Append-only float64 seconds per black-box call; cut to ``keep`` entries on open (missing
    ones, e.g. a deleted file, become NaN)."""

    def __init__(self, path: Path, keep: int):
        self.path = path
        old = np.fromfile(path, dtype="<f8") if path.exists() else np.zeros(0)
        truncate_file(path, min(old.size, keep) * 8)
        self._f = AppendFile(path)
        self._f.append(b"")  # the file exists from the start, even before the first call
        if old.size < keep:
            logger.warning("%s: holds %d call times, the committed queries made %d; the missing ones are NaN",
                           path, old.size, keep)
            missing = np.full(keep - old.size, np.nan, dtype="<f8")
            self._f.append(missing.tobytes())
            old = np.concatenate([old, missing])
        self.times = old[:keep].tolist()

    def append(self, dt: float) -> None:
        self.times.append(dt)
        self._f.append(np.asarray([dt], dtype="<f8").tobytes())

    def close(self) -> None:
        self._f.close()


class StateSlots:
    """Two alternating snapshot files; a snapshot is tagged with the query count it matches."""

    def __init__(self, folder: Path):
        self.paths = [folder / name for name in STATE_FILES]

    def save(self, batch_index: int, done: int, states: Dict[str, Any]) -> None:
        snapshot = {"batch_index": int(batch_index), "done": int(done), "states": states}
        atomic_write(self.paths[batch_index % 2], lambda f: torch.save(snapshot, f))

    def load(self, done: int) -> Optional[Dict[str, Any]]:
        for p in self.paths:
            if not p.exists():
                continue
            try:
                snap = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a corrupt slot is as good as none
                logger.warning("ignoring unreadable state snapshot %s (%s)", p, err)
                continue
            if int(snap.get("done", -1)) == done:
                return snap["states"]
        return None

    def clear(self) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)
