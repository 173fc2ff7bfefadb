"""The defended black box: a victim model whose posteriors are perturbed before release."""

from __future__ import annotations

import threading
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .querylog import QueryLogger

__all__ = ["Defense", "DefenseOutput"]


class DefenseOutput(NamedTuple):
    """What a defense computed for one batch.

    y_prime: released posteriors [B, K]; y: the undefended posteriors [B, K];
    obj, sobj: MAD's angular objective and surrogate of y_prime [B] (None for other defenses).
    """

    y_prime: Tensor
    y: Tensor
    obj: Optional[Tensor] = None
    sobj: Optional[Tensor] = None


class Defense(nn.Module):
    """Base class: wraps a victim ``model``; ``defense(x)`` returns the released posteriors.

    Subclasses implement :meth:`defend`. The victim is put in eval mode (as the reference
    does) and queried under ``no_grad``; ``defense.train()``/``eval()`` never switch the
    wrapped models. :meth:`perturb` also returns the undefended y (and objective values),
    counts queries and feeds the optional :class:`QueryLogger`; without a logger a defense
    does no I/O.

    Shape:
        x: whatever the victim takes, batch first ([B, C, H, W] for images); returns [B, K]
        on the victim's device.
    """

    def __init__(self, model: nn.Module, *, logger: Optional[QueryLogger] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if logger is not None and not isinstance(logger, QueryLogger):
            raise TypeError(f"logger must be a QueryLogger or None, got {type(logger).__name__}")
        self.model = model.eval()
        self.logger = logger
        self.call_count = 0
        self._count_lock = threading.Lock()

    def train(self, mode: bool = True) -> "Defense":
        self.training = mode  # the victim stays in eval mode, the proxy as the caller set it
        return self

    def victim_probs(self, x: Tensor) -> Tensor:
        """Undefended posteriors softmax(model(x)) [B, K]."""
        with torch.no_grad():
            return F.softmax(self.model(x), dim=1)

    def reseed(self, seed: Optional[int]) -> None:
        """Restarts the defense's own random stream (``random`` oracle, noise) from ``seed``."""
        if hasattr(self, "seed"):
            self.seed = seed
            self._generators = {}

    # -- capabilities: what the factory, server, grid and thieves read (subclasses override) --
    @property
    def batch_independent(self) -> bool:
        """Whether each row's answer depends on that row alone (and the defense's seed and
        state), bit for bit: the server may then batch rows of different requests together."""
        return False

    @property
    def keeps_top1(self) -> bool:
        """Whether every answer keeps the victim's top-1 class."""
        return False

    @property
    def reseedable(self) -> bool:
        """Whether :meth:`reseed` restarts a random stream this defense draws from."""
        return hasattr(self, "seed")

    @property
    def stateful(self) -> bool:
        """Whether answers depend on earlier queries (state that :meth:`get_state` returns)."""
        return False

    def get_state(self) -> dict:
        """The state answers depend on, as tensors and plain values (``{}`` when stateless)."""
        return {}

    def set_state(self, state: dict) -> None:
        """Restores what :meth:`get_state` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def perturb(self, x: Tensor) -> DefenseOutput:
        """Runs the defense on a batch and returns everything it computed."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        with torch.no_grad():
            out = self.defend(x, self.victim_probs(x))
        with self._count_lock:
            self.call_count += out.y.shape[0]
        if self.logger is not None:
            self.logger.log(out.y, out.y_prime, out.obj, out.sobj)
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.perturb(x).y_prime

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    def hparams(self) -> dict:
        return {}
