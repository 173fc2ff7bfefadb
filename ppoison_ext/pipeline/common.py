"""Pieces shared by the pipeline steps: devices, defended black boxes, run parameters."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..checkpoint import atomic_write_json, load_model_dir, read_params
from ..defenses import Defense, QueryLogger, make_defense, parse_defense_args

__all__ = ["resolve_device", "build_blackbox", "write_params", "victim_dataset_name"]


def resolve_device(device_id: Union[int, str, None]) -> torch.device:
    """The original's ``-d`` flag: a GPU index, or -1 for the CPU (falls back to CPU without a GPU)."""
    if isinstance(device_id, str) and not device_id.lstrip("-").isdigit():
        return torch.device(device_id)
    idx = -1 if device_id is None else int(device_id)
    if idx < 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", idx)


def victim_dataset_name(params: Dict[str, Any]) -> str:
    """The dataset a victim directory was trained on (the original's key order)."""
    for key in ("queryset", "testdataset", "dataset"):
        if params.get(key):
            return params[key]
    raise ValueError("params.json names no dataset (queryset/testdataset/dataset)")


def build_blackbox(victim_dir, defense: str, defense_args: Union[str, Dict[str, Any], None], *,
                   device: torch.device, out_dir, log_prefix: str, log_every: int = 1000,
                   resume: bool = False, **wb_kwargs) -> Tuple[Defense, QueryLogger, Dict[str, Any]]:
    """Loads the victim and wraps it in ``defense``; its queries are logged to ``out_dir``.

    Returns (defense, logger, parsed defense kwargs). ``*_wb`` names build the white-box
    online-attacker variants (:mod:`ppoison_ext.attacks.whitebox`); ``wb_kwargs`` go there.
    """
    kwargs = parse_defense_args(defense_args, defense if defense in _known() else None)
    kwargs["log_prefix"] = log_prefix
    model, params = load_model_dir(victim_dir, device=device)
    logger = QueryLogger(out_dir, prefix=log_prefix, every=log_every, resume=resume)
    args = {k: v for k, v in kwargs.items() if k not in ("log_prefix",)}
    if defense.endswith("_wb"):
        from ..attacks.whitebox import make_wb_defense

        bb = make_wb_defense(defense, args, model=model, logger=logger, device=device, victim_params=params,
                             out_dir=out_dir, **wb_kwargs)
    else:
        bb = make_defense(defense, args, model=model, logger=logger, device=device)
    return bb.to(device), logger, kwargs


def _known():
    from ..defenses.args import DEFENSE_KEYS

    return DEFENSE_KEYS


def write_params(path, values: Dict[str, Any]) -> Path:
    """JSON of a run's arguments plus ``created_on`` (atomic)."""
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    out["created_on"] = str(datetime.datetime.now())
    return atomic_write_json(path, out)


def read_victim_params(victim_dir) -> Dict[str, Any]:
    return read_params(victim_dir)
