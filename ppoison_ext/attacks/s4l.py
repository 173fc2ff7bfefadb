"""S4L: substitute training with a rotation self-supervision loss on the unlabelled query set
(Zhai et al., "S4L: Self-Supervised Semi-Supervised Learning", ICCV 2019, as ModelGuard's attacker).

:class:`S4LCriterion` adds to the soft cross-entropy of a labelled batch ``weight`` × the
cross-entropy of a rotation head (on the features entering the model's last ``nn.Linear``; for
torchvision's VGG, after its first Linear + ReLU + dropout, as ModelGuard's attacker) on
an unlabelled batch rotated by 0°, 90°, 180° and 270°. The head's parameters go into the
optimizer beside the model's (:meth:`S4LCriterion.parameters`).
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..checks import real_arg
from ..losses import soft_cross_entropy
from ..models.heads import classifier_head
from ..training import cycle_batches

__all__ = ["rotation_batch", "RotationHead", "rotation_loss", "S4LCriterion"]


def rotation_batch(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``x`` [B, C, H, W] → (its 4 rotations [4B, C, H, W], labels [4B]): rows k·B … (k+1)·B − 1
    are rotated by k·90° (``torch.rot90(x, k, (-2, -1))``) and labelled k."""
    if x.dim() < 3:
        raise ValueError(f"x must be [B, ..., H, W], got {tuple(x.shape)}")
    B = x.shape[0]
    xs = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(B)
    return xs, labels


class RotationHead(nn.Module):
    """A ``Linear(D, 4)`` on the features entering ``model``'s classifier head (torchvision's
    VGG: the output of ``classifier[2]``, after the first Linear + ReLU + dropout)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._takes_output = isinstance(model, torchvision.models.VGG)
        if self._takes_output:
            site, width = model.classifier[2], model.classifier[0].out_features
        else:
            _, site = classifier_head(model)
            if not isinstance(site, nn.Linear):
                raise ValueError(f"{type(model).__name__}: S4L needs a model whose classifier head is an "
                                 "nn.Linear")
            width = site.in_features
        self._site = [site]  # not a submodule: the layer stays the model's
        p = next(model.parameters())
        self.rot = nn.Linear(width, 4).to(device=p.device, dtype=p.dtype)

    def features(self, model: nn.Module, x: Tensor) -> Tensor:
        captured = []
        site = self._site[0]
        handle = (site.register_forward_hook(lambda _m, _inp, out: captured.append(out)) if self._takes_output
                  else site.register_forward_pre_hook(lambda _m, inp: captured.append(inp[0])))
        try:
            model(x)
        finally:
            handle.remove()
        return captured[-1].flatten(1)

    def forward(self, model: nn.Module, x: Tensor) -> Tensor:
        return self.rot(self.features(model, x))


def rotation_loss(model: nn.Module, head: RotationHead, x: Tensor) -> Tensor:
    """Cross-entropy of ``head`` over the 4 rotations of ``x`` (mean over the 4B rows)."""
    xs, labels = rotation_batch(x)
    return F.cross_entropy(head(model, xs), labels)


class S4LCriterion:
    """``softCE(logits, targets) + weight · rotation_loss(model, head, unlabelled batch)``, the
    unlabelled batches (of ``batch_size`` items (image, anything)) read from ``unlabelled``
    shuffled with ``seed``, cycling."""

    def __init__(self, model: nn.Module, unlabelled: Dataset, *, weight: float = 1.0, batch_size: int = 64,
                 seed: int = 42, num_workers: int = 0):
        self.model, self.weight = model, real_arg(weight, "weight")
        self.head = RotationHead(model)
        self._gen = torch.Generator().manual_seed(seed)
        self._loader = DataLoader(unlabelled, batch_size=batch_size, shuffle=True, generator=self._gen,
                                  num_workers=num_workers, drop_last=len(unlabelled) > batch_size)
        self._it: Optional[Iterator] = None
        self.last_rotation_loss: Optional[float] = None

    def parameters(self):
        return self.head.parameters()

    def _next(self) -> Tensor:
        if self._it is None:
            self._it = cycle_batches(self._loader, "the unlabelled set")
        return next(self._it)[0]

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = soft_cross_entropy(logits, targets) if targets.dim() == 2 else F.cross_entropy(logits, targets)
        if self.weight == 0:
            return loss
        self.head.train(self.model.training)
        rot = rotation_loss(self.model, self.head, self._next().to(logits.device))
        self.last_rotation_loss = float(rot.detach())
        return loss + self.weight * rot
