"""Reading the attacker's query set: images to query, and what a transfer set stores of them."""

from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["storage_kind", "raw_items", "load_images"]


def storage_kind(queryset) -> Tuple[str, Optional[List[int]]]:
    if hasattr(queryset, "samples"):
        return "paths", None
    data = getattr(queryset, "data", None)
    if data is None:
        raise TypeError(f"queryset {type(queryset).__name__} has neither .samples (image paths) nor .data "
                        "(a uint8 image array): the transfer set cannot store its images")
    return "images", [int(s) for s in np.asarray(data[:1]).shape[1:]]


def raw_items(queryset, idxs: np.ndarray, kind: str):
    if kind == "paths":
        return [queryset.samples[int(i)][0] for i in idxs]
    data = queryset.data
    if isinstance(data, Tensor):
        return data[torch.as_tensor(idxs)].numpy()
    return np.asarray(data)[idxs]


def load_images(queryset, idxs: Iterable[int]) -> Tensor:
    return torch.stack([queryset[int(i)][0] for i in idxs])
