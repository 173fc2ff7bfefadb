"""Ownership verification of a suspect model from a server's DAWN watermark log.

``ppoison verify SUSPECT_DIR --watermark-log LOG_DIR [--key-id ID] [--null DIR,...] [--alpha A]``,
or :func:`verify_ownership` for any ``nn.Module``. The watermark set W is the marked queries of one
key (or of every key: then α is divided by the number of keys, Bonferroni), duplicates counted
once; a hit is a suspect whose argmax on x_i is the recorded ŷ_i. Tests (one-sided): the exact
binomial P(X ≥ h) with X ~ Bin(n, 1/K), and, with innocent ``null_models``, the Poisson-binomial
P(X ≥ h) with p0_i = (c_i + 1)/(M + 2), c_i the innocents hitting x_i. The claim holds when the
larger of the p-values computed is ≤ α.

The log is the table ``watermarks`` of the server's ``ledger.sqlite``, written in the same
transaction as the answers' budget (:mod:`ppoison_ext.serve.ledger`).
"""

from __future__ import annotations

import logging
import math
import sqlite3
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import type_arg
from ..devices import DeviceLike, as_device
from ..fileio import atomic_write_json
from ..modeldir import load_model_dir
from .settings import CommonSettings, device_setting, entry_points, setting

__all__ = ["verify_ownership", "ownership_claim", "argmax_of", "OwnershipClaim", "read_watermarks",
           "binomial_sf", "poisson_binomial_sf", "clopper_pearson_upper", "n_required", "WATERMARK_SCHEMA",
           "ALPHA_2_64"]

logger = logging.getLogger(__name__)

ALPHA_2_64 = 2.0 ** -64
WATERMARK_SCHEMA = """CREATE TABLE IF NOT EXISTS watermarks (key_id TEXT NOT NULL, row INTEGER NOT NULL,
    label INTEGER NOT NULL, sha256 TEXT NOT NULL, shape TEXT NOT NULL, x BLOB NOT NULL,
    PRIMARY KEY (key_id, row));"""


def binomial_sf(h: int, n: int, p: float) -> float:
    """P(X ≥ h) for X ~ Binomial(n, p), summed exactly in log space."""
    if h <= 0:
        return 1.0
    if h > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq, lfn = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    terms = [lfn - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
             for j in range(h, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def poisson_binomial_sf(h: int, p: Sequence[float]) -> float:
    """P(X ≥ h) for X a sum of independent Bernoulli(p_i), by the O(n²) recursion over i."""
    dist = np.zeros(len(p) + 1)
    dist[0] = 1.0
    for i, pi in enumerate(p):
        dist[1:i + 2] = dist[1:i + 2] * (1.0 - pi) + dist[:i + 1] * pi
        dist[0] *= 1.0 - pi
    return float(min(1.0, math.fsum(dist[max(h, 0):])))


def clopper_pearson_upper(k: int, m: int, confidence: float = 0.95) -> float:
    """One-sided upper Clopper–Pearson bound of a rate seen k times in m trials."""
    if k >= m:
        return 1.0
    lo, hi = k / m, 1.0  # P(X ≤ k; m, p) falls in p: bisect for 1 − confidence
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1.0 - binomial_sf(k + 1, m, mid) > 1.0 - confidence else (lo, mid)
    return hi


def n_required(wsr: float, p0: float, alpha: float, limit: int = 100_000) -> Optional[int]:
    """Smallest n whose ⌈wsr·n⌉ hits give P(X ≥ hits; n, p0) ≤ alpha (None: none up to ``limit``)."""
    if wsr <= p0:
        return None
    for n in range(1, limit + 1):
        if binomial_sf(math.ceil(wsr * n - 1e-9), n, p0) <= alpha:
            return n
    return None


def read_watermarks(log_dir, key_id: Optional[str] = None) -> Tuple[Tensor, Tensor, List[str]]:
    """(x [n, ...], ŷ [n], key ids of the set) of a watermark log: one key's marks, or every key's;
    a query marked more than once is kept once."""
    path = Path(log_dir) / "ledger.sqlite"
    if not path.is_file():
        raise ValueError(f"watermark log {log_dir}: no ledger.sqlite (the server's --log-dir)")
    with closing(sqlite3.connect(path)) as db:  # WAL: reads while the server writes
        has = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'watermarks'").fetchone()
        where, args = ("WHERE key_id = ?", (key_id,)) if key_id is not None else ("", ())
        rows = db.execute(f"SELECT key_id, label, sha256, shape, x FROM watermarks {where} "
                          "ORDER BY key_id, row", args).fetchall() if has else []
    if not rows:
        of = f" of key {key_id!r}" if key_id else ""
        raise ValueError(f"watermark log {log_dir}: no marked queries{of}")
    seen, xs, labels, keys = set(), [], [], []
    for k, label, digest, shape, blob in rows:
        if digest not in seen:
            seen.add(digest)
            shp = [int(s) for s in shape.split(",")]
            xs.append(torch.frombuffer(bytearray(blob), dtype=torch.float32).view(shp))
            labels.append(label)
        keys.append(k)
    return torch.stack(xs), torch.tensor(labels, dtype=torch.int64), sorted(set(keys))


def argmax_of(model: nn.Module, x: Tensor, device, batch_size: int = 512) -> Tensor:
    """``model``'s first argmax on each row of x (eval mode, in batches), on the CPU."""
    if not x.shape[0]:
        return torch.zeros(0, dtype=torch.int64)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x.split(batch_size)])


