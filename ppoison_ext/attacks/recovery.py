"""The recovery table of the defense-aware attackers: pairs (true posterior, perturbed posterior).

A restorer (:mod:`ppoison_ext.attacks.restorers`) learns the map perturbed → true from a table
the attacker builds offline: "true" samples from shadow models run on the attacker's query
inputs, or from a Dirichlet distribution, each pushed through the defense's perturbation
function: **white-box**, the defense's own ``defend(x, y)`` on the attacker's copy of the
defense, given the pair's query input (these calls are not queries to the victim). A quantizer
(ModelGuard-S) is looked up frozen in its banks as they are (never grown by the table), and the
table then keeps only the pairs within its ε, as the reference does.

Dirichlet priors (``prior``): ``sparse`` (default) one Dirichlet(1/K·1) for all samples;
``released`` per query i a Dirichlet with concentration ỹ_i·K·c centred on the released
posterior; ``oracle`` centred on the victim's **clean** posterior of the query, which **leaks**
the undefended outputs (``meta["leaks_clean_posteriors"] = True``). :meth:`RecoveryTable.save`
writes tensors and a JSON string (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_choices, int_arg
from ..defenses import ModelGuardS
from ..devices import as_device
from ..fileio import atomic_write
from ..models.heads import num_classes_of
from ..training import device_of
from .runstate import reseed_blackbox

__all__ = ["RecoveryTable", "dirichlet_samples", "shadow_samples", "defense_perturbation",
           "build_recovery_table", "PRIORS", "TABLE_SOURCES", "TABLE_FILE"]

logger = logging.getLogger(__name__)

PRIORS = ("sparse", "released", "oracle")
TABLE_SOURCES = ("dirichlet", "shadow")
TABLE_FILE = "recover_table.pt"
_MIN_ALPHA = 1e-6  # a zero entry in a centre gives α = 0, which Dirichlet sampling rejects


@dataclass
class RecoveryTable:
    """Pairs (true [N, K], perturbed [N, K]) with the query-input index each pair was
    computed on (``index`` [N], int64) and a description ``meta``."""

    true: Tensor
    perturbed: Tensor
    index: Tensor
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.true.dim() != 2 or self.perturbed.shape != self.true.shape:
            raise ValueError(f"true and perturbed must both be [N, K], got {tuple(self.true.shape)} and "
                             f"{tuple(self.perturbed.shape)}")
        if self.index.shape != (self.true.shape[0],):
            raise ValueError(f"index must be [{self.true.shape[0]}], got {tuple(self.index.shape)}")
        self.true = self.true.float().contiguous()
        self.perturbed = self.perturbed.float().contiguous()
        self.index = self.index.long()

    def __len__(self) -> int:
        return int(self.true.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.true.shape[1])

    def filter_epsilon(self, epsilon: float, p: float = 1.0) -> "RecoveryTable":
        """Only the pairs with ‖true − perturbed‖_p ≤ ``epsilon`` (against a quantizer: the true
        samples that found a centroid within ε)."""
        d = torch.linalg.vector_norm((self.true - self.perturbed).double(), ord=p, dim=1)
        keep = d <= float(epsilon)
        meta = dict(self.meta, epsilon_filter=float(epsilon), epsilon_filter_kept=int(keep.sum()))
        return RecoveryTable(self.true[keep], self.perturbed[keep], self.index[keep], meta)

    def save(self, path: Union[str, Path]) -> Path:
        table = {"true": self.true, "perturbed": self.perturbed, "index": self.index,
                 "meta": json.dumps(self.meta, default=str)}
        return atomic_write(path, lambda f: torch.save(table, f))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "RecoveryTable":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["true"], d["perturbed"], d["index"], json.loads(d["meta"]))


def dirichlet_samples(n: int, num_classes: int, *, centres: Optional[Tensor] = None,
                      concentration: float = 8.0, seed: Union[int, np.random.Generator, None] = 42):
    """True samples from a Dirichlet prior: ``(samples [M, K] float32, centre_index [M] int64)``.

    With ``centres`` [N, K]: max(1, ⌊n / N⌋) samples per centre c_i, with concentration
    α_i = max(c_i·K·``concentration``, 1e-6); without: n samples of Dirichlet(1/K·1), index −1.
    ``seed``: an int or a numpy Generator.
    """
    int_arg(n, "n")
    if not concentration > 0:
        raise ValueError(f"concentration must be > 0, got {concentration!r}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    K = int(num_classes)
    if centres is None:
        alpha = np.full((n, K), 1.0 / K)
        index = np.full(n, -1, dtype=np.int64)
    else:
        c = centres.detach().double().cpu().numpy()
        if c.ndim != 2 or c.shape[1] != K:
            raise ValueError(f"centres must be [N, {K}], got {list(c.shape)}")
        s = max(1, n // c.shape[0])
        alpha = np.repeat(np.maximum(c * K * concentration, _MIN_ALPHA), s, axis=0)
        index = np.repeat(np.arange(c.shape[0], dtype=np.int64), s)
    g = rng.standard_gamma(alpha)
    tot = g.sum(1, keepdims=True)
    bad = tot[:, 0] <= 0  # every gamma underflowed: put the mass on the largest α
    if bad.any():
        g[bad] = np.eye(K)[alpha[bad].argmax(1)]
        tot[bad] = 1.0
    return torch.from_numpy((g / tot).astype(np.float32)), torch.from_numpy(index)


def shadow_samples(shadows: Sequence[nn.Module], x: Tensor, *, batch_size: int = 256,
                   device: Union[str, torch.device, None] = None):
    """The softmax outputs of every shadow model on the query inputs ``x`` [N, ...]
    (eval mode, no gradients). Returns ``(samples [S·N, K], input_index [S·N])``."""
    outs = []
    for model in shadows:
        dev = as_device(device, default=device_of(model))
        model.eval()
        with torch.no_grad():
            outs.append(torch.cat([F.softmax(model(x[lo:lo + batch_size].to(dev)), 1).float().cpu()
                                   for lo in range(0, x.shape[0], batch_size)]))
    index = torch.arange(x.shape[0]).repeat(len(shadows))
    return torch.cat(outs), index


def defense_perturbation(defense: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The perturbation function ``(x, y_true) -> y'`` of a defense: its ``defend(x, y)``, or a
    quantizer's frozen lookup, which leaves its banks as they are (white-box: the attacker runs
    its own copy of the defense; see the module docs)."""
    defend = getattr(defense, "defend", None)
    if defend is None:
        raise TypeError(f"{type(defense).__name__} has no defend(x, y); pass a perturbation function "
                        "(x, y_true) -> y' instead")
    if getattr(defense, "stateful", False) and not isinstance(defense, ModelGuardS):
        raise ValueError(f"{type(defense).__name__} is stateful (its answers depend on earlier queries), "
                         "so it has no fixed perturbation function for a recovery table")

    def perturb(x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            if isinstance(defense, ModelGuardS):
                return defense.quantize(y, update=False)
            return defend(x, y).y_prime

    return perturb


def build_recovery_table(perturb: Union[nn.Module, Callable[[Tensor, Tensor], Tensor]], x: Tensor,
                         *, source: str = "dirichlet", prior: str = "sparse",
                         table_size: int = 1_000_000, concentration: float = 8.0,
                         shadows: Optional[Sequence[nn.Module]] = None,
                         released: Optional[Tensor] = None, clean: Optional[Tensor] = None,
                         epsilon: Optional[float] = None, batch_size: int = 256, seed: int = 42,
                         device: Union[str, torch.device, None] = None) -> RecoveryTable:
    """Builds a recovery table of ``table_size`` pairs on the query inputs ``x`` (module docs)
    with ``perturb``, a defense (its ``defend``) or a function ``(x, y_true) -> y'``.

    ``source="shadow"`` takes ``shadows``' outputs (a random subset when they give more than
    ``table_size``, the rest from ``prior`` if fewer). ``prior="released"`` needs ``released``
    [N, K], ``"oracle"`` ``clean`` [N, K]. ``epsilon``: keep only pairs within this L1 distance
    (default: a ModelGuard-S ``perturb``'s ε, else every pair; ``inf`` keeps every pair).
    ``seed`` seeds the sampling, the pairing of unindexed samples with inputs, and the defense.
    ``meta["keeps_top1"]`` is the defense's ``keeps_top1`` (None for a function).
    """
    check_choices(source=(source, TABLE_SOURCES), prior=(prior, PRIORS))
    int_arg(table_size, "table_size")
    N = int(x.shape[0])
    if N == 0:
        raise ValueError("x: no query inputs to build the table on")
    rng = np.random.default_rng(seed)
    fn = defense_perturbation(perturb) if isinstance(perturb, nn.Module) else perturb
    device = as_device(device, default=device_of(perturb))
    K = None
    parts, idx_parts = [], []
    meta: Dict[str, Any] = {"source": source, "prior": prior, "table_size": table_size,
                            "concentration": float(concentration), "seed": int(seed), "num_queries": N,
                            "leaks_clean_posteriors": False,
                            "keeps_top1": getattr(perturb, "keeps_top1", None)}
    if epsilon is None and isinstance(perturb, ModelGuardS):
        epsilon = perturb.epsilon
    if source == "shadow":
        if not shadows:
            raise ValueError("source 'shadow' needs shadow models (shadows=)")
        t, i = shadow_samples(shadows, x, batch_size=batch_size)
        if len(t) > table_size:
            keep = torch.from_numpy(np.sort(rng.choice(len(t), table_size, replace=False)))
            t, i = t[keep], i[keep]
        parts.append(t)
        idx_parts.append(i)
        K = t.shape[1]
        meta["num_shadows"] = len(shadows)
    missing = table_size - sum(len(p) for p in parts)
    if missing > 0:
        centres = None
        if prior == "released":
            if released is None:
                raise ValueError("prior 'released' needs the released posteriors (released=)")
            centres = released
        elif prior == "oracle":
            if clean is None:
                raise ValueError("prior 'oracle' needs the victim's clean posteriors (clean=)")
            centres = clean
            meta["leaks_clean_posteriors"] = True
            logger.warning("recovery table: the oracle-centred Dirichlet prior uses the victim's clean "
                           "posteriors of the queries (an oracle leak)")
        if K is None:
            ref = centres if centres is not None else (released if released is not None else clean)
            K = int(ref.shape[1]) if ref is not None else _probe_k(perturb)
        if centres is not None and centres.shape[0] != N:
            raise ValueError(f"{prior} centres must have one row per query input ({N}), "
                             f"got {centres.shape[0]}")
        t, i = dirichlet_samples(missing, K, centres=centres, concentration=concentration, seed=rng)
        parts.append(t)
        idx_parts.append(i)
        meta["dirichlet_samples"] = int(len(t))
    true = torch.cat(parts)
    index = torch.cat(idx_parts)
    unpaired = index < 0  # samples of no query: paired with a random query input, for defenses using x
    if unpaired.any():
        index[unpaired] = torch.from_numpy(rng.integers(0, N, int(unpaired.sum())))
    if isinstance(perturb, nn.Module):
        reseed_blackbox(perturb, int(seed))
    pert = []
    for lo in range(0, len(true), batch_size):
        xb = x[index[lo:lo + batch_size]].to(device)
        pert.append(fn(xb, true[lo:lo + batch_size].to(device)).detach().float().cpu())
    table = RecoveryTable(true, torch.cat(pert), index, meta)
    if epsilon is not None:
        table = table.filter_epsilon(epsilon)
    logger.info("recovery table: %d pairs (%s, prior %s)", len(table), source, prior)
    return table


def _probe_k(perturb) -> int:
    model = getattr(perturb, "model", None)
    k = num_classes_of(model) if isinstance(model, nn.Module) else None
    if k is None:
        raise ValueError("cannot tell K: pass released= or clean=, or a defense wrapping a classifier")
    return k
