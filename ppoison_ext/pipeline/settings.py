"""Typed settings of the pipeline steps: one dataclass per step, shared by the command line, the
grid's TOML tables and Python calls. The dataclass is the step: :meth:`CommonSettings.run` is its
body and ``train_victim(...)`` etc. are ``Settings.of(...).run()``. Each field is declared with
:func:`setting` (flags, default, help); field names are the flags' ``dest`` and the keys of the
``params*.json`` record.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import (Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar,
                    Union)

import torch

from .. import distributed

__all__ = ["setting", "device_setting", "CommonSettings", "build_parser", "from_args", "from_dict",
           "check_values", "check_value", "group_fields", "run_step", "entry_points", "jsonable", "device_arg"]

S = TypeVar("S", bound="CommonSettings")

_FLAG = "ppoison_flag"  # the key of a field's metadata that holds its Flag


@dataclass(frozen=True)
class Flag:
    """How one settings field appears on the command line (see :func:`setting`)."""

    flags: Tuple[str, ...]
    help: str
    metavar: Optional[str]
    choices: Union[Sequence[Any], Callable[[], Sequence[Any]], None]
    parse: Optional[Callable[[str], Any]]
    group: Optional[str]

    def choice_list(self) -> Optional[List[Any]]:
        return None if self.choices is None else list(self.choices() if callable(self.choices) else self.choices)


def setting(*flags: str, default: Any = MISSING, help: str = "", metavar: Optional[str] = None,
            choices: Union[Sequence[Any], Callable[[], Sequence[Any]], None] = None,
            parse: Optional[Callable[[str], Any]] = None, group: Optional[str] = None) -> Any:
    """A dataclass field that is also a command-line argument: no ``flags`` makes a positional,
    a flag without ``default`` is required. ``choices`` may be a function (looked up lazily);
    ``parse`` converts the string (default: the annotated type); ``bool`` fields are switches
    (``store_true``, or ``--x/--no-x`` when the default is True); ``group`` is a ``--help`` section.
    """
    return field(default=default, metadata={_FLAG: Flag(tuple(flags), help, metavar, choices, parse, group)})


def device_setting(help: str = "GPU index, -1 for CPU (default: 0; the CPU when there is no GPU)") -> Any:
    """The ``-d/--device_id`` flag of every step (default 0)."""
    return setting("-d", "--device_id", default=0, metavar="D", help=help)


#: keywords of the Python call form (:meth:`CommonSettings.of`) that name a setting differently
CALL_ALIASES = {"device": "device_id", "arch": "model_arch", "victim_dir": "victim_model_dir",
                "num_workers": "nworkers"}


def device_arg(text: str) -> Union[int, str]:
    """A ``-d`` value of the grid and the demo: a GPU index (-1: the CPU) as an int, else the device
    string (parsed by :func:`ppoison_ext.devices.as_device` where the step runs)."""
    return int(text) if text.strip().lstrip("-").isdigit() else text


@dataclass(kw_only=True)
class CommonSettings:
    """The settings every step has: ``--data-root``, ``--seed``, ``--no-progress``.
    Step settings subclass it and implement :meth:`run`, the step's body."""

    #: defaults of the Python call form that differ from the command line's
    call_defaults: ClassVar[Dict[str, Any]] = {}

    data_root: Optional[str] = setting("--data-root", default=None, metavar="DIR",
                                       help="dataset root (default: $PPOISON_DATA, then the embedded "
                                            "MNIST/notMNIST data)")
    seed: int = setting("--seed", default=42, metavar="N", help="random seed (default: 42)")
    no_progress: bool = setting("--no-progress", default=False, help="hide the progress bars")

    @classmethod
    def of(cls: Type[S], *args: Any, **kwargs: Any) -> S:
        """The settings of a Python call of the step: positionals fill the fields in order, keywords
        name fields, :data:`CALL_ALIASES` or ``progress``; :attr:`call_defaults` apply."""
        if len(args) == 1 and not kwargs and isinstance(args[0], cls):
            return args[0]
        names = [f.name for f in fields(cls)]
        own = [f.name for f in fields(cls) if f.name not in _COMMON]
        if len(args) > len(own):
            raise TypeError(f"{cls.__name__}.of() takes at most {len(own)} positional arguments, got {len(args)}")
        given = dict(zip(own, args))
        for key, value in kwargs.items():
            if key == "progress":
                key, value = "no_progress", not value
            elif key not in names:
                key = CALL_ALIASES.get(key, key)
            if key in given:
                raise TypeError(f"{cls.__name__}.of() got multiple values for {key!r}")
            given[key] = value
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TypeError(f"{cls.__name__}.of() got unexpected keywords {unknown}")
        return cls(**{**cls.call_defaults, **given})

    def run(self) -> Any:
        """Runs the step with these settings; returns what the step returns."""
        raise NotImplementedError(f"{type(self).__name__} does not define run()")

    def params(self) -> Dict[str, Any]:
        """The ``params*.json`` record: every setting but ``no_progress``, in command-line order."""
        return {f.name: jsonable(getattr(self, f.name)) for f in _ordered(type(self)) if f.name != "no_progress"}