@dataclass
class OwnershipClaim:
    """The result of :func:`verify_ownership`; ``str()`` is a short report."""

    keys: List[str]
    n: int
    hits: int
    wsr: float
    num_classes: int
    p_chance: float  # exact binomial against 1/K
    p_null: Optional[float]  # Poisson-binomial against the innocents (None: none given)
    null_models: int
    null_wsr: Optional[List[float]]
    alpha: float  # as asked; the test uses alpha / len(keys)
    claimed: bool
    claimed_2_64: bool
    n_required: Optional[int]  # at (wsr, the larger of 1/K and the innocents' mean hit rate)

    @property
    def p_value(self) -> float:
        return max(self.p_chance, self.p_null if self.p_null is not None else 0.0)

    def __str__(self) -> str:
        null = (f"; innocents ({self.null_models}): WSR max {max(self.null_wsr):.3f}, p = {self.p_null:.3g}"
                if self.p_null is not None else "")
        return (f"watermark of {len(self.keys)} key(s): {self.hits}/{self.n} hits, WSR {self.wsr:.3f}; "
                f"p = {self.p_chance:.3g} against 1/K = 1/{self.num_classes}{null}\n"
                f"claim at alpha {self.alpha:g}{' / ' + str(len(self.keys)) if len(self.keys) > 1 else ''}: "
                f"{'YES' if self.claimed else 'no'}; at 2^-64: {'YES' if self.claimed_2_64 else 'no'}; "
                f"queries needed at this WSR: {self.n_required if self.n_required is not None else 'never'}")


def ownership_claim(hits: Tensor, num_classes: int, *, null_hits: Optional[Tensor] = None,
                    alpha: float = 0.01, keys: Sequence[str] = ("",)) -> OwnershipClaim:
    """The claim from the suspect's hits [n] (bool) on a watermark set of ``keys`` and, with
    innocents, their hits [M, n] (module docs)."""
    n, h, K = int(hits.numel()), int(hits.sum()), int(num_classes)
    p_chance, p_null, null_wsr, p0 = binomial_sf(h, n, 1.0 / K), None, None, 1.0 / K
    if null_hits is not None and len(null_hits):
        null_wsr = null_hits.double().mean(1).tolist() if n else [0.0] * len(null_hits)
        p0_i = ((null_hits.sum(0).double() + 1) / (len(null_hits) + 2)).tolist()
        p_null, p0 = poisson_binomial_sf(h, p0_i), max(p0, float(np.mean(p0_i)) if n else p0)
    p = max(p_chance, p_null if p_null is not None else 0.0)
    per_test, wsr = alpha / len(keys), h / n if n else 0.0
    return OwnershipClaim(list(keys), n, h, wsr, K, p_chance, p_null, len(null_wsr or ()), null_wsr, alpha,
                          p <= per_test, p <= ALPHA_2_64 / len(keys), n_required(wsr, p0, per_test))


def verify_ownership(model: nn.Module, log_dir, *, key_id: Optional[str] = None,
                     null_models: Optional[Sequence[nn.Module]] = None, alpha: float = 0.01,
                     device: DeviceLike = None, batch_size: int = 512) -> OwnershipClaim:
    """Tests whether ``model`` learned the watermarks a server recorded in ``log_dir`` (module docs)."""
    type_arg(model, "model", nn.Module, "a torch.nn.Module")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    nulls = list(null_models or ())
    for m in nulls:
        type_arg(m, "null_models", nn.Module, "torch.nn.Modules")
    device = next(model.parameters(), torch.empty(0)).device if device is None else as_device(device)
    x, labels, keys = read_watermarks(log_dir, key_id)
    with torch.no_grad():
        K = int(model(x[:1].to(device)).shape[1])
    null_hits = torch.stack([argmax_of(m.to(device), x, device, batch_size) == labels for m in nulls]) \
        if nulls else None
    return ownership_claim(argmax_of(model, x, device, batch_size) == labels, K, null_hits=null_hits,
                           alpha=alpha, keys=keys)


@dataclass(kw_only=True)
class VerifySettings(CommonSettings):
    """Test whether a suspect model learned a served victim's watermarks (DAWN)."""

    suspect_dir: str = setting(metavar="SUSPECT_DIR", help="the suspect's model folder")
    watermark_log: str = setting("--watermark-log", metavar="LOG_DIR", help="the server's --log-dir")
    key_id: Optional[str] = setting("--key-id", default=None, metavar="ID",
                                    help="one key's watermarks (default: every key's, alpha / keys)")
    null: Optional[str] = setting("--null", default=None, metavar="DIR,...",
                                  help="innocent model folders, comma-separated, for the empirical null")
    alpha: float = setting("--alpha", default=0.01, metavar="A",
                           help="false-claim probability (default %(default)s)")
    out: Optional[str] = setting("--out", default=None, metavar="FILE", help="also write the result as JSON")
    device_id: int = device_setting()

    def run(self) -> OwnershipClaim:
        device = as_device(self.device_id)
        suspect = load_model_dir(self.suspect_dir, device=device)[0]
        nulls = [load_model_dir(d, device=device)[0] for d in (self.null or "").split(",") if d]
        claim = verify_ownership(suspect, self.watermark_log, key_id=self.key_id, null_models=nulls,
                                 alpha=self.alpha, device=device)
        logger.info("%s: %s", self.suspect_dir, claim)
        if self.out:
            atomic_write_json(self.out, {**asdict(claim), "p_value": claim.p_value})
        return claim


build_parser, main = entry_points(VerifySettings)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
