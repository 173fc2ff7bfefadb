"""Checkpoint files: atomic writes, ``weights_only`` loads, readable errors.

A checkpoint (``checkpoint{suffix}.pth.tar`` / ``model_best.pth.tar``) is a ``torch.save`` dict
with ``epoch``, ``arch`` (the architecture *name*), ``state_dict``, ``best_acc``, ``optimizer``,
``created_on`` and ``num_classes``: only tensors and primitives, so it loads with
``torch.load(weights_only=True)``. Files that pickle the model class convert once with
:func:`convert_reference_checkpoint`. Building a model from a folder is :mod:`ppoison_ext.modeldir`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import operator
import pickle
import re
import types
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .fileio import PathLike, atomic_write

logger = logging.getLogger(__name__)

__all__ = ["save_checkpoint", "load_checkpoint", "read_state_dict", "convert_reference_checkpoint",
           "CHECKPOINT_NAMES"]

#: Checkpoint files of a model folder, in the order a loader tries them.
CHECKPOINT_NAMES: Tuple[str, ...] = ("model_best.pth.tar", "checkpoint.pth.tar")

_RESERVED_KEYS = ("epoch", "arch", "state_dict", "best_acc", "optimizer", "created_on", "num_classes")


def _check_safe(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` loads with ``torch.load(weights_only=True)``."""
    if value is None or isinstance(value, (Tensor, bool, int, float, str, bytes,
                                           torch.dtype, torch.device, torch.Size)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_safe(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_safe(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
        "torch.load(weights_only=True) cannot read; store tensors, numbers, strings, lists or dicts "
        "(e.g. float(x), torch.from_numpy(a))")


def _classifier_weight(sd: Mapping[str, Any]) -> Optional[str]:
    """The state-dict key of the classifier's weight: the last 2-D ``*.weight`` (a Linear
    layer), else the last 4-D one (a 1×1-conv head such as SqueezeNet's)."""
    for ndim in (2, 4):
        keys = [k for k, v in sd.items()
                if k.endswith("weight") and isinstance(v, Tensor) and v.dim() == ndim]
        if keys:
            return keys[-1]
    return None


def save_checkpoint(path: PathLike, model: nn.Module, *, arch: str, epoch: int, best_acc: float,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[Mapping[str, Any]] = None, num_classes: Optional[int] = None) -> Path:
    """Atomically write a checkpoint (see the module docs) plus the ``extra`` keys;
    ``num_classes`` defaults to the output size of the model's classifier weight. The ``extra``
    values must be tensors or primitives, under keys other than the standard ones."""
    if not isinstance(arch, str):
        raise TypeError(
            f"arch must be the architecture name (a str such as 'vgg16'), got {type(arch).__name__}; "
            "pickling the class would make the checkpoint unreadable with weights_only=True")
    state_dict = model.state_dict()
    if num_classes is None:
        head = _classifier_weight(state_dict)
        num_classes = state_dict[head].shape[0] if head is not None else None
    ckpt: Dict[str, Any] = {
        "epoch": operator.index(epoch),
        "arch": arch,
        "state_dict": state_dict,
        "best_acc": float(best_acc),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "created_on": str(_dt.datetime.now()),
        "num_classes": operator.index(num_classes) if num_classes is not None else None,
    }
    _check_safe(ckpt["optimizer"], "optimizer state_dict")
    for key, value in (extra or {}).items():
        if key in _RESERVED_KEYS:
            raise ValueError(
                f"extra key {key!r} collides with a standard checkpoint key {list(_RESERVED_KEYS)}")
        _check_safe(value, f"extra[{key!r}]")
        ckpt[key] = value
    return atomic_write(path, lambda f: torch.save(ckpt, f))


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _torch_load(path: Path, map_location: Any) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory, not a checkpoint file (use load_model_dir for a model folder)")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint file {path} is empty (0 bytes), e.g. from an interrupted write")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = _GLOBAL_RE.search(str(e))
        if m is not None:
            raise ValueError(
                f"{path} pickles the Python object {m.group(1)}, which torch.load(weights_only=True) "
                "refuses to load. Checkpoints written by the reference knockoffnets / prediction-poisoning "
                "code do this ('arch': model.__class__). If you trust the file, convert it once with "
                "ppoison_ext.checkpoint.convert_reference_checkpoint(src, dst) and load the converted file."
            ) from e
        raise _corrupt(path, size, e) from e
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        if isinstance(e, RuntimeError) and "deserialize object on" in str(e):  # a CUDA file, no CUDA here
            raise
        raise _corrupt(path, size, e) from e


def _corrupt(path: Path, size: int, e: BaseException) -> ValueError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ValueError(
        f"checkpoint file {path} ({size} bytes) is truncated or corrupt, or not a torch.save file "
        f"({type(e).__name__}: {detail})")


def _as_checkpoint(obj: Any, path: Path) -> Dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" in obj:
        sd = obj["state_dict"]
        if not isinstance(sd, Mapping) or not all(isinstance(k, str) for k in sd):
            raise ValueError(
                f"{path}: 'state_dict' is a {type(sd).__name__}, not a mapping of names to tensors")
        return dict(obj)
    if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return {"state_dict": obj}  # a bare state_dict
    keys = sorted(map(str, obj))
    more = " ..." if len(keys) > 10 else ""
    raise ValueError(f"{path} has no 'state_dict' and is not a state_dict itself (keys: {keys[:10]}{more})")


def _strip_module_prefix(sd: Mapping[str, Any]) -> Dict[str, Any]:
    if sd and all(k.startswith("module.") for k in sd):  # saved from nn.DataParallel
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


StateDictRemap = Callable[[Mapping[str, Tensor], nn.Module], Mapping[str, Tensor]]


def _fit_state_dict(sd: Mapping[str, Any], model: nn.Module, path: Path, strict: bool,
                    arch: Any = None, remap: Optional[StateDictRemap] = None) -> Dict[str, Any]:
    sd = _strip_module_prefix(sd)
    if remap is not None:
        sd = dict(remap(sd, model))
    own = model.state_dict()
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in sd.items()
        if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in sd] if strict else []
    unexpected = [k for k in sd if k not in own] if strict else []
    if not (mismatched or missing or unexpected):
        return sd
    parts = []
    head_w = _classifier_weight(own)
    for k, src, dst in mismatched:
        if k == head_w and len(src) >= 1 and len(dst) >= 1 and src[0] != dst[0]:
            parts.append(f"checkpoint has K={src[0]} classes, model has {dst[0]}")
            break
    if mismatched:
        shown = "; ".join(f"{k}: checkpoint {list(s)} vs model {list(d)}" for k, s, d in mismatched[:5])
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        parts.append(f"{len(mismatched)} tensors differ in shape: {shown}{more}")
    if missing or unexpected:
        parts.append(f"{len(missing)} model tensors missing from the checkpoint {missing[:5]}, "
                     f"{len(unexpected)} checkpoint tensors unknown to the model {unexpected[:5]} "
                     "(strict=False loads the matching ones)")
    saved = f" (saved arch {arch!r})" if isinstance(arch, str) else ""
    raise ValueError(f"{path}{saved} does not fit {type(model).__name__}: " + "; ".join(parts))