def jsonable(value: Any) -> Any:
    """``value`` as a JSON value of a params record (paths, devices and non-finite floats as strings)."""
    if isinstance(value, (Path, torch.device)) or (isinstance(value, float) and not math.isfinite(value)):
        return str(value)
    return value


def _ordered(cls: type) -> List[dataclasses.Field]:
    """The fields of ``cls`` with the common ones last (dataclass inheritance puts them first)."""
    own = [f for f in fields(cls) if f.name not in _COMMON]
    return own + [f for f in fields(cls) if f.name in _COMMON]


_COMMON = {f.name for f in fields(CommonSettings)}


def _strip_optional(tp: Any) -> Tuple[Any, bool]:
    """(``X``, True) for ``Optional[X]``, else (``tp``, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Union and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return tp, False


def build_parser(cls: type, *, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """An argparse parser with one argument per field of ``cls`` (the common flags last), described
    by the class docstring."""
    parser = argparse.ArgumentParser(prog=prog, description=_doc(cls))
    hints = typing.get_type_hints(cls)
    groups: Dict[str, Any] = {}
    for f in _ordered(cls):
        flag = f.metadata.get(_FLAG)
        if flag is None:
            raise TypeError(f"settings field {f.name!r} is not declared with setting()")
        target = parser
        if flag.group:
            if flag.group not in groups:
                groups[flag.group] = parser.add_argument_group(flag.group)
            target = groups[flag.group]
        kw: Dict[str, Any] = {"help": flag.help}
        if flag.metavar is not None:
            kw["metavar"] = flag.metavar
        choices = flag.choice_list()
        if choices is not None:
            kw["choices"] = choices
        tp, _ = _strip_optional(hints[f.name])
        has_default = f.default is not MISSING
        if tp is bool and flag.parse is None:
            if not flag.flags:
                raise TypeError(f"settings field {f.name!r}: a bool must be a flag, not a positional")
            kw.pop("metavar", None)
            unset = f.default is None  # Optional[bool]: --x / --no-x, or neither (None)
            kw["action"] = argparse.BooleanOptionalAction if f.default is True or unset else "store_true"
            kw["default"] = None if unset else (bool(f.default) if has_default else False)
        else:
            kw["type"] = flag.parse or (tp if tp in (int, float, str) else str)
            if has_default:
                kw["default"] = f.default
        if flag.flags:
            kw["dest"] = f.name
            if not has_default:
                kw["required"] = True
            target.add_argument(*flag.flags, **kw)
        else:
            if has_default:
                kw["nargs"] = "?"
            target.add_argument(f.name, **kw)
    return parser


def _doc(cls: type) -> Optional[str]:
    doc = cls.__doc__ or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclass writes when there is no docstring
        return None
    return " ".join(doc.strip().split("\n\n")[0].split()) or None


def from_args(cls: Type[S], args: argparse.Namespace) -> S:
    """The settings dataclass from a namespace parsed by :func:`build_parser` ``(cls)``."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def _type_ok(value: Any, tp: Any) -> bool:
    inner, optional = _strip_optional(tp)
    if value is None:
        return optional
    if typing.get_origin(inner) is Union:
        return any(_type_ok(value, a) for a in typing.get_args(inner))
    if isinstance(value, bool) and inner is not bool:
        return False
    return isinstance(value, (int, float) if inner is float else inner)


