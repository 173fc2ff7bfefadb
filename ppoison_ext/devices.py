"""The one parser for every ``device``/``-d`` setting in the package."""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["DeviceLike", "as_device"]

#: What a ``device`` argument accepts: a ``torch.device``, a device string ("cpu", "cuda:1"),
#: a GPU index (-1 for the CPU; as an int or a string of digits), or None for ``default``.
DeviceLike = Union[torch.device, str, int, None]


def as_device(device: DeviceLike, *, default: DeviceLike = 0, name: str = "device") -> torch.device:
    """Resolves ``device`` to a ``torch.device``.

    A GPU index falls back to the CPU when CUDA is not available (the ``-d 0`` default of every
    step runs anywhere); a device string is taken as it is. ``None`` means ``default``.
    Raises TypeError/ValueError naming ``name`` for anything else.
    """
    if device is None:
        if default is None:
            raise ValueError(f"{name} must be given")
        return as_device(default, default=None, name=name)
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise TypeError(f"{name} must be a torch.device, a device string or a GPU index, "
                        f"got {type(device).__name__}")
    if isinstance(device, str) and not device.strip().lstrip("-").isdigit():
        try:
            return torch.device(device.strip())
        except RuntimeError as err:
            raise ValueError(f"{name}: {device!r} is not a device ({err})") from None
    idx = int(device)
    if idx < 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", idx)
