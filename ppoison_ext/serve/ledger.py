"""Per-key accounting of ``ppoison serve``: budgets in SQLite, query logs per key.

Files under ``--log-dir``: ``ledger.sqlite`` (tables ``keys(key_id, used)`` and
``requests(seq, request_id, key_id, n, first_row, created, client_request_id)``) and one folder per key id with
that key's :class:`~ppoison_ext.defenses.QueryLogger` files (prefix ``serve``:
``queriesserve.f32`` / ``.json``, ``distanceserve.log.tsv``) — the package's query-log
format, which a defender audits after an attack.

Commit order of a batch (:meth:`Ledger.commit`), run before any of its answers is sent:

1. the batch's rows are appended to each key's query log (written through to the OS);
2. one SQLite transaction adds each request (id, key, n, first log row) and each key's ``used``
   count, and commits;
3. only then are the HTTP 200 answers released.

With a detector (``record_width``), step 1 also appends each query's detector record (float32
rows) to the key's ``records.f32``; ``records.json`` says from which of the key's queries on
(``first_row``), of which width and detector (``tag``); a changed detector starts a new file. A
key's detector state is a pure function of these records, so a restart restores it by replay
(:meth:`Ledger.read_records`). The ``detections`` table (key, queries, flag, first flagged query,
last score) is the audit summary: each batch's transaction writes its keys' summaries as of the
key's earlier batches (the detector observes a batch after its commit), and a restart or a clean
shutdown writes every key's current one. A stateful defense's state (ModelGuard-S's banks) is
committed in the batch's transaction too (table ``defense_state``) and restored on start, so a
query gets the answer it would get from an uninterrupted server. So are the queries a watermark
(:class:`~ppoison_ext.defenses.DAWN`) marked: table ``watermarks`` (key, the key's query row, ŷ,
SHA-256 and shape of the query, its float32 bytes), which ``ppoison verify`` reads.

The ledger is the source of truth: on start, each key's query log (and records file) is cut back
to the key's ``used`` rows (:meth:`QueryLogger.truncate`), dropping rows appended by a batch whose
transaction never committed (a crash between 1 and 2). Hence, after any crash (``kill -9``
included), for every key: log rows = ``used`` = Σ n of its ``requests`` rows; every request
answered 200 is there exactly once; a request is there without having been answered 200 only
if the server died (or the client went away) after step 2 of its batch — at most the batches
committed but not yet sent. SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit
survives the death of the process; ``durable=True`` (``--durable``) makes it survive a power
cut as well (``synchronous=FULL`` and an fsync of the query logs per batch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..defenses import QueryLogger
from ..defenses.dawn import query_bytes
from ..fileio import atomic_write_json, truncate_file
from ..pipeline.verify import WATERMARK_SCHEMA

__all__ = ["Ledger", "LedgerEntry", "BudgetError", "LOG_PREFIX"]

LOG_PREFIX = "serve"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, key_id TEXT NOT NULL,
    n INTEGER NOT NULL, first_row INTEGER NOT NULL, created REAL NOT NULL, client_request_id TEXT);
CREATE TABLE IF NOT EXISTS detections (key_id TEXT PRIMARY KEY, queries INTEGER NOT NULL,
    flag INTEGER NOT NULL, flagged_at INTEGER, score REAL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS defense_state (id INTEGER PRIMARY KEY CHECK (id = 0), state BLOB NOT NULL);
""" + WATERMARK_SCHEMA


_SAVE_DETECTION = "INSERT OR REPLACE INTO detections VALUES (?, ?, ?, ?, ?, ?)"


class BudgetError(Exception):
    """A key's budget cannot cover a request (HTTP 429)."""

    def __init__(self, key_id: str, budget: int, used: int, asked: int):
        super().__init__(f"query budget of key {key_id!r} spent: {used} of {budget} queries used "
                         f"(or in flight), this request asks for {asked}")


@dataclass
class LedgerEntry:
    """One answered request of a batch: its id, key and the rows the defense computed."""

    request_id: str
    key_id: str
    y: Tensor
    y_prime: Tensor
    obj: Optional[Tensor] = None
    sobj: Optional[Tensor] = None
    client_request_id: Optional[str] = None
    records: Optional[Tensor] = None  # the detector's records of these rows
    x: Optional[Tensor] = None  # the queries, needed where ``marks`` marks one
    marks: Optional[Tensor] = None  # a watermark's ŷ per row (−1: not marked)

    def marked_rows(self, first: int) -> List[tuple]:
        """``watermarks`` rows of the marked queries, the request's rows starting at ``first``."""
        if self.marks is None:
            return []
        rows = (self.marks >= 0).nonzero().flatten().tolist()
        shape = ",".join(map(str, self.x.shape[1:]))
        return [(self.key_id, first + i, int(self.marks[i]), hashlib.sha256(blob).hexdigest(), shape, blob)
                for i, blob in zip(rows, query_bytes(self.x[rows]))]