def _type_name(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    return f"{name} or None" if optional else name


def group_fields(cls: type, group: str) -> List[str]:
    """The names of the fields of ``cls`` listed under the ``--help`` section ``group``."""
    return [f.name for f in fields(cls) if f.metadata.get(_FLAG) is not None and f.metadata[_FLAG].group == group]


def check_value(cls: type, name: str, value: Any, where: str, *, key: Optional[str] = None) -> Any:
    """Checks ``value`` against the field ``name`` of the settings dataclass ``cls`` (type and
    choices); returns it, or raises ValueError naming ``key`` (default ``name``) and ``where``."""
    key = key or name
    by_name = {f.name: f for f in fields(cls)}
    if name not in by_name:
        raise ValueError(f"{where}: unknown key {key!r}")
    tp = typing.get_type_hints(cls)[name]
    if not _type_ok(value, tp):
        raise ValueError(f"{where}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    flag = by_name[name].metadata.get(_FLAG)
    choices = flag.choice_list() if flag is not None else None
    if choices is not None and value is not None and value not in choices:
        raise ValueError(f"{where}: {key} must be one of {choices}, got {value!r}")
    return value


def check_keys(mapping: Any, names: List[str], where: str) -> None:
    """Refuses a ``mapping`` that is not a table or has keys outside ``names``."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a table, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; accepted: {sorted(names)}")


def check_values(cls: type, mapping: Mapping[str, Any], where: str) -> Dict[str, Any]:
    """Checks every entry of ``mapping`` with :func:`check_value`; unknown keys are an error."""
    check_keys(mapping, [f.name for f in _ordered(cls)], where)
    return {k: check_value(cls, k, v, where) for k, v in mapping.items()}


def from_dict(cls: Type[S], mapping: Mapping[str, Any], where: str) -> S:
    """The settings dataclass ``cls`` from a mapping (e.g. a TOML table), checked by
    :func:`check_values`; a missing required setting is a ValueError too."""
    values = check_values(cls, mapping, where)
    missing = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
               and f.name not in values]
    if missing:
        raise ValueError(f"{where}: missing required keys {missing}")
    return cls(**values)


def run_step(cls: Type[CommonSettings], argv: Optional[List[str]] = None, *,
             prog: Optional[str] = None) -> int:
    """The ``main(argv)`` of a step: parses ``argv`` into ``cls`` and runs it. Bad input (ValueError,
    TypeError, FileNotFoundError, TimeoutError) is logged and gives exit status 2."""
    settings = from_args(cls, build_parser(cls, prog=prog).parse_args(argv))
    distributed.setup_logging()
    try:
        settings.run()
    except (ValueError, TypeError, FileNotFoundError, TimeoutError) as err:
        logging.getLogger(cls.__module__).error("%s", err)
        return 2
    finally:
        distributed.cleanup()
    return 0


def entry_points(cls: Type[CommonSettings]) -> Tuple[Callable[..., argparse.ArgumentParser], Callable[..., int]]:
    """A step module's ``build_parser(prog=None)`` and ``main(argv=None, *, prog=None)``."""

    def build(prog: Optional[str] = None) -> argparse.ArgumentParser:
        return build_parser(cls, prog=prog)

    def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
        return run_step(cls, argv, prog=prog)

    return build, main
