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

The ledger is the source of truth: on start, each key's query log is cut back to the key's
``used`` rows (:meth:`QueryLogger.truncate`), dropping rows appended by a batch whose
transaction never committed (a crash between 1 and 2). Hence, after any crash (``kill -9``
included), for every key: log rows = ``used`` = Σ n of its ``requests`` rows; every request
answered 200 is there exactly once; a request is there without having been answered 200 only
if the server died (or the client went away) after step 2 of its batch — at most the batches
committed but not yet sent. SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit
survives the death of the process; ``durable=True`` (``--durable``) makes it survive a power
cut as well (``synchronous=FULL`` and an fsync of the query logs per batch).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..defenses import QueryLogger

__all__ = ["Ledger", "LedgerEntry", "BudgetError", "LOG_PREFIX"]

LOG_PREFIX = "serve"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (key_id TEXT PRIMARY KEY, used INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, key_id TEXT NOT NULL,
    n INTEGER NOT NULL, first_row INTEGER NOT NULL, created REAL NOT NULL, client_request_id TEXT);
"""


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


def _stack(group: Sequence[LedgerEntry]) -> list:
    """y, y′, obj, sobj of a key's requests in a batch, each concatenated in request order."""
    columns = zip(*((e.y, e.y_prime, e.obj, e.sobj) for e in group))
    return [None if any(t is None for t in ts) else torch.cat(ts) for ts in columns]


class Ledger:
    """Budgets, request records and per-key query logs (see the module docs).

    ``log_dir`` None keeps the SQLite database in memory and writes no query logs; ``budgets``
    maps key id → query budget (None: unlimited).
    """

    def __init__(self, log_dir, budgets: Dict[str, Optional[int]], *, log_every: int = 1000,
                 durable: bool = False):
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

    def commit(self, entries: Sequence[LedgerEntry]) -> None:
        """Logs and records a batch's answered requests (steps 1 and 2 of the module docs);
        their reservations become ``used``. On failure nothing is committed and the logs are
        cut back to the committed rows."""
        with self._lock:
            counts: Dict[str, int] = {}
            rows: List[tuple] = []
            now = time.time()
            try:
                groups: Dict[str, List[LedgerEntry]] = {}
                for e in entries:
                    first = self.used.get(e.key_id, 0) + counts.get(e.key_id, 0)
                    n = int(e.y_prime.shape[0])
                    counts[e.key_id] = counts.get(e.key_id, 0) + n
                    rows.append((e.request_id, e.key_id, n, first, now, e.client_request_id))
                    groups.setdefault(e.key_id, []).append(e)
                if self.log_dir is not None:
                    for key_id, group in groups.items():  # one append per key and batch, in request order
                        lg = self._logger(key_id)
                        lg.log(*_stack(group))
                        if self.durable:
                            with open(lg.bin_path, "rb") as f:
                                os.fsync(f.fileno())
                self._db.execute("BEGIN IMMEDIATE")
                with self._db:  # COMMIT, or ROLLBACK on an error
                    self._db.executemany(
                        "INSERT INTO requests (request_id, key_id, n, first_row, created, client_request_id) "
                        "VALUES (?, ?, ?, ?, ?, ?)", rows)
                    self._db.executemany(
                        "INSERT INTO keys (key_id, used) VALUES (?, ?) "
                        "ON CONFLICT(key_id) DO UPDATE SET used = used + excluded.used", list(counts.items()))
            except BaseException:
                for key_id in counts:
                    if key_id in self._loggers:
                        self._loggers[key_id].truncate(self.used.get(key_id, 0))
                raise
            for key_id, n in counts.items():
                self.used[key_id] = self.used.get(key_id, 0) + n
                self.reserved[key_id] = max(0, self.reserved.get(key_id, 0) - n)

    def close(self) -> None:
        with self._lock:
            for lg in self._loggers.values():
                lg.close()
            self._db.close()

