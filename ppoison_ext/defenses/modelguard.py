"""ModelGuard's defenses (Tang et al., "ModelGuard: Information-Theoretic Defense Against
Model Extraction Attacks", USENIX Security 2024), batched: :class:`ModelGuardW` (the
misinformation LP) and :class:`ModelGuardS` (stateful incremental quantisation)."""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import ops
from ..checks import check_bools, check_choices, int_arg, real_arg
from .base import Defense, DefenseOutput, boolean, register

__all__ = ["ModelGuardW", "ModelGuardS"]

logger = logging.getLogger(__name__)

MARGIN = 1e-4  # ModelGuard-W keeps the top-1 by y′_m − y′_j ≥ MARGIN
LOG_OFFSET = 1e-6  # its LP's cost c = log(y + LOG_OFFSET)


@register("modelguard_w", needs="epsilon", example="epsilon:1.0", epsilon=float, ydist=str,
          batch_constraint=int)
class ModelGuardW(Defense):
    """ModelGuard-W (``MLD``), with an exact batched solver (differences.md: ModelGuard).

    Per query, with c = log(y + 1e-6) and m = argmax y (first max), the released y′ solves::

        minimise Σ_j c_j y′_j   s.t.   y′ on the simplex, ‖y′ − y‖₁ ≤ ε,
                                       y′_m − y′_j ≥ 1e-4 for every j ≠ m

    (:func:`ppoison_ext.ops.modelguard_w_solve`, a 1-D convex search per row). The top-1 class
    is kept; ``perturb(x).obj`` is the LP objective Σ c·y′. A query whose margin cannot be
    opened within ε (an infeasible LP) is released unchanged and counted in
    :attr:`infeasible_count`. ``ydist`` is accepted and unused (the budget is L1);
    ``batch_constraint`` must be 0 (a budget per query).
    """

    hparam_names = ("epsilon", "ydist", "batch_constraint")
    batch_independent = keeps_top1 = True

    def __init__(self, model: nn.Module, *, epsilon: float, ydist: str = "l1", batch_constraint: int = 0,
                 logger=None):
        super().__init__(model, logger=logger)
        self.epsilon = real_arg(epsilon, "epsilon")
        check_choices(ydist=(ydist, ops.YDISTS))
        if int_arg(batch_constraint, "batch_constraint", low=None) != 0:
            raise ValueError(f"batch_constraint must be 0 (one budget per query); the shared-budget variant "
                             f"{batch_constraint} is not supported")
        self.ydist = ydist
        self.batch_constraint = batch_constraint
        self.infeasible_count = 0

    def get_yprime(self, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """The defense applied to given posteriors y [B, K]: (y′, objective, feasible)."""
        return ops.modelguard_w_solve(y, self.epsilon, MARGIN, LOG_OFFSET)

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        y_prime, obj, feasible = self.get_yprime(y)
        bad = int((~feasible).sum())
        if bad:
            self.infeasible_count += bad
            logger.warning("ModelGuard-W: %d queries of %d could not open the top-1 margin within epsilon=%g; "
                           "released unchanged", bad, y.shape[0], self.epsilon)
        return DefenseOutput(y_prime, y, obj)


@register("modelguard_s", epsilon=float, ydist=str, frozen=boolean, optim=int, ordered_quantization=boolean)
class ModelGuardS(Defense):
    """ModelGuard-S: ordered incremental quantisation (differences.md: ModelGuard).

    **Stateful**: one centroid bank per top-1 class, empty at construction; queries are
    answered in order (row order inside a batch). With l = argmax y, the release is the
    earliest-created centroid of class l within distance ε of y (``ydist`` L1 or L2); if there
    is none, y becomes a new centroid and is released as is. The top-1 class is kept.
    Queries that match an existing centroid are resolved at once; only the rest go through a
    short sequential pass. ``frozen=True`` adds no centroids: the first centroid within ε,
    else the nearest (first on ties), else y. The banks are :meth:`get_state`; :meth:`reset`
    empties them.
    """

    hparam_names = ("epsilon", "ydist", "frozen")
    keeps_top1 = stateful = True

    def __init__(self, model: nn.Module, *, epsilon: float = 1.0, ydist: str = "l1", frozen: bool = False,
                 logger=None):
        super().__init__(model, logger=logger)
        self.epsilon = real_arg(epsilon, "epsilon")
        check_choices(ydist=(ydist, ("l1", "l2")))
        check_bools(frozen=frozen)
        self.ydist, self.frozen = ydist, frozen
        self.reset()

    @classmethod
    def from_args(cls, name, model, args, *, logger=None, **_):
        if args.pop("optim", 0) != 0:
            raise ValueError("defense_args: modelguard_s supports optim:0 only "
                             "(the new centroid is the query)")
        if not args.pop("ordered_quantization", True):
            raise ValueError("defense_args: modelguard_s supports ordered_quantization:1 only")
        return cls(model, logger=logger, **args)

    @property
    def batch_independent(self) -> bool:
        return self.frozen  # else a row may become the centroid of the rows after it

    def reset(self) -> None:
        """Empties every centroid bank."""
        self._bank: Optional[Tensor] = None  # [N, K], creation order, all classes
        self._labels: Optional[Tensor] = None  # [N] top-1 class of each centroid

    @property
    def num_centroids(self) -> int:
        return 0 if self._bank is None else int(self._bank.shape[0])

    def get_state(self) -> Dict[str, Any]:
        """The banks and the query count (tensors and numbers only)."""
        st: Dict[str, Any] = {"call_count": int(self.call_count)}
        if self._bank is not None:
            st["bank"] = self._bank.detach().cpu().clone()
            st["labels"] = self._labels.detach().cpu().clone()
        return st

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`get_state`; ``{}``: the state before any query."""
        self.reset()
        self.call_count = int(state.get("call_count", 0))
        if "bank" in state:
            bank, labels = state["bank"], state["labels"]
            if bank.dim() != 2 or labels.shape != bank.shape[:1]:
                raise ValueError(f"resume state: bank {tuple(bank.shape)} and labels {tuple(labels.shape)} "
                                 "do not match")
            self._bank, self._labels = bank.clone(), labels.to(torch.int64).clone()

    def _dist(self, a: Tensor, b: Tensor) -> Tensor:
        p = 1.0 if self.ydist == "l1" else 2.0
        return torch.cdist(a.double(), b.double(), p=p, compute_mode="donot_use_mm_for_euclid_dist")

    def quantize(self, y: Tensor, update: Optional[bool] = None) -> Tensor:
        """The released centroids for posteriors y [B, K], in row order; ``update`` (default:
        not ``frozen``) adds the new centroids to the banks."""
        if not isinstance(y, Tensor) or y.dim() != 2:
            raise ValueError(f"y must be a [B, K] tensor, got {getattr(y, 'shape', type(y).__name__)}")
        if not torch.is_floating_point(y):
            raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
        if y.numel() and not bool(torch.isfinite(y).all()):
            raise ValueError("y contains NaN or Inf values")
        update = (not self.frozen) if update is None else update
        B, K = y.shape
        if B == 0:
            return y.clone()
        if self._bank is not None and self._bank.shape[1] != K:
            raise ValueError(f"this defense's banks hold K={self._bank.shape[1]} classes, got y with K={K}")
        labels = y.argmax(1)  # first max
        if self._bank is None:
            bank, blab = y.new_zeros((0, K)), labels.new_zeros((0,))
        else:
            bank, blab = self._bank.to(device=y.device, dtype=y.dtype), self._labels.to(y.device)
        N = bank.shape[0]
        choice = torch.full((B,), -1, dtype=torch.int64, device=y.device)
        if N:
            d = self._dist(y, bank)
            same = labels[:, None] == blab[None, :]
            valid = (d <= self.epsilon) & same
            has = valid.any(1)
            choice = torch.where(has, valid.to(torch.int8).argmax(1), choice)  # the earliest valid
            if not update:
                near = torch.where(same, d, torch.full_like(d, math.inf)).argmin(1)
                known = same.any(1)
                choice = torch.where(~has & known, near, choice)
        if not update:
            out = y.clone()
            hit = choice >= 0
            if not bool(hit.all()):
                logger.warning("ModelGuard-S (frozen): %d queries of classes without centroids released unchanged",
                               int((~hit).sum()))
            out[hit] = bank[choice[hit]]
            return out
        todo = (choice < 0).nonzero()[:, 0]
        if todo.numel():
            yu, lu = y[todo], labels[todo]
            ok = ((self._dist(yu, yu) <= self.epsilon) & (lu[:, None] == lu[None, :])).cpu().numpy()
            u = todo.numel()
            leader = np.zeros(u, dtype=bool)
            pick = np.empty(u, dtype=np.int64)
            for i in range(u):  # sequential leader clustering over the unresolved queries
                cand = np.flatnonzero(ok[i, :i] & leader[:i])
                if cand.size:
                    pick[i] = cand[0]
                else:
                    leader[i] = True
                    pick[i] = i
            rank = np.cumsum(leader) - 1  # index of each leader among the new centroids
            new_idx = torch.from_numpy(N + rank[pick]).to(y.device)
            choice[todo] = new_idx
            lead = torch.from_numpy(np.flatnonzero(leader)).to(y.device)
            bank = torch.cat([bank, yu[lead]])
            blab = torch.cat([blab, lu[lead]])
            self._bank, self._labels = bank, blab
        return bank[choice]

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        return DefenseOutput(self.quantize(y), y)
