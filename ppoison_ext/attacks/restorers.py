"""Restorers: undo a defense's perturbation of released posteriors, learnt from a recovery table.

A :class:`Restorer` is ``fit(table)`` on a :class:`~ppoison_ext.attacks.recovery.RecoveryTable`,
then ``restore(y_tilde) -> y_hat`` ([M, K] → [M, K]): :class:`PartialBayes` (a nearest-neighbour
posterior mean) or :class:`DDAE` (an MLP; differences.md: D-DAE). :func:`transform_transferset`
applies such a map to a transfer set into a **new** folder (the raw one is kept).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Protocol, Tuple, Union, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import int_arg, real_arg, type_arg
from ..devices import as_device
from ..training import Steps, fit
from .recovery import RecoveryTable
from .transferset import TransferSet, TransferSetWriter, load_transferset

__all__ = ["Restorer", "PartialBayes", "DDAE", "RestorerMLP", "DDAE_WIDTHS", "hard_labels",
           "transform_transferset"]

logger = logging.getLogger(__name__)

#: hidden widths (h1, h2) of the D-DAE MLP by K (other K: pass hidden=)
DDAE_WIDTHS: Dict[int, Tuple[int, int]] = {10: (128, 64), 43: (512, 256), 100: (1024, 512), 200: (2048, 1024),
                                           256: (2048, 1024)}


@runtime_checkable
class Restorer(Protocol):
    """``fit(table) -> self``; ``restore(y_tilde [M, K]) -> [M, K]``."""

    def fit(self, table: RecoveryTable) -> "Restorer": ...

    def restore(self, y_tilde: Tensor) -> Tensor: ...


def hard_labels(y: Tensor) -> Tensor:
    """One-hot rows at the first maximum of each row of ``y`` [M, K] (float32)."""
    return F.one_hot(y.argmax(1), y.shape[1]).float()


def _check_table(table: RecoveryTable) -> None:
    type_arg(table, "table", RecoveryTable, "a RecoveryTable")
    if len(table) == 0:
        raise ValueError("the recovery table is empty")


class PartialBayes:
    """Nearest-neighbour posterior mean over a recovery table (ModelGuard's Partial Bayes): the
    mean (``mean=False``: the nearest) of the true samples whose perturbed entry is within
    max(``tolerance``, nearest distance) of ỹ in L_``norm``, among the entries whose true top-1
    is ỹ's (``top1_recover``; all entries when none is). ``top1_recover=None`` restricts exactly
    when the table's defense keeps the top-1 (its ``meta["keeps_top1"]``; unknown: restrict), as
    the reference ties it to the defense. ``chunk``: queries per distance block."""

    def __init__(self, *, norm: float = 1.0, tolerance: float = 0.01, top1_recover: Optional[bool] = None,
                 mean: bool = True, chunk: int = 1024):
        self.norm, self.tolerance = real_arg(norm, "norm", low=1.0), real_arg(tolerance, "tolerance")
        self.mean, self.chunk = bool(mean), int(chunk)
        self.top1_recover = None if top1_recover is None else bool(top1_recover)
        self.table: Optional[RecoveryTable] = None

    def __repr__(self) -> str:
        return (f"PartialBayes(norm={self.norm}, tolerance={self.tolerance}, "
                f"top1_recover={self.top1_recover}, mean={self.mean})")

    def fit(self, table: RecoveryTable) -> "PartialBayes":
        _check_table(table)
        self.table = table
        restrict = self.top1_recover
        self._restrict = table.meta.get("keeps_top1") is not False if restrict is None else restrict
        self._true = table.true.double()
        self._pert = table.perturbed.double()
        self._top1 = table.true.argmax(1)
        return self

    def _candidates(self, label: int) -> Tuple[Tensor, Tensor]:
        if self._restrict:
            sel = self._top1 == label
            if bool(sel.any()):
                return self._true[sel], self._pert[sel]
            logger.warning("partial bayes: no table entry has true top-1 %d; using all entries", label)
        return self._true, self._pert

    def restore(self, y_tilde: Tensor) -> Tensor:
        if self.table is None:
            raise RuntimeError("PartialBayes: call fit(table) first")
        y = y_tilde.detach().double().cpu()
        if y.dim() != 2 or y.shape[1] != self.table.num_classes:
            raise ValueError(f"y_tilde must be [M, {self.table.num_classes}], got {tuple(y.shape)}")
        out = torch.empty_like(y)
        labels = y.argmax(1) if self._restrict else torch.zeros(len(y), dtype=torch.long)
        for label in labels.unique().tolist():
            rows = (labels == label).nonzero().squeeze(1)
            true, pert = self._candidates(label)
            step = max(1, min(self.chunk, (1 << 24) // max(1, len(pert))))
            for lo in range(0, len(rows), step):
                r = rows[lo:lo + step]
                d = torch.cdist(y[r], pert, p=self.norm)
                dmin = d.min(1, keepdim=True).values
                if self.mean:
                    w = (d <= dmin.clamp(min=self.tolerance)).double()
                    out[r] = (w @ true) / w.sum(1, keepdim=True)
                else:
                    out[r] = true[d.argmin(1)]
        return out.float()


class RestorerMLP(nn.Module):
    """Linear(K→h1) → BN → LeakyReLU(0.2) → Linear(h1→h2) → BN → LeakyReLU(0.2) →
    Linear(h2→K) → BN(K) → LeakyReLU(0.2) → softmax."""

    def __init__(self, num_classes: int, hidden: Tuple[int, int]):
        super().__init__()
        h1, h2 = hidden
        K = num_classes
        self.net = nn.Sequential(nn.Linear(K, h1), nn.BatchNorm1d(h1), nn.LeakyReLU(0.2),
                                 nn.Linear(h1, h2), nn.BatchNorm1d(h2), nn.LeakyReLU(0.2),
                                 nn.Linear(h2, K), nn.BatchNorm1d(K), nn.LeakyReLU(0.2))

    def forward(self, y: Tensor) -> Tensor:
        return F.softmax(self.net(y), dim=1)


def ddae_loss(out: Tensor, target: Tensor) -> Tensor:
    """The D-DAE loss: mean absolute error × K (= the mean per-sample L1 distance)."""
    return (out - target).abs().mean() * out.shape[1]


class _ShuffledRows:
    """Batches of rows of (x, y), shuffled with ``generator`` anew on every pass; a batch of one
    row is skipped (BatchNorm cannot train on it)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator):
        self.x, self.y, self.batch_size, self.generator = x, y, batch_size, generator

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
        for lo in range(0, len(perm), self.batch_size):
            rows = perm[lo:lo + self.batch_size]
            if len(rows) >= 2:
                yield self.x[rows], self.y[rows]


