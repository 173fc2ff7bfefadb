"""Defense-aware attackers (ModelGuard's attacker suite): :class:`Smoothing` (Knockoff Nets
averaging ``qpi`` augmented queries per image), :class:`DefenseAware` (any inner attack, then a
restorer fitted on a recovery table and/or hard labels) and :class:`Top1` (hard labels).
:class:`DefenseAware` keeps the inner attack's raw transfer set in ``out_dir`` and writes the
one to train on in ``out_dir/aware`` (:data:`AWARE_SUBDIR`), e.g.
``DefenseAware(KnockoffNets(budget=5000), restorer=DDAE()).build_transferset(defense, queryset, "out/")``.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..checks import check_choices, type_arg
from ..training import device_of
from .base import Attack
from .knockoff import KnockoffNets
from .recovery import PRIORS, TABLE_FILE, TABLE_SOURCES, RecoveryTable, build_recovery_table
from .restorers import Restorer, hard_labels, transform_transferset
from .transferset import TransferSet

__all__ = ["Smoothing", "DefenseAware", "Top1", "AWARE_SUBDIR"]

logger = logging.getLogger(__name__)

AWARE_SUBDIR = "aware"


class Smoothing(KnockoffNets):
    """Knockoff Nets with ``qpi`` queries per image, each re-augmented by ``augment`` (which
    replaces ``queryset.transform``; None keeps it), the label their mean. ``num_workers`` is
    forced to 0, so the augmentations are reseeded per batch and reproducible."""

    def __init__(self, *, qpi: int = 3, augment: Optional[Callable] = None, **kwargs: Any):
        kwargs["num_workers"] = 0
        super().__init__(qpi=qpi, **kwargs)
        self.augment = augment

    def build_transferset(self, blackbox, queryset, out_dir=None, **kwargs) -> TransferSet:
        if self.augment is not None:
            queryset = copy.copy(queryset)
            queryset.transform = self.augment
        return super().build_transferset(blackbox, queryset, out_dir, **kwargs)

    #: each of the qpi calls loads (so re-augments) the batch's images anew
    reload_per_query = True


class DefenseAware(Attack):
    """The transfer set of ``inner`` (default ``KnockoffNets()``), restored by ``restorer`` (None:
    no recovery) and/or made hard labels (``hard_label``). The recovery table's settings are
    :func:`~ppoison_ext.attacks.recovery.build_recovery_table`'s; ``perturb`` defaults to the
    black box, ``transform`` (stored image → table input) to the query set's."""

    attack_params = ("inner", "restorer", "table_source", "prior", "table_size", "concentration",
                     "hard_label")

    def __init__(self, inner: Optional[Attack] = None, *, restorer: Optional[Restorer] = None,
                 table_source: str = "dirichlet", prior: str = "sparse", table_size: int = 1_000_000,
                 concentration: float = 8.0, epsilon: Optional[float] = None,
                 shadows: Optional[Sequence[nn.Module]] = None,
                 perturb: Optional[Callable[[Tensor, Tensor], Tensor]] = None, hard_label: bool = False,
                 transform: Optional[Callable] = None, seed: int = 42, table_batch_size: int = 1024):
        self.inner = inner if inner is not None else KnockoffNets()
        type_arg(self.inner, "inner", Attack, "an Attack")
        if restorer is not None and not isinstance(restorer, Restorer):
            raise TypeError(f"restorer must have fit(table) and restore(y), got {type(restorer).__name__}")
        check_choices(table_source=(table_source, TABLE_SOURCES), prior=(prior, PRIORS))
        if table_source == "shadow" and restorer is not None and not shadows:
            raise ValueError("table_source 'shadow' needs shadows=")
        self.restorer, self.table_source, self.prior = restorer, table_source, prior
        self.table_size, self.concentration, self.epsilon = table_size, concentration, epsilon
        self.shadows, self.perturb, self.hard_label = shadows, perturb, bool(hard_label)
        self.transform, self.seed, self.table_batch_size = transform, seed, table_batch_size
        self.table: Optional[RecoveryTable] = None

    def build_transferset(self, blackbox, queryset, out_dir=None, **kwargs) -> TransferSet:
        out = self.output_folder(out_dir)
        raw = self.inner.build_transferset(blackbox, queryset, out, **kwargs)
        transform = self.transform if self.transform is not None else getattr(queryset, "transform", None)
        return self.postprocess(raw, blackbox, out / AWARE_SUBDIR, transform=transform)

    def postprocess(self, raw: TransferSet, blackbox, out_dir: Union[str, Path], *,
                    transform: Optional[Callable] = None) -> TransferSet:
        """Restores (when a restorer is set) and/or hard-labels ``raw`` into ``out_dir``; the
        recovery table is saved there as ``recover_table.pt``."""
        out = self.output_folder(out_dir)
        fn: Callable[[Tensor], Tensor] = lambda y: y  # noqa: E731
        meta: dict = {"defense_aware": {"restorer": repr(self.restorer), "hard_label": self.hard_label}}
        if self.restorer is not None:
            if transform is None:
                raise ValueError("transform: needed to turn the stored queries into inputs for the table")
            images = [transform(raw.image(i)) for i in range(len(raw))]
            x = torch.stack(images) if images else torch.zeros(0)
            perturb = self.perturb if self.perturb is not None else blackbox
            clean = None
            if self.prior == "oracle":
                victim_probs = getattr(blackbox, "victim_probs", None)
                if victim_probs is None:
                    raise ValueError("prior 'oracle' needs the black box's clean posteriors (victim_probs)")
                dev = device_of(blackbox)
                clean = torch.cat([victim_probs(x[lo:lo + 1024].to(dev)).float().cpu()
                                   for lo in range(0, len(x), 1024)])
            self.table = build_recovery_table(
                perturb, x, source=self.table_source, prior=self.prior, table_size=self.table_size,
                concentration=self.concentration, shadows=self.shadows, released=raw.y, clean=clean,
                epsilon=self.epsilon, batch_size=self.table_batch_size, seed=self.seed)
            self.table.save(out / TABLE_FILE)
            self.restorer.fit(self.table)
            fn = self.restorer.restore
            meta["defense_aware"]["table"] = self.table.meta
        if self.hard_label:
            inner_fn = fn
            fn = lambda y: hard_labels(inner_fn(y))  # noqa: E731
        return transform_transferset(raw, out, fn, meta=meta)


class Top1(DefenseAware):
    """Hard labels: the transfer set's posteriors become one-hot(top-1), after any recovery
    (``restorer=`` and the table settings as :class:`DefenseAware`)."""

    def __init__(self, inner: Optional[Attack] = None, **kwargs: Any):
        kwargs["hard_label"] = True
        super().__init__(inner, **kwargs)
