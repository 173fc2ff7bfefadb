"""DAWN, API-side watermarking: a keyed, input-determined fraction of answers gets a wrong top-1
that a clone trained on the answers learns, and the owner records which (the server's ledger).

Selection (as DAWN's filter): d = HMAC-SHA256(key, the query's float32 bytes in C order, as the
model receives them, i.e. after normalisation); the query is marked iff the first 16 bits of d,
big-endian, are ≤ B = ⌊rate·65536⌋, an effective rate of (B + 1)/65536. Answer: the wrapped
defense's y′ with y′[m] and y′[ŷ] swapped, m = argmax y′ (first max) and
ŷ = (m + 1 + (H₂ mod (K − 1))) mod K, H₂ = the digest's last 16 bytes big-endian, so an answer
stays on the simplex and a re-query gets the same answer.
"""

from __future__ import annotations

import hmac
import math
import os
import secrets
from pathlib import Path
from typing import List, Tuple

import torch
from torch import Tensor

from ..checks import real_arg, type_arg
from .base import Defense, DefenseOutput
from .whitebox import WhiteboxDefense

__all__ = ["DAWN", "read_watermark_key", "new_watermark_key", "query_bytes", "MIN_KEY_BYTES"]

#: a key has at least 128 random bits
MIN_KEY_BYTES = 16
_PRECISION = 16


def new_watermark_key(path) -> bytes:
    """Writes a new 256-bit key, in hex, to a new file ``path`` (mode 0600) and returns it."""
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite a key
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def read_watermark_key(path) -> bytes:
    """The key in the file ``path``: one line of hex, at least 128 bits."""
    try:
        text = Path(path).read_text().strip()
        key = bytes.fromhex(text)
    except OSError as err:
        raise ValueError(f"watermark key file {path}: {err}") from err
    except ValueError as err:
        raise ValueError(f"watermark key file {path}: not one line of hex digits") from err
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"watermark key file {path}: {len(key) * 8} bits, need at least {MIN_KEY_BYTES * 8}")
    return key


def query_bytes(x: Tensor) -> List[bytes]:
    """Each row's float32 bytes in C order (little-endian), as the filter hashes them."""
    rows = x.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return [r.tobytes() for r in rows]


class DAWN(Defense):
    """Wraps any (non-white-box) ``defense``; marks a query when its HMAC under ``key`` selects it
    (module docs). ``rate``: the marked fraction asked for, in (0, 1).

    ``perturb(x).marks`` is ŷ per row, −1 where not marked; the server records the marked rows.
    """

    hparam_names = ("rate",)

    def __init__(self, defense: Defense, *, key: bytes, rate: float = 0.005):
        if not isinstance(defense, Defense) or isinstance(defense, (WhiteboxDefense, DAWN)):
            raise TypeError("defense must be a (non-white-box, unwatermarked) Defense, "
                            f"got {type(defense).__name__}")
        type_arg(key, "key", bytes, "bytes")
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"key must hold at least {MIN_KEY_BYTES * 8} bits, got {len(key) * 8}")
        rate = real_arg(rate, "rate", high=1.0)
        if not 0.0 < rate < 1.0:
            raise ValueError(f"rate must be in (0, 1), got {rate}")
        super().__init__(defense.model)
        self.defense, self._key, self.rate = defense, key, rate
        self.bound = math.floor(rate * (1 << _PRECISION))

    @property
    def effective_rate(self) -> float:
        return (self.bound + 1) / (1 << _PRECISION)

    # the wrapped defense's capabilities: marking depends on each row's bytes alone
    batch_independent = property(lambda self: self.defense.batch_independent)
    reseedable = property(lambda self: self.defense.reseedable)
    stateful = property(lambda self: self.defense.stateful)

    def reseed(self, seed) -> None:
        self.defense.reseed(seed)

    def get_state(self) -> dict:
        return self.defense.get_state()

    def set_state(self, state: dict) -> None:
        self.defense.set_state(state)

    def select(self, x: Tensor) -> Tuple[List[int], List[int]]:
        """The rows of a batch that are marked, and each one's H₂ (from the row's digest)."""
        digests = [hmac.digest(self._key, row, "sha256") for row in query_bytes(x)]
        rows = [i for i, d in enumerate(digests) if int.from_bytes(d[:2], "big") <= self.bound]
        return rows, [int.from_bytes(digests[i][16:], "big") for i in rows]

    def _answer(self, x: Tensor) -> DefenseOutput:
        out = self.defense._answer(x)
        y_prime, K = out.y_prime, out.y_prime.shape[1]
        marks = torch.full((y_prime.shape[0],), -1, dtype=torch.int64)
        rows, h2 = self.select(x)
        if not rows:
            return out._replace(marks=marks)
        if K < 2:
            raise ValueError(f"DAWN needs at least 2 classes, got K={K}")
        r = torch.tensor(rows, device=y_prime.device)
        m = y_prime[r].argmax(1)
        wrong = torch.tensor([(mi + 1 + h % (K - 1)) % K for mi, h in zip(m.tolist(), h2)], device=r.device)
        y_prime = y_prime.clone()
        top, other = y_prime[r, m], y_prime[r, wrong]
        y_prime[r, wrong], y_prime[r, m] = top, other
        marks[rows] = wrong.cpu()
        return out._replace(y_prime=y_prime, marks=marks)

    def extra_repr(self) -> str:
        return f"rate={self.rate!r}, effective_rate={self.effective_rate!r}"