def load_checkpoint(path: PathLike, model: Optional[nn.Module] = None, *,
                    map_location: Any = "cpu", strict: bool = True,
                    remap: Optional[StateDictRemap] = None) -> Dict[str, Any]:
    """The checkpoint dict at ``path`` (``weights_only=True``), loaded into ``model`` if given.

    A bare state_dict file counts as ``{"state_dict": ...}``; a ``module.`` prefix is stripped,
    and ``remap(state_dict, model)`` renames other keys first. FileNotFoundError for a missing
    file; ValueError naming the file and the problem: empty, corrupt, no state_dict, pickles a
    class (see :func:`convert_reference_checkpoint`), shapes that do not fit the model
    ("checkpoint has K=10 classes, model has 26"), with ``strict`` missing or unexpected keys.
    """
    path = Path(path)
    ckpt = _as_checkpoint(_torch_load(path, map_location), path)
    if model is not None:
        sd = _fit_state_dict(ckpt["state_dict"], model, path, strict, ckpt.get("arch"), remap)
        model.load_state_dict(sd, strict=strict)
        ckpt["state_dict"] = sd
    return ckpt


def read_state_dict(path: PathLike, map_location: Any = "cpu") -> Dict[str, Tensor]:
    """The state_dict stored in a checkpoint or bare state_dict file (``weights_only=True``;
    errors as :func:`load_checkpoint`), without a ``module.`` prefix."""
    path = Path(path)
    return _strip_module_prefix(_as_checkpoint(_torch_load(path, map_location), path)["state_dict"])


