"""Pieces shared by the pipeline steps."""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["resolve_device"]


def resolve_device(device_id: Union[int, str, None]) -> torch.device:
    """The ``-d`` flag: a GPU index, or -1 for the CPU (falls back to CPU without a GPU)."""
    if isinstance(device_id, str) and not device_id.lstrip("-").isdigit():
        return torch.device(device_id)
    idx = -1 if device_id is None else int(device_id)
    if idx < 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", idx)
