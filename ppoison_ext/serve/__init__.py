"""``ppoison serve``: a defended victim over HTTP (FastAPI on uvicorn).

Modules: :mod:`.main` (the command and :func:`build_state`), :mod:`.app` (endpoints,
metrics), :mod:`.batcher` (micro-batching, the batch-independence rule), :mod:`.ledger`
(per-key budgets in SQLite, per-key query logs, the commit order), :mod:`.auth` (hashed API
keys), :mod:`.inputs` (request decoding and its 4xx answers). Needs the ``serve`` extra
(``pip install 'ppoison_ext[serve]'``); importing this package alone needs nothing more.
"""

__all__ = ["app", "auth", "batcher", "inputs", "keygen", "ledger", "main", "process"]