class _MissingClass:
    """Stands in for a class that cannot be imported while converting a checkpoint."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = (args, kwargs)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


_STUBS: Dict[Tuple[str, str], type] = {}


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            key = (module, name)
            if key not in _STUBS:
                _STUBS[key] = type(name, (_MissingClass,), {"__module__": module, "__qualname__": name})
            return _STUBS[key]


_LENIENT_PICKLE = types.ModuleType("_ppoison_lenient_pickle")
_LENIENT_PICKLE.Unpickler = _LenientUnpickler  # type: ignore[attr-defined]
_LENIENT_PICKLE.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()  # type: ignore[attr-defined]


def _to_safe(value: Any) -> Any:
    """``value`` with classes turned into their qualified names and numpy into torch/python
    (TypeError if some part of it cannot be made ``weights_only``-safe)."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, _MissingClass):
        raise TypeError(f"{type(value).__qualname__} cannot be imported")
    if type(value).__module__ == "numpy":
        return value.item() if getattr(value, "shape", None) == () else torch.from_numpy(value)
    if isinstance(value, dict):
        converted = ((k, _to_safe(v)) for k, v in value.items())
        return (OrderedDict if isinstance(value, OrderedDict) else dict)(converted)
    if isinstance(value, (list, tuple)):
        values = [_to_safe(v) for v in value]
        return type(value)(values) if isinstance(value, list) else tuple(values)
    _check_safe(value, "value")
    return value


def convert_reference_checkpoint(src: PathLike, dst: PathLike, *, arch: Optional[str] = None,
                                 num_classes: Optional[int] = None) -> Path:
    """Converts a checkpoint that pickles classes (e.g. ``'arch': model.__class__``) into a
    ``weights_only``-safe one, ``dst`` (written atomically, checked, returned).

    .. warning::
        This unpickles ``src`` with ``torch.load(weights_only=False)``, which can run arbitrary
        code embedded in the file: call it only on files you trust. Nothing else in ppoison_ext
        loads with ``weights_only=False``.

    Classes become their qualified names (``arch`` the given name if any), numpy values numbers
    or tensors; entries that cannot be made safe are dropped with a warning. ``num_classes``
    defaults to the rows of the last 2-D ``*.weight`` tensor. FileNotFoundError: no ``src``;
    ValueError: ``src`` is unreadable or has no state_dict.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint file {src} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Couldn't retrieve source code for container ..."
            obj = torch.load(src, map_location="cpu", weights_only=False, pickle_module=_LENIENT_PICKLE)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise _corrupt(src, src.stat().st_size, e) from e
    ckpt = _as_checkpoint(obj, src)
    out: Dict[str, Any] = {}
    for key, value in ckpt.items():
        if key == "state_dict":
            out[key] = OrderedDict((k, v) for k, v in value.items() if isinstance(v, Tensor))
            dropped = [k for k, v in value.items() if not isinstance(v, Tensor)]
            if dropped:
                logger.warning("convert_reference_checkpoint: dropped non-tensor state_dict entries %s",
                               dropped)
            continue
        try:
            out[key] = _to_safe(value)
        except TypeError:
            logger.warning("convert_reference_checkpoint: dropped %r (a %s)", key, type(value).__qualname__)
    original_arch = out.get("arch")
    if arch is not None:
        out["arch"] = arch
        if isinstance(original_arch, str) and original_arch != arch:
            out["reference_arch"] = original_arch
    if num_classes is None and "num_classes" not in out:
        heads = [v for k, v in out["state_dict"].items() if k.endswith("weight") and v.dim() == 2]
        num_classes = int(heads[-1].shape[0]) if heads else None
    if num_classes is not None:
        out["num_classes"] = int(num_classes)
    atomic_write(dst, lambda f: torch.save(out, f))
    torch.load(dst, map_location="cpu", weights_only=True)  # must be readable the safe way
    logger.info("converted %s -> %s (arch=%r)", src, dst, out.get("arch"))
    return dst
