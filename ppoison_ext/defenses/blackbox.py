"""The undefended API and its output truncations: top-k, rounding, top-1 labels."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..checks import int_arg
from .base import Defense, DefenseOutput, register

__all__ = ["Blackbox"]


@register("none", "topk", "rounding", topk=int, rounding=int)
class Blackbox(Defense):
    """Softmax posteriors, optionally truncated.

    ``topk`` keeps the k largest posteriors and zeroes the rest; ``rounding`` rounds to that
    many decimals (half to even); neither renormalises. With ``topk``, ``rounding=0`` gives k
    ones instead of the k values (``topk=1, rounding=0``: one-hot labels); ``rounding=0``
    alone does nothing.
    """

    batch_independent = True
    hparam_names = ("topk", "rounding")

    def __init__(self, model: nn.Module, *, topk: Optional[int] = None, rounding: Optional[int] = None, logger=None):
        super().__init__(model, logger=logger)
        self.topk = int_arg(topk, "topk", optional=True)
        self.rounding = int_arg(rounding, "rounding", low=0, optional=True)

    @property
    def keeps_top1(self) -> bool:
        # top-k leaves the order of tied classes to torch.topk, and rounding creates ties
        return self.topk is None and not self.rounding

    def truncate(self, y: Tensor) -> Tensor:
        if self.topk is not None:
            k = min(self.topk, y.shape[1])
            vals, idx = torch.topk(y, k, dim=1)
            src = torch.ones_like(vals) if self.rounding == 0 else vals
            y = torch.zeros_like(y).scatter_(1, idx, src)
        if self.rounding is not None and self.rounding > 0:
            y = torch.round(y, decimals=self.rounding)
        return y

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        return DefenseOutput(self.truncate(y), y)
