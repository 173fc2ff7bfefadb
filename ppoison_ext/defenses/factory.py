"""The one way to build a defense: :func:`build_defense` takes a registered name
(:data:`DEFENSE_NAMES`; each defense class registers its names and ``defense_args`` keys with
:func:`~ppoison_ext.defenses.base.register`) and its arguments as a ``"key:value,..."`` string,
a mapping or keywords, or a :class:`DefenseSpec` parsed before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Union

from torch import nn

from ..checks import type_arg
from ..devices import DeviceLike, as_device
from ..modeldir import load_model_dir
from .base import COMMON_KEYS, REGISTRY, Defense, boolean, build_registered
from .querylog import QueryLogger
from .whitebox import WB_DEFENSES

__all__ = ["build_defense", "DefenseSpec", "parse_defense_args", "DEFENSE_NAMES", "DEFENSE_KEYS",
           "WB_DEFENSES"]

#: name -> {key: parser} of every registered defense
DEFENSE_KEYS: Dict[str, Dict[str, Callable[[str], Any]]] = {name: e.keys for name, e in REGISTRY.items()}
DEFENSE_NAMES = tuple(REGISTRY)


def _coerce(key: str, raw: str, kind) -> Any:
    try:
        return kind(raw)
    except (ValueError, TypeError) as err:
        what = {float: "a number", int: "an integer", boolean: "a boolean (True/False/true/false/1/0)"}
        raise ValueError(f"defense_args: {key}:{raw!r} is not {what.get(kind, 'a value')}") from err


def parse_defense_args(args: Union[str, Mapping[str, Any], None], defense: Optional[str] = None) -> Dict[str, Any]:
    """Parses ``"epsilon:0.5,objmax:True,ydist:l1,model_adv_proxy:DIR"`` (or validates a
    mapping the same way) into a dict, for the keys of ``defense`` (None: of any defense).

    Booleans are ``True/False/true/false/1/0``; a value may contain ``:`` (split on the first
    one); whitespace around keys and values is stripped. ValueError for an empty, repeated or
    unknown key (naming the accepted ones), or a value of the wrong type."""
    if defense is not None and defense not in REGISTRY:
        raise ValueError(f"unknown defense {defense!r}; known: {list(REGISTRY)}")
    allowed = DEFENSE_KEYS[defense] if defense else {k: v for d in DEFENSE_KEYS.values() for k, v in d.items()}
    if args is None:
        return {}
    if isinstance(args, Mapping):
        items = [(str(k), v) for k, v in args.items()]
    elif isinstance(args, str):
        entries = [entry.strip() for entry in args.split(",") if entry.strip()]
        for entry in entries:
            if ":" not in entry:
                raise ValueError(f"defense_args: entry {entry!r} is not of the form key:value")
        items = [(key.strip(), value.strip()) for key, value in (entry.split(":", 1) for entry in entries)]
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
    """A defense name with its validated arguments (parse once, build as often as needed),
    e.g. ``DefenseSpec.parse("mad", "epsilon:0.5,objmax:True", ydist="l1")``."""

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
        type_arg(name, "defense", str, "a name (str) or a DefenseSpec")
        parsed = parse_defense_args(args, name)
        for key, value in parse_defense_args(kwargs, name).items():
            if key in parsed:
                raise ValueError(f"defense argument {key!r} given twice (in args and as a keyword)")
            parsed[key] = value
        return cls(name, parsed)

    def __str__(self) -> str:
        return ",".join(f"{k}:{v}" for k, v in self.args.items())


def build_defense(defense: Union[str, DefenseSpec], args: Union[str, Mapping[str, Any], None] = None, *,
                  model: Optional[nn.Module] = None, victim_dir=None, proxy: Optional[nn.Module] = None,
                  logger: Optional[QueryLogger] = None, device: DeviceLike = None,
                  out_dir=None, whitebox: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> Defense:
    """Builds a defense from its name and arguments.

    Args:
        args: a ``"key:value,..."`` string or a mapping; ``kwargs`` are merged in (a key given
            twice is an error). ``out_path`` and ``log_prefix`` are accepted and ignored.
        model: the victim; or ``victim_dir``, a model folder to load it from (onto ``device``).
        proxy: MAD's proxy or GRAD²'s surrogate (else ``model_adv_proxy:DIR`` in the arguments).
        device: where the defense runs (default: the victim's device).
        out_dir, whitebox: the ``*_wb`` variants' folder for ``online.log.tsv`` and settings
            (see :meth:`~ppoison_ext.defenses.WhiteboxDefense.from_args`).

    Example:
        >>> d = build_defense("mad", "epsilon:0.5,objmax:True,ydist:l1", model=victim, proxy=proxy)
        >>> d = build_defense("reverse_sigmoid", beta=0.7, gamma=0.4, model=victim)
    """
    spec = DefenseSpec.parse(defense, args, **kwargs)
    device = None if device is None else as_device(device)
    options = dict(whitebox or {})
    if options and spec.name not in WB_DEFENSES:
        raise ValueError(f"whitebox= settings are for the *_wb defenses, not {spec.name!r}")
    if model is None:
        if victim_dir is None:
            raise ValueError("build_defense needs the victim: model= or victim_dir=")
        model, params = load_model_dir(victim_dir, device=device if device is not None else "cpu")
        options.setdefault("victim_params", params)
    elif victim_dir is not None:
        raise ValueError("give the victim either as model= or as victim_dir=, not both")
    type_arg(model, "model", nn.Module, "a torch.nn.Module")
    kw = {k: v for k, v in spec.args.items() if k not in COMMON_KEYS}
    bb = build_registered(spec.name, model, kw, proxy=proxy, logger=logger, device=device, out_dir=out_dir,
                          whitebox=options)
    return bb.to(device) if device is not None else bb