class _RestorerSteps(Steps):
    """The D-DAE loss; appends each epoch's mean loss per row to ``history``."""

    def __init__(self, history: list):
        super().__init__(ddae_loss)
        self.history = history

    def start_epoch(self) -> None:
        self.total, self.count = 0.0, 0

    def loss(self, net, inputs, targets):
        loss, outputs = super().loss(net, inputs, targets)
        self.total, self.count = self.total + loss.item() * len(inputs), self.count + len(inputs)
        return loss, outputs

    def epoch_record(self, run_id: str, epoch: int) -> dict:
        self.history.append(self.total / max(self.count, 1))
        return {}


class DDAE:
    """The D-DAE / D-DAE+ restorer, an MLP trained perturbed → true on a recovery table (a
    shadow-model table for D-DAE, a Dirichlet one for D-DAE+) with SGD and StepLR.

    ``hidden`` = (h1, h2) defaults to :data:`DDAE_WIDTHS` [K]. ``train_mode_bn`` restores in
    train mode, all rows as one batch (BatchNorm then uses the batch's statistics and updates
    its running ones); by default eval mode, in ``restore_batch_size`` blocks.
    """

    def __init__(self, *, hidden: Optional[Tuple[int, int]] = None, epochs: int = 200, batch_size: int = 1024,
                 lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 1e-4, lr_step: int = 100,
                 lr_gamma: float = 0.5, train_mode_bn: bool = False, restore_batch_size: int = 65536,
                 seed: int = 42, device: Union[str, torch.device] = "cpu", progress: bool = False):
        for name, v in (("epochs", epochs), ("batch_size", batch_size), ("lr_step", lr_step),
                        ("restore_batch_size", restore_batch_size)):
            int_arg(v, name, low=0 if name == "epochs" else 1)
        self.hidden = tuple(hidden) if hidden is not None else None
        self.epochs, self.batch_size, self.lr, self.momentum = epochs, batch_size, float(lr), float(momentum)
        self.weight_decay, self.lr_step, self.lr_gamma = float(weight_decay), lr_step, float(lr_gamma)
        self.train_mode_bn, self.restore_batch_size = bool(train_mode_bn), restore_batch_size
        self.seed, self.device, self.progress = int(seed), as_device(device), progress
        self.net: Optional[RestorerMLP] = None
        self.history: list = []

    def __repr__(self) -> str:
        return (f"DDAE(hidden={self.hidden}, epochs={self.epochs}, batch_size={self.batch_size}, "
                f"lr={self.lr}, train_mode_bn={self.train_mode_bn})")

    @staticmethod
    def widths(num_classes: int) -> Tuple[int, int]:
        if num_classes not in DDAE_WIDTHS:
            raise ValueError(f"the D-DAE widths are defined for K in {sorted(DDAE_WIDTHS)}, "
                             f"got K={num_classes}; pass hidden=(h1, h2)")
        return DDAE_WIDTHS[num_classes]

    def fit(self, table: RecoveryTable) -> "DDAE":
        _check_table(table)
        K = table.num_classes
        hidden = self.hidden or self.widths(K)
        torch.manual_seed(self.seed)
        self.net = RestorerMLP(K, hidden).to(self.device)
        opt = torch.optim.SGD(self.net.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, self.lr_step, self.lr_gamma)
        batches = _ShuffledRows(table.perturbed.to(self.device), table.true.to(self.device), self.batch_size,
                                torch.Generator().manual_seed(self.seed))
        self.history = []
        fit(self.net, batches, _RestorerSteps(self.history), optimizer=opt, scheduler=sched,
            device=self.device, epochs=self.epochs, progress=self.progress, desc="D-DAE restorer")
        return self

    def restore(self, y_tilde: Tensor) -> Tensor:
        if self.net is None:
            raise RuntimeError("DDAE: call fit(table) first")
        y = y_tilde.detach().float().to(self.device)
        self.net.train(self.train_mode_bn)
        step = max(len(y), 1) if self.train_mode_bn else self.restore_batch_size
        with torch.no_grad():
            return torch.cat([self.net(y[lo:lo + step]).cpu() for lo in range(0, len(y), step)])


