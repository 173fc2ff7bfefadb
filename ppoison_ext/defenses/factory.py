"""The one way to build a defense: a name plus arguments.

:func:`build_defense` takes a defense name (``none``, ``topk``, ``rounding``, ``mad``,
``reverse_sigmoid``, ``rand_noise``, ``grad2`` with GR's baselines ``mad_gr``, ``reverse_sigmoid_gr``,
``rand_gr``, ``am`` (Adaptive Misinformation), and the white-box ``*_wb`` variants) and its arguments as
a ``"key:value,key:value"`` string (the reference's ``defense_args`` syntax), a mapping, or
keywords — or a :class:`DefenseSpec` parsed once before. The CLI steps, the grid and Python
users all go through it.

``defense_args`` parsing: booleans are parsed (``True/False/true/false/1/0``), a value may
contain ``:`` (split on the first one), whitespace around keys and values is stripped,
numbers are int, then float; an unknown key or a value of the wrong type raises a
``ValueError`` naming the key and the accepted ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from ..modeldir import load_model_dir
from .admis import AdaptiveMisinformation
from .base import Defense
from .baselines import RandomNoise, ReverseSigmoid
from .blackbox import Blackbox
from .grad2 import GRAD2
from .grad2_baselines import MADGR, RandomGR, ReverseSigmoidGR
from .mad import MAD
from .modelguard import ModelGuardS, ModelGuardW
from .querylog import QueryLogger
from .whitebox import WB_DEFENSES, build_whitebox

__all__ = ["build_defense", "DefenseSpec", "parse_defense_args", "make_defense", "defense_from_dir", "make_wb_defense",
           "DEFENSE_NAMES", "DEFENSE_KEYS"]


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
# -- GRAD² and GR's versions of its baselines (defenses/grad2.py, defenses/grad2_baselines.py) --
DEFENSE_KEYS.update({
    "grad2": {"epsilon": float, "target": str, "jacobian": str, "seed": int, "batch_independent": _bool,
              "model_adv_proxy": _opt_str, **_COMMON},
    "mad_gr": {"epsilon": float, "model_adv_proxy": _opt_str, **_COMMON},
    "reverse_sigmoid_gr": {"beta": float, "gamma": float, **_COMMON},
    "rand_gr": {"epsilon": float, "seed": int, **_COMMON},
})
# -- end GRAD² --

# --- ModelGuard (MG:defenses/victim/{mld,quantize}.py) ---------------------------------
# The reference scripts' keys: modelguard_w "epsilon:1.0,ydist:l1,batch_constraint:0";
# modelguard_s "epsilon:1.0,ydist:l1,optim:0,frozen:0,ordered_quantization:1".
DEFENSE_KEYS["modelguard_w"] = {"epsilon": float, "ydist": str, "batch_constraint": int, **_COMMON}
DEFENSE_KEYS["modelguard_s"] = {"epsilon": float, "ydist": str, "frozen": _bool, "optim": int,
                                "ordered_quantization": _bool, **_COMMON}
# --- end ModelGuard ----------------------------------------------------------------------
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



@dataclass(frozen=True)
class DefenseSpec:
    """A defense name with its validated arguments (parse once, build as often as needed).

    Example:
        >>> spec = DefenseSpec.parse("mad", "epsilon:0.5,objmax:True", ydist="l1")
        >>> spec.args
        {'epsilon': 0.5, 'objmax': True, 'ydist': 'l1'}
    """

    name: str
    args: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, args: Union[str, Mapping[str, Any], None] = None, **kwargs: Any) -> "DefenseSpec":
        """Validates ``name`` and merges ``args`` (string or mapping) with keyword arguments;
        a key given both ways is an error."""
        if isinstance(name, DefenseSpec):
            if args is not None or kwargs:
                raise TypeError("pass a DefenseSpec alone, without further arguments")
            return name
        if not isinstance(name, str):
            raise TypeError(f"defense must be a name (str) or a DefenseSpec, got {type(name).__name__}")
        if name not in DEFENSE_KEYS:
            raise ValueError(f"unknown defense {name!r}; known: {list(DEFENSE_KEYS)}")
        parsed = parse_defense_args(args, name)
        for key, value in parse_defense_args(kwargs, name).items():
            if key in parsed:
                raise ValueError(f"defense argument {key!r} given twice (in args and as a keyword)")
            parsed[key] = value
        return cls(name, parsed)

    def __str__(self) -> str:
        return ",".join(f"{k}:{v}" for k, v in self.args.items())


def _load_proxy(path: str, device) -> nn.Module:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"model_adv_proxy must be a model directory (params.json + checkpoint), got {path}")
    # The reference loads checkpoint.pth.tar and never puts the proxy in eval mode.
    proxy, _ = load_model_dir(p, device=device, checkpoint_names=("checkpoint.pth.tar", "model_best.pth.tar"))
    return proxy.train()


def _mad(model: nn.Module, kw: Dict[str, Any], *, proxy, logger, device) -> MAD:
    if "epsilon" not in kw:
        raise ValueError("defense mad needs epsilon (e.g. 'epsilon:0.5')")
    kw.pop("max_grad_layer", None)  # accepted by the reference and ignored there too
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
    if "jacobian_params" in kw and isinstance(kw["jacobian_params"], str):
        kw["jacobian_params"] = [s for s in kw["jacobian_params"].split("+") if s] or "all"
        if kw["jacobian_params"] == ["all"]:
            kw["jacobian_params"] = "all"
    return MAD(model, proxy=proxy, logger=logger, **kw)


def _rand_noise(model: nn.Module, kw: Dict[str, Any], *, logger, **_) -> RandomNoise:
    if "epsilon_z" not in kw:
        raise ValueError("defense rand_noise needs epsilon_z (e.g. 'epsilon_z:0.5,dist_z:l1')")
    return RandomNoise(model, logger=logger, **kw)


# --- ModelGuard builders ----------------------------------------------------------------
def _modelguard_w(model: nn.Module, kw: Dict[str, Any], *, logger, **_) -> ModelGuardW:
    if "epsilon" not in kw:
        raise ValueError("defense modelguard_w needs epsilon (e.g. 'epsilon:1.0')")
    return ModelGuardW(model, logger=logger, **kw)


def _modelguard_s(model: nn.Module, kw: Dict[str, Any], *, logger, **_) -> ModelGuardS:
    if kw.pop("optim", 0) != 0:
        raise ValueError("defense_args: modelguard_s supports optim:0 only (the new centroid is the query)")
    if not kw.pop("ordered_quantization", True):
        raise ValueError("defense_args: modelguard_s supports ordered_quantization:1 only")
    return ModelGuardS(model, logger=logger, **kw)
# --- end ModelGuard builders ------------------------------------------------------------


#: name -> builder(model, kwargs, *, proxy, logger, device) of the output-perturbation defenses.
_BUILDERS: Dict[str, Callable[..., Defense]] = {
    "none": lambda model, kw, *, logger, **_: Blackbox(model, logger=logger, **kw),
    "topk": lambda model, kw, *, logger, **_: Blackbox(model, logger=logger, **kw),
    "rounding": lambda model, kw, *, logger, **_: Blackbox(model, logger=logger, **kw),
    "reverse_sigmoid": lambda model, kw, *, logger, **_: ReverseSigmoid(model, logger=logger, **kw),
    "rand_noise": _rand_noise,
    "mad": _mad,
    # ModelGuard
    "modelguard_w": _modelguard_w,
    "modelguard_s": _modelguard_s,
}


# -- GRAD² and GR's versions of its baselines -------------------------------------------------
def _gr_surrogate(name: str, model: nn.Module, kw: Dict[str, Any], proxy, device):
    """The surrogate: proxy= or the model folder model_adv_proxy (GR puts it in eval mode)."""
    proxy_dir = kw.pop("model_adv_proxy", None)
    if proxy_dir is not None:
        if proxy is not None:
            raise ValueError("give the surrogate either as model_adv_proxy in defense_args or as proxy=, not both")
        proxy = _load_proxy(proxy_dir, device if device is not None else next(model.parameters()).device)
    if proxy is None:
        raise ValueError(f"defense {name} needs a surrogate: model_adv_proxy:DIR in defense_args, or proxy=")
    return proxy


def _grad2(model: nn.Module, kw: Dict[str, Any], *, proxy, logger, device) -> GRAD2:
    if "epsilon" not in kw:
        raise ValueError("defense grad2 needs epsilon (e.g. 'epsilon:0.5,target:all_ones')")
    surrogate = _gr_surrogate("grad2", model, kw, proxy, device)
    return GRAD2(model, surrogate=surrogate, logger=logger, **kw)


def _mad_gr(model: nn.Module, kw: Dict[str, Any], *, proxy, logger, device) -> MADGR:
    if "epsilon" not in kw:
        raise ValueError("defense mad_gr needs epsilon (e.g. 'epsilon:0.5')")
    return MADGR(model, surrogate=_gr_surrogate("mad_gr", model, kw, proxy, device), logger=logger, **kw)


def _needs(name: str, key: str, cls):
    def build(model: nn.Module, kw: Dict[str, Any], *, logger, **_):
        if key not in kw:
            raise ValueError(f"defense {name} needs {key} (e.g. '{key}:0.5')")
        return cls(model, logger=logger, **kw)
    return build


_BUILDERS.update({
    "grad2": _grad2,
    "mad_gr": _mad_gr,
    "reverse_sigmoid_gr": _needs("reverse_sigmoid_gr", "beta", ReverseSigmoidGR),
    "rand_gr": _needs("rand_gr", "epsilon", RandomGR),
})
# -- end GRAD² --


# --- Adaptive Misinformation (am) -------------------------------------------------------------
# An additive block: its keys, its builder, and DEFENSE_NAMES recomputed to include it.
DEFENSE_KEYS["am"] = {
    "tau": float, "nu": float, "variant": str, "adaptive": _bool, "temperature": float,
    "model_misinfo": _opt_str, "model_score": _opt_str, **_COMMON,
}
DEFENSE_NAMES = tuple(DEFENSE_KEYS)


def _am(model: nn.Module, kw: Dict[str, Any], *, logger, device, **_) -> AdaptiveMisinformation:
    """``am``: ``tau`` (required), ``nu``, ``variant`` (admis/grad2/modelguard), ``adaptive``,
    ``temperature``; ``model_misinfo:DIR`` (required: the misinformation model's folder, e.g.
    ``<victim>/misinformation`` as ``train-victim --outlier-exposure`` writes it) and, variant
    ``grad2`` only, ``model_score:DIR`` (the OOD-score model's folder). Both load in eval mode."""
    if "tau" not in kw:
        raise ValueError("defense am needs tau (e.g. 'tau:0.99,model_misinfo:DIR')")
    dev = device if device is not None else next(model.parameters()).device
    folders = {}
    for key in ("model_misinfo", "model_score"):
        path = kw.pop(key, None)
        if path is not None:
            if not Path(path).is_dir():
                raise ValueError(f"{key} must be a model directory (params.json + checkpoint), got {path}")
            folders[key], _ = load_model_dir(path, device=dev)
    if "model_misinfo" not in folders:
        raise ValueError("defense am needs model_misinfo:DIR, the misinformation model's folder")
    return AdaptiveMisinformation(model, misinformation_model=folders["model_misinfo"],
                                  score_model=folders.get("model_score"), logger=logger, **kw)


_BUILDERS["am"] = _am
# --- end Adaptive Misinformation ----------------------------------------------------------------


def build_defense(defense: Union[str, DefenseSpec], args: Union[str, Mapping[str, Any], None] = None, *,
                  model: Optional[nn.Module] = None, victim_dir=None, proxy: Optional[nn.Module] = None,
                  logger: Optional[QueryLogger] = None, device: Union[str, torch.device, None] = None,
                  out_dir=None, whitebox: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> Defense:
    """Builds a defense from its name and arguments.

    Args:
        defense: a name of :data:`DEFENSE_NAMES`, or a :class:`DefenseSpec`.
        args: the defense's arguments: a ``"key:value,..."`` string or a mapping; further
            ``kwargs`` are merged in (a key given twice is an error).
        model: the victim; or ``victim_dir``, a model folder to load it from (onto ``device``).
        proxy: MAD's surrogate (else ``model_adv_proxy`` in the arguments, a model folder
            loaded in train mode unless ``proxy_mode:eval``).
        logger: the defense's :class:`QueryLogger` (the defense writes its files only there).
        device: where the defense runs (default: the victim's device).
        out_dir: the white-box variants' folder for ``online.log.tsv``.
        whitebox: the white-box variants' simulated-attacker settings (``victim_params``, the
            victim's ``params.json`` when ``model`` is given directly, ``testset``,
            ``data_root``, ``train_size``, ``log_every``, ``minitest_size``,
            ``eval_batch_size``, ``step_reduction``, ``original_bugs``;
            see :func:`ppoison_ext.defenses.whitebox.build_whitebox`).

    ``out_path`` and ``log_prefix`` are accepted (the reference's CLI passes them) and
    ignored: the caller chooses where the logger writes.

    Example:
        >>> d = build_defense("mad", "epsilon:0.5,objmax:True,ydist:l1", model=victim, proxy=proxy)
        >>> d = build_defense("reverse_sigmoid", beta=0.7, gamma=0.4, model=victim)
    """
    spec = DefenseSpec.parse(defense, args, **kwargs)
    params: Optional[Mapping[str, Any]] = None
    if model is None:
        if victim_dir is None:
            raise ValueError("build_defense needs the victim: model= or victim_dir=")
        model, params = load_model_dir(victim_dir, device=device if device is not None else "cpu")
    elif victim_dir is not None:
        raise ValueError("give the victim either as model= or as victim_dir=, not both")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kw = {k: v for k, v in spec.args.items() if k not in ("out_path", "log_prefix")}
    if spec.name in WB_DEFENSES:
        options = dict(whitebox or {})
        if params is not None:
            options.setdefault("victim_params", params)
        inner_name = spec.name[:-3]
        inner_keys = DEFENSE_KEYS[inner_name]
        inner = {k: v for k, v in kw.items() if k in inner_keys}
        gray_box_dir = inner.pop("model_adv_proxy", None)  # the white-box variant loads it itself

        def build_inner(inner_proxy):
            return _BUILDERS[inner_name](model, dict(inner), proxy=inner_proxy, logger=logger, device=device)

        bb = build_whitebox(spec.name, {k: v for k, v in kw.items() if k not in inner_keys}, build_inner,
                            model=model, device=device, out_dir=out_dir, proxy_dir=gray_box_dir, **options)
    else:
        if whitebox:
            raise ValueError(f"whitebox= settings are for the *_wb defenses, not {spec.name!r}")
        bb = _BUILDERS[spec.name](model, kw, proxy=proxy, logger=logger, device=device)
    return bb.to(device) if device is not None else bb


def _deprecated(old: str) -> None:
    warnings.warn(f"{old} is deprecated; use ppoison_ext.defenses.build_defense", DeprecationWarning, stacklevel=3)


def _build_direct(name, args, *, model, proxy, logger, device) -> Defense:
    if name not in _BUILDERS:
        raise ValueError(f"unknown defense {name!r}; known: {list(_BUILDERS)}")
    spec = DefenseSpec.parse(name, args)
    kw = {k: v for k, v in spec.args.items() if k not in ("out_path", "log_prefix")}
    return _BUILDERS[name](model, kw, proxy=proxy, logger=logger, device=device)


def make_defense(name: str, args: Union[str, Mapping[str, Any], None] = None, *, model: nn.Module,
                 proxy: Optional[nn.Module] = None, logger: Optional[QueryLogger] = None,
                 device: Union[str, torch.device, None] = None) -> Defense:
    """Deprecated: :func:`build_defense` for the output-perturbation defenses."""
    _deprecated("make_defense")
    return _build_direct(name, args, model=model, proxy=proxy, logger=logger, device=device)


def defense_from_dir(victim_dir, name: str, args=None, *, device="cpu", logger: Optional[QueryLogger] = None,
                     proxy: Optional[nn.Module] = None) -> Defense:
    """Deprecated: ``build_defense(name, args, victim_dir=victim_dir, ...)``."""
    _deprecated("defense_from_dir")
    model, _ = load_model_dir(victim_dir, device=device)
    return _build_direct(name, args, model=model, proxy=proxy, logger=logger, device=device)


def make_wb_defense(name: str, args: Union[str, Mapping[str, Any], None], *, model: nn.Module,
                    logger: Optional[QueryLogger], device, victim_params: Mapping[str, Any], out_dir,
                    **options: Any) -> Defense:
    """Deprecated: ``build_defense(name, args, model=..., logger=..., device=..., out_dir=...,
    whitebox={"victim_params": ..., **options})``."""
    _deprecated("make_wb_defense")
    if name not in WB_DEFENSES:
        raise ValueError(f"unknown white-box defense {name!r}; known: {list(WB_DEFENSES)}")
    return build_defense(name, args, model=model, logger=logger, device=device, out_dir=out_dir,
                         whitebox={"victim_params": victim_params, **options})
