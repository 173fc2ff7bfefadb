"""Per-key model-extraction detectors (PRADA, D-ADD, SEAT) with one contract
(:class:`~ppoison_ext.detectors.base.Detector`): records per query, a key's state a pure function of
its records, saved as a detector folder (``detector.json`` + ``tensors.pt``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Union

import torch
from torch import nn

from .base import DETECTOR_FILE, TENSORS_FILE, Detector, KeyState, victim_forward
from .dadd import DADD
from .prada import PRADA
from .seat import SEAT

__all__ = ["Detector", "KeyState", "victim_forward", "DETECTORS", "load_detector", "parse_detector_args",
           "PRADA", "DADD", "SEAT"]

#: detector name -> class
DETECTORS: Dict[str, type] = {d.name: d for d in (PRADA, DADD, SEAT)}


def load_detector(folder: Union[str, Path], model: nn.Module, **overrides: Any) -> Detector:
    """The detector saved in ``folder`` (``detect-calibrate``'s output) for the victim ``model``;
    ``overrides`` replace saved config values (e.g. ``latch=False``)."""
    folder = Path(folder)
    if not (folder / DETECTOR_FILE).is_file():
        raise ValueError(f"detector: {folder} is not a detector folder (no {DETECTOR_FILE})")
    config = json.loads((folder / DETECTOR_FILE).read_text())
    name = config.pop("name", None)
    if name not in DETECTORS:
        raise ValueError(f"detector: {folder / DETECTOR_FILE} names {name!r}; known: {sorted(DETECTORS)}")
    unknown = set(overrides) - set(config)
    if unknown:
        raise ValueError(f"detector_args: unknown keys {sorted(unknown)} for {name}; known: {sorted(config)}")
    tensors = torch.load(folder / TENSORS_FILE, weights_only=True) if (folder / TENSORS_FILE).exists() else {}
    return DETECTORS[name].from_saved({**config, **overrides}, tensors, model)


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_detector_args(text: str) -> Dict[str, Any]:
    """``"latch:false,delta:0.95"`` as a dict, each value a bool (true/false), int, float or str."""
    out: Dict[str, Any] = {}
    for entry in (e.strip() for e in (text or "").split(",") if e.strip()):
        key, sep, value = entry.partition(":")
        if not sep or not key.strip():
            raise ValueError(f"detector_args: entry {entry!r} is not of the form key:value")
        if key.strip() in out:
            raise ValueError(f"detector_args: key {key.strip()!r} given twice")
        out[key.strip()] = _value(value.strip())
    return out
