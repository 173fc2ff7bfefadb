"""``defense_args`` strings and building defenses by the original's names.

The original CLI passes defense settings as ``"key:value,key:value"``. Its parser has
traps, fixed here: booleans are parsed (``True/False/true/false/1/0``; the original's
``bool("False")`` is True), a value may contain ``:`` (split on the first one), whitespace
around keys and values is stripped, and unknown keys or values of the wrong type raise a
``ValueError`` naming the key and the accepted ones. Numbers: int, then float, as the
original.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from .base import Defense
from .baselines import RandomNoise, ReverseSigmoid
from .blackbox import Blackbox
from .mad import MAD
from .querylog import QueryLogger

__all__ = ["parse_defense_args", "make_defense", "defense_from_dir", "DEFENSE_NAMES", "DEFENSE_KEYS"]


def _bool(v: str) -> bool:
    low = v.lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise ValueError("expected a boolean (True/False/true/false/1/0)")


def _opt_str(v: str) -> Optional[str]:
    return None if v in ("None", "none", "") else v


def _number(v: str):
    try:
        return int(v)
    except ValueError:
        return float(v)


_COMMON = {"out_path": str, "log_prefix": str}
_MAD = {
    "epsilon": float, "optim": str, "model_adv_proxy": _opt_str, "max_grad_layer": _opt_str, "ydist": str,
    "oracle": str, "disable_jacobian": _bool, "objmax": _bool, "jacobian": str, "jacobian_params": str,
    "exact_max_k": int, "seed": int, "proxy_mode": str,
}
_WB = {"model_adv": _opt_str, "model_adv_proxy_notrain": _bool, "attacker_argmax": _bool, "adv_optimizer": str}
DEFENSE_KEYS: Dict[str, Dict[str, Callable[[str], Any]]] = {
    "none": {"topk": int, "rounding": int, **_COMMON},
    "topk": {"topk": int, "rounding": int, **_COMMON},
    "rounding": {"topk": int, "rounding": int, **_COMMON},
    "mad": {**_MAD, **_COMMON},
    "reverse_sigmoid": {"beta": float, "gamma": float, **_COMMON},
    "rand_noise": {"epsilon_z": float, "dist_z": str, "strat": str, "seed": int, **_COMMON},
}
DEFENSE_KEYS["mad_wb"] = {**DEFENSE_KEYS["mad"], **_WB}
DEFENSE_KEYS["reverse_sigmoid_wb"] = {**DEFENSE_KEYS["reverse_sigmoid"], **_WB}
DEFENSE_KEYS["rand_noise_wb"] = {**DEFENSE_KEYS["rand_noise"], **_WB}
DEFENSE_NAMES = tuple(DEFENSE_KEYS)


def _coerce(key: str, raw: str, kind) -> Any:
    try:
        if kind is float:
            return float(_number(raw))
        if kind is int:
            return int(raw)
        return kind(raw)
    except (ValueError, TypeError) as err:
        what = {float: "a number", int: "an integer", _bool: "a boolean (True/False/true/false/1/0)"}.get(kind, "a value")
        raise ValueError(f"defense_args: {key}:{raw!r} is not {what}") from err


def parse_defense_args(args: Union[str, Mapping[str, Any], None], defense: Optional[str] = None) -> Dict[str, Any]:
    """Parses ``"epsilon:0.5,objmax:True,ydist:l1,model_adv_proxy:DIR"`` into a dict.

    Args:
        args: the string (or an already parsed mapping, validated the same way).
        defense: validate the keys for this defense name; None accepts any known key.

    Raises:
        ValueError: empty key, duplicate key, unknown key (the message lists the accepted
            keys), or a value of the wrong type.
    """
    if defense is not None and defense not in DEFENSE_KEYS:
        raise ValueError(f"unknown defense {defense!r}; known: {list(DEFENSE_KEYS)}")
    allowed = DEFENSE_KEYS[defense] if defense else {k: v for d in DEFENSE_KEYS.values() for k, v in d.items()}
    if args is None:
        return {}
    if isinstance(args, Mapping):
        items = [(str(k), v) for k, v in args.items()]
    elif isinstance(args, str):
        items = []
        for entry in args.split(","):
            entry = entry.strip()
            if not entry:
                continue
            if ":" not in entry:
                raise ValueError(f"defense_args: entry {entry!r} is not of the form key:value")
            key, value = entry.split(":", 1)
            items.append((key.strip(), value.strip()))
    else:
        raise TypeError(f"defense_args must be a str or a mapping, got {type(args).__name__}")
    out: Dict[str, Any] = {}
    for key, value in items:
        if not key:
            raise ValueError("defense_args: empty key")
        if key in out:
            raise ValueError(f"defense_args: key {key!r} given twice")
        if key not in allowed:
            raise ValueError(f"defense_args: unknown key {key!r}"
                             + (f" for defense {defense!r}" if defense else "")
                             + f"; accepted keys: {sorted(allowed)}")
        out[key] = _coerce(key, value, allowed[key]) if isinstance(value, str) else value
    return out


def _load_proxy(path: str, device) -> nn.Module:
    from ..checkpoint import load_model_dir

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"model_adv_proxy must be a model directory (params.json + checkpoint), got {path}")
    # The original loads checkpoint.pth.tar and never puts the proxy in eval mode.
    proxy, _ = load_model_dir(p, device=device, checkpoint_names=("checkpoint.pth.tar", "model_best.pth.tar"))
    return proxy.train()


def make_defense(name: str, args: Union[str, Mapping[str, Any], None] = None, *, model: nn.Module,
                 proxy: Optional[nn.Module] = None, logger: Optional[QueryLogger] = None,
                 device: Union[str, torch.device, None] = None) -> Defense:
    """Builds a defense by the original's names: ``none``, ``topk``, ``rounding``, ``mad``,
    ``reverse_sigmoid``, ``rand_noise`` (the ``*_wb`` white-box variants live in
    :mod:`ppoison_ext.attacks.whitebox`).

    ``args`` is a ``defense_args`` string or mapping. ``out_path``/``log_prefix`` are
    accepted for compatibility and ignored here (pass a ``logger``). A ``model_adv_proxy``
    directory is loaded in train mode, as in the original, unless ``proxy_mode:eval``.

    Example:
        >>> d = make_defense("mad", "epsilon:0.5,objmax:True,ydist:l1", model=victim, proxy=proxy)
    """
    if name not in DEFENSE_KEYS or name.endswith("_wb"):
        known = [n for n in DEFENSE_KEYS if not n.endswith("_wb")]
        raise ValueError(f"unknown defense {name!r}; known: {known}")
    kw = parse_defense_args(args, name)
    kw.pop("out_path", None)
    kw.pop("log_prefix", None)
    if name in ("none", "topk", "rounding"):
        return Blackbox(model, logger=logger, **kw)
    if name == "reverse_sigmoid":
        return ReverseSigmoid(model, logger=logger, **kw)
    if name == "rand_noise":
        if "epsilon_z" not in kw:
            raise ValueError("defense rand_noise needs epsilon_z (e.g. 'epsilon_z:0.5,dist_z:l1')")
        return RandomNoise(model, logger=logger, **kw)
    if "epsilon" not in kw:
        raise ValueError("defense mad needs epsilon (e.g. 'epsilon:0.5')")
    kw.pop("max_grad_layer", None)  # accepted by the original and ignored there too
    proxy_dir = kw.pop("model_adv_proxy", None)
    mode = kw.pop("proxy_mode", None)
    if mode not in (None, "train", "eval"):
        raise ValueError(f"defense_args: proxy_mode must be 'train' or 'eval', got {mode!r}")
    if proxy_dir is not None:
        if proxy is not None:
            raise ValueError("give the proxy either as model_adv_proxy in defense_args or as proxy=, not both")
        proxy = _load_proxy(proxy_dir, device if device is not None else next(model.parameters()).device)
    if proxy is not None and mode is not None:
        proxy.train(mode == "train")
    if "jacobian_params" in kw:
        kw["jacobian_params"] = [s for s in kw["jacobian_params"].split("+") if s] or "all"
        if kw["jacobian_params"] == ["all"]:
            kw["jacobian_params"] = "all"
    return MAD(model, proxy=proxy, logger=logger, **kw)


def defense_from_dir(victim_dir, name: str, args=None, *, device="cpu", logger: Optional[QueryLogger] = None,
                     proxy: Optional[nn.Module] = None) -> Defense:
    """Loads the victim from ``victim_dir`` (params.json + checkpoint) and wraps it."""
    from ..checkpoint import load_model_dir

    model, _ = load_model_dir(victim_dir, device=device)
    return make_defense(name, args, model=model, proxy=proxy, logger=logger, device=device)