def transform_transferset(src: Union[TransferSet, str, Path], out_dir: Union[str, Path],
                          fn: Callable[[Tensor], Tensor], *, meta: Optional[Dict[str, Any]] = None,
                          chunk: int = 10000) -> TransferSet:
    """Writes a new transfer set in ``out_dir`` (not ``src``'s folder): the queries of ``src``
    with posteriors ``fn(src.y)`` (all rows at once), ``src``'s description plus ``meta``."""
    ts = src if isinstance(src, TransferSet) else load_transferset(src)
    out = Path(out_dir)
    if out.resolve() == ts.folder.resolve():
        raise ValueError(f"out_dir must differ from the source transfer set ({ts.folder})")
    y = fn(ts.y)
    if not isinstance(y, Tensor) or y.shape != ts.y.shape:
        raise ValueError(f"the transform must return a [{len(ts)}, {ts.num_classes}] tensor")
    if not torch.isfinite(y).all():
        raise ValueError("the transform returned NaN or Inf posteriors")
    own = ("num_classes", "kind", "image_shape", "format_version")
    desc = {k: v for k, v in ts.meta.items() if k not in own}
    desc["derived_from"] = str(ts.folder)
    desc.update(meta or {})
    image_shape = ts.meta.get("image_shape")
    with TransferSetWriter(out, num_classes=ts.num_classes, kind=ts.kind, image_shape=image_shape, meta=desc,
                           resume=False) as w:
        for lo in range(0, len(ts), chunk):
            hi = min(len(ts), lo + chunk)
            x = ts.paths[lo:hi] if ts.kind == "paths" else np.asarray(ts.images[lo:hi])
            w.append(ts.indices[lo:hi], x, y[lo:hi])
    return load_transferset(out)