def _stack(group: Sequence[LedgerEntry]) -> list:
    """y, y′, obj, sobj of a key's requests in a batch, each concatenated in request order."""
    columns = zip(*((e.y, e.y_prime, e.obj, e.sobj) for e in group))
    return [None if any(t is None for t in ts) else torch.cat(ts) for ts in columns]


class Ledger:
    """Budgets, request records and per-key query logs (see the module docs).

    ``log_dir`` None keeps the SQLite database in memory and writes no query logs; ``budgets``
    maps key id → query budget (None: unlimited). ``record_width``/``record_tag``: the detector's
    record width and name (None: no records).
    """

    def __init__(self, log_dir, budgets: Dict[str, Optional[int]], *, log_every: int = 1000,
                 durable: bool = False, record_width: Optional[int] = None, record_tag: str = ""):
        self.record_width, self.record_tag = record_width, record_tag
        self._records: Dict[str, Path] = {}
        self.log_dir = None if log_dir is None else Path(log_dir)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        self.budgets = dict(budgets)
        self.log_every = log_every
        self.durable = durable
        self._lock = threading.Lock()
        db = ":memory:" if self.log_dir is None else self.log_dir / "ledger.sqlite"
        self._db = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.executescript(_SCHEMA)
        committed = {key_id: int(used) for key_id, used in self._db.execute("SELECT key_id, used FROM keys")}
        self.used: Dict[str, int] = {**dict.fromkeys(self.budgets, 0), **committed}
        self.reserved: Dict[str, int] = {k: 0 for k in self.used}
        self._loggers: Dict[str, QueryLogger] = {}
        for key_id in self.used:
            if self.log_dir is not None and ((self.log_dir / key_id).is_dir() or self.used[key_id]):
                self._logger(key_id)  # cut back to the committed rows now, not at the first query

    def _logger(self, key_id: str) -> QueryLogger:
        lg = self._loggers.get(key_id)
        if lg is None:
            lg = QueryLogger(self.log_dir / key_id, prefix=LOG_PREFIX, every=self.log_every, resume=True)
            lg.truncate(self.used.get(key_id, 0))
            self._loggers[key_id] = lg
        return lg

    def _records_path(self, key_id: str) -> Path:
        """The key's records file, cut back to its committed rows (a new one for a new detector)."""
        path = self._records.get(key_id)
        if path is None:
            folder = self.log_dir / key_id
            folder.mkdir(parents=True, exist_ok=True)
            path, meta_path = folder / "records.f32", folder / "records.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            used, want = self.used.get(key_id, 0), {"width": self.record_width, "tag": self.record_tag}
            if {k: meta.get(k) for k in want} == want and path.exists():
                truncate_file(path, max(0, used - int(meta["first_row"])) * self.record_width * 4)
            else:
                path.write_bytes(b"")
                atomic_write_json(meta_path, {"first_row": used, **want})
            self._records[key_id] = path
        return path

    def read_records(self, key_id: str) -> Tensor:
        """The key's committed detector records [n, record_width] (empty in memory-only mode)."""
        if self.log_dir is None or self.record_width is None:
            return torch.zeros(0, self.record_width or 0)
        with self._lock:
            data = self._records_path(key_id).read_bytes()
        if not data:
            return torch.zeros(0, self.record_width)
        return torch.frombuffer(bytearray(data), dtype=torch.float32).view(-1, self.record_width)

    def defense_state(self) -> Optional[bytes]:
        """The stateful defense's state committed with the last batch (None before any)."""
        with self._lock:
            row = self._db.execute("SELECT state FROM defense_state WHERE id = 0").fetchone()
        return None if row is None else bytes(row[0])

    def key_ids(self) -> List[str]:
        """Every key with a budget or a committed query."""
        return list(self.used)

    @staticmethod
    def _detection_rows(states: Dict[str, Any]) -> List[tuple]:
        now = time.time()
        return [(k, st.queries, int(st.flag), st.flagged_at,
                 None if math.isnan(st.score) else float(st.score), now) for k, st in states.items()]

    def save_detections(self, states: Dict[str, Any]) -> None:
        """Writes the detector summaries (queries, flag, first flagged query, last score) of
        ``states`` (key id → :class:`~ppoison_ext.detectors.KeyState`)."""
        with self._lock:
            self._db.executemany(_SAVE_DETECTION, self._detection_rows(states))

    def reserve(self, key_id: str, n: int) -> None:
        """Holds ``n`` queries of ``key_id``'s budget for a request in flight.

        Raises:
            BudgetError: used + in flight + n would exceed the budget.
        """
        with self._lock:
            budget, held = self.budgets.get(key_id), self.reserved.get(key_id, 0)
            if budget is not None and self.used.get(key_id, 0) + held + n > budget:
                raise BudgetError(key_id, budget, self.used.get(key_id, 0) + held, n)
            self.reserved[key_id] = held + n

    def release(self, key_id: str, n: int) -> None:
        """Returns a reservation of a request that was not answered (never committed)."""
        with self._lock:
            self.reserved[key_id] = max(0, self.reserved.get(key_id, 0) - n)

    def remaining(self, key_id: str) -> Optional[int]:
        budget = self.budgets.get(key_id)
        return None if budget is None else max(0, budget - self.used.get(key_id, 0))

    def commit(self, entries: Sequence[LedgerEntry], detections: Optional[Dict[str, Any]] = None,
               defense_state: Optional[bytes] = None) -> None:
        """Logs and records a batch's answered requests (steps 1 and 2 of the module docs), with
        the detector summaries of ``detections`` (key id → KeyState) and a stateful defense's
        state after the batch (``defense_state``, serialised) in the same transaction; the
        reservations become ``used``. On failure nothing is committed and the
        logs are cut back to the committed rows."""
        with self._lock:
            counts: Dict[str, int] = {}
            rows: List[tuple] = []
            marked: List[tuple] = []
            now = time.time()
            try:
                groups: Dict[str, List[LedgerEntry]] = {}
                for e in entries:
                    first = self.used.get(e.key_id, 0) + counts.get(e.key_id, 0)
                    n = int(e.y_prime.shape[0])
                    counts[e.key_id] = counts.get(e.key_id, 0) + n
                    rows.append((e.request_id, e.key_id, n, first, now, e.client_request_id))
                    marked += e.marked_rows(first)
                    groups.setdefault(e.key_id, []).append(e)
                if self.log_dir is not None:
                    for key_id, group in groups.items():  # one append per key and batch, in request order
                        lg = self._logger(key_id)
                        lg.log(*_stack(group))
                        paths = [lg.bin_path]
                        if self.record_width is not None:
                            paths.append(self._records_path(key_id))
                            with open(paths[-1], "ab") as f:
                                for e in group:
                                    f.write(e.records.to(torch.float32).contiguous().numpy().tobytes())
                        for path in paths if self.durable else ():
                            with open(path, "rb") as f:
                                os.fsync(f.fileno())
                self._db.execute("BEGIN IMMEDIATE")
                with self._db:  # COMMIT, or ROLLBACK on an error
                    self._db.executemany(
                        "INSERT INTO requests (request_id, key_id, n, first_row, created, client_request_id) "
                        "VALUES (?, ?, ?, ?, ?, ?)", rows)
                    self._db.executemany(
                        "INSERT INTO keys (key_id, used) VALUES (?, ?) "
                        "ON CONFLICT(key_id) DO UPDATE SET used = used + excluded.used", list(counts.items()))
                    self._db.executemany(_SAVE_DETECTION, self._detection_rows(detections or {}))
                    self._db.executemany("INSERT INTO watermarks VALUES (?, ?, ?, ?, ?, ?)", marked)
                    if defense_state is not None:
                        self._db.execute("INSERT OR REPLACE INTO defense_state VALUES (0, ?)",
                                         (defense_state,))
            except BaseException:
                for key_id in counts:
                    if key_id in self._loggers:
                        self._loggers[key_id].truncate(self.used.get(key_id, 0))
                    self._records.pop(key_id, None)  # cut back to the committed rows when next opened
                raise
            for key_id, n in counts.items():
                self.used[key_id] = self.used.get(key_id, 0) + n
                self.reserved[key_id] = max(0, self.reserved.get(key_id, 0) - n)

    def close(self) -> None:
        with self._lock:
            for lg in self._loggers.values():
                lg.close()
            self._db.close()

