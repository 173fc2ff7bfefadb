"""API keys of ``ppoison serve``: a file of hashed keys, checked in constant time.

Key file format, one key a line (``#`` starts a comment)::

    KEY_ID  SHA256_HEX_OF_THE_KEY  [BUDGET]

``KEY_ID`` (letters, digits, ``_ . -``; at most 64) names the key in the ledger, the metrics
and the per-key query-log folder; ``BUDGET`` overrides the server's ``--budget`` for that key.
The server never stores a key in the clear: it hashes what a client presents and compares it
with every stored hash using :func:`hmac.compare_digest`, with no early exit.
``ppoison serve-keygen`` (:mod:`.keygen`) makes keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Union

__all__ = ["KeyEntry", "KeyStore", "hash_key", "new_key", "append_key", "KEY_ID_PATTERN"]

KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The sha256 hex digest of ``key`` (what the key file stores)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return "pp_" + secrets.token_urlsafe(32)


class KeyEntry(NamedTuple):
    key_id: str
    digest: str
    budget: Optional[int] = None


class KeyStore:
    """The keys of a key file; :meth:`verify` maps a presented key to its key id.

    Raises (at load):
        ValueError: a malformed line (the message gives the file and line number), a bad key
            id, a duplicate key id or hash.
    """

    def __init__(self, entries: List[KeyEntry]):
        self.entries = list(entries)
        if len({e.key_id for e in self.entries}) != len(self.entries):
            raise ValueError("api keys: duplicate key id")
        if len({e.digest for e in self.entries}) != len(self.entries):
            raise ValueError("api keys: the same key hash appears twice")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "KeyStore":
        path = Path(path)
        entries = []
        for no, raw in enumerate(path.read_text().splitlines(), 1):
            parts = raw.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) not in (2, 3):
                raise ValueError(f"{path}:{no}: expected 'KEY_ID SHA256_HEX [BUDGET]', got {len(parts)} fields")
            key_id, digest = parts[0], parts[1].lower()
            if not KEY_ID_PATTERN.match(key_id):
                raise ValueError(f"{path}:{no}: key id {key_id!r} must match {KEY_ID_PATTERN.pattern}")
            if not _HEX.match(digest):
                raise ValueError(f"{path}:{no}: the hash must be 64 hex digits (sha256 of the key)")
            budget = None
            if len(parts) == 3:
                try:
                    budget = int(parts[2])
                except ValueError:
                    budget = -1
                if budget < 0:
                    raise ValueError(f"{path}:{no}: budget must be an integer >= 0, got {parts[2]!r}")
            entries.append(KeyEntry(key_id, digest, budget))
        if not entries:
            raise ValueError(f"{path}: no API keys")
        return cls(entries)

    def verify(self, presented: Optional[str]) -> Optional[str]:
        """The key id of ``presented``, or None; compares against every entry in constant time."""
        if not presented:
            return None
        digest = hash_key(presented).encode("ascii")
        found = None
        for e in self.entries:
            if hmac.compare_digest(digest, e.digest.encode("ascii")):
                found = e.key_id
        return found

    def budgets(self, default: Optional[int]) -> Dict[str, Optional[int]]:
        """key id → its budget (the file's, else ``default``; None = unlimited)."""
        return {e.key_id: (e.budget if e.budget is not None else default) for e in self.entries}


def append_key(path: Union[str, Path], key_id: str, budget: Optional[int] = None) -> str:
    """Makes a key for ``key_id``, appends its hash line to ``path`` and returns the key."""
    if not KEY_ID_PATTERN.match(key_id):
        raise ValueError(f"key id {key_id!r} must match {KEY_ID_PATTERN.pattern}")
    path = Path(path)
    if path.exists() and any(line.split()[:1] == [key_id] for line in path.read_text().splitlines()):
        raise ValueError(f"{path} already has a key with id {key_id!r}")
    key = new_key()
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{key_id} {hash_key(key)}" + (f" {int(budget)}" if budget is not None else "") + "\n")
    return key
