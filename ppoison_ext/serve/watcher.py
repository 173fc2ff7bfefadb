"""The server's extraction detector in a child process: each key's state is updated there, off the
request path and outside the server's interpreter lock (the detectors' per-query logic is Python).

The server sends a key's committed records in commit order (:meth:`DetectorProcess.observe`, which
does not wait) and reads the key's summary after all of them (:meth:`DetectorProcess.summary`, which
waits for what is still in flight). A key unknown to the child starts from a new state, so sending
a key's whole committed record stream first restores it (the server's replay on start).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
from typing import Dict, Optional

import torch

from ..detectors import Detector, KeyState

__all__ = ["DetectorProcess"]

logger = logging.getLogger(__name__)


def _run(conn, detector: Detector) -> None:
    torch.set_num_threads(1)
    states: Dict[str, KeyState] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the server is gone (a kill -9 included)
            return
        if msg is None:
            return
        key_id, records = msg
        st = states.setdefault(key_id, detector.new_state())
        try:
            detector.observe(st, torch.from_numpy(records))
        except Exception:  # the records are committed: a restart replays them
            logger.exception("detector failed on key %r", key_id)
        conn.send((key_id, KeyState(st.queries, st.flag, st.flagged_at, st.score)))


class DetectorProcess:
    """``detector`` in a child process (spawned); a reader thread collects its summaries."""

    def __init__(self, detector: Detector):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_run, args=(child, detector), name="ppoison-detector", daemon=True)
        self._proc.start()
        child.close()
        self._cond, self._send_lock = threading.Condition(), threading.Lock()
        self._sent: Dict[str, int] = {}
        self._done: Dict[str, int] = {}
        self._summaries: Dict[str, KeyState] = {}
        self._error: Optional[str] = None
        self._reader = threading.Thread(target=self._read, name="ppoison-detector-reader", daemon=True)
        self._reader.start()

    def known(self, key_id: str) -> bool:
        with self._cond:
            return key_id in self._sent

    def observe(self, key_id: str, records: torch.Tensor) -> None:
        """Sends a key's next committed records [n, record_width] (float32); does not wait. A dead
        child does not make it raise (the records are committed already): :meth:`summary` does."""
        with self._send_lock:  # not under _cond: the reader must go on receiving while this blocks
            with self._cond:
                self._sent[key_id] = self._sent.get(key_id, 0) + 1
            try:
                self._conn.send((key_id, records.to(torch.float32).contiguous().numpy()))
            except OSError as err:
                self._fail(f"it exited ({type(err).__name__})")

    def summary(self, key_id: str) -> KeyState:
        """The key's summary (queries, flag, first flag, last score) after all records sent so far."""
        with self._cond:
            self._cond.wait_for(lambda: self._error or self._done.get(key_id, 0) == self._sent.get(key_id, 0))
            if self._error:
                raise RuntimeError(f"the detector process failed: {self._error}")
            return self._summaries.get(key_id, KeyState())

    def flagged(self) -> int:
        with self._cond:
            return sum(st.flag for st in self._summaries.values())

    def summaries(self) -> Dict[str, KeyState]:
        """Every key's latest summary."""
        with self._cond:
            return dict(self._summaries)

    def _read(self) -> None:
        while True:
            try:
                key_id, st = self._conn.recv()
            except (EOFError, OSError) as err:
                self._fail(f"it exited ({type(err).__name__})")
                return
            with self._cond:
                self._summaries[key_id] = st
                self._done[key_id] = self._done.get(key_id, 0) + 1
                self._cond.notify_all()

    def _fail(self, why: str) -> None:
        with self._cond:
            self._error = self._error or why
            self._cond.notify_all()

    def close(self) -> None:
        """Lets the child finish what it was sent, then stops it."""
        self._fail("closed")
        with self._send_lock, contextlib.suppress(OSError):
            if self._proc.is_alive():
                self._conn.send(None)
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
        self._reader.join(5)
