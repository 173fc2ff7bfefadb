"""Model folders: ``params.json`` plus a checkpoint, and building the model they describe.

* ``params.json``: the training arguments; a model folder needs ``model_arch``,
  ``num_classes`` and a dataset name under ``queryset``, ``testdataset`` or ``dataset`` (the
  first one present names the dataset).
* a checkpoint of :data:`ppoison_ext.checkpoint.CHECKPOINT_NAMES` (:mod:`ppoison_ext.checkpoint`).
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from torch import nn

from .checkpoint import CHECKPOINT_NAMES, load_checkpoint
from .datasets import dataset_to_modelfamily
from .devices import DeviceLike, as_device
from .fileio import PathLike, atomic_write_json
from .models import get_net
from .models.imagenet import remap_cadene_state_dict

logger = logging.getLogger(__name__)

__all__ = ["read_params", "write_params", "dataset_name", "modelfamily_for_dataset", "load_model_dir",
           "DATASET_KEYS"]

#: Keys of ``params.json`` that name a dataset, in the order they are looked up.
DATASET_KEYS: Tuple[str, ...] = ("queryset", "testdataset", "dataset")

#: The package's own families, used for names that ``dataset_to_modelfamily`` does not know.
_FALLBACK_FAMILIES = dict(dataset_to_modelfamily)


def modelfamily_for_dataset(dataset: str) -> str:
    """The model family (``mnist``/``cifar``/``imagenet``) of a dataset name.

    Uses :data:`ppoison_ext.datasets.dataset_to_modelfamily` (a mapping or a callable); a name
    it does not know falls back to the package's own table (MNIST-like → ``mnist``; CIFAR10/100,
    SVHN, TinyImageNet200 → ``cifar``), and anything else to ``imagenet``.
    """
    family = None
    if isinstance(dataset_to_modelfamily, Mapping):
        family = dataset_to_modelfamily.get(dataset)
    elif callable(dataset_to_modelfamily):
        try:
            family = dataset_to_modelfamily(dataset)
        except (KeyError, ValueError):
            family = None
    return family if family is not None else _FALLBACK_FAMILIES.get(dataset, "imagenet")


def dataset_name(params: Mapping[str, Any]) -> Optional[str]:
    """The dataset a ``params.json`` names: the first non-empty of :data:`DATASET_KEYS`."""
    return next((params[k] for k in DATASET_KEYS if isinstance(params.get(k), str) and params[k]), None)


def read_params(model_dir: PathLike, filename: str = "params.json") -> Dict[str, Any]:
    """Read and validate a model folder's ``params.json``.

    ``model_dir`` may also be the JSON file itself. Requires ``model_arch`` (non-empty str),
    ``num_classes`` (int ≥ 1) and a dataset name (a str) under one of :data:`DATASET_KEYS`
    (null values are ignored); other keys are returned unchecked. Raises FileNotFoundError for a
    missing file, ValueError (naming the file and key) for anything malformed.
    """
    path = Path(model_dir)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} does not exist")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(params).__name__}")

    arch = params.get("model_arch")
    if "model_arch" not in params:
        raise ValueError(f"{path} has no 'model_arch' key (the architecture name, e.g. \"vgg16\")")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"{path}: 'model_arch' must be a non-empty string, got {arch!r}")
    k = params.get("num_classes")
    if "num_classes" not in params:
        raise ValueError(f"{path} has no 'num_classes' key")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{path}: 'num_classes' must be a positive integer, got {k!r}")
    for key in DATASET_KEYS:
        value = params.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{path}: {key!r} must be a dataset name (a non-empty string), got {value!r}")
    if dataset_name(params) is None:
        raise ValueError(f"{path} has no dataset key (one of {list(DATASET_KEYS)} naming a dataset)")
    return params


def load_model_dir(model_dir: PathLike, *, device: DeviceLike = "cpu",
                   checkpoint_names: Sequence[str] = CHECKPOINT_NAMES, modelfamily: Optional[str] = None,
                   strict: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None,
                   train: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a model folder's architecture and load its weights (nothing is downloaded): the one
    way the package loads a model folder.

    Reads ``params.json`` (:func:`read_params`), builds
    ``get_net(params['model_arch'], family, num_classes=params['num_classes'], **model_kwargs)``
    with the family of the params' dataset (or ``modelfamily``), and loads the first existing
    file of ``checkpoint_names`` with :func:`load_checkpoint` (``strict`` passed on).
    Returns ``(model, params)``; the model is on ``device`` (None: the CPU), in eval mode unless
    ``train``. Raises FileNotFoundError (no folder, params file or checkpoint) or ValueError.
    """
    device = as_device(device, default="cpu")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    params = read_params(model_dir)
    if modelfamily is None:
        modelfamily = modelfamily_for_dataset(dataset_name(params))
    ckpt_path = next((model_dir / n for n in checkpoint_names if (model_dir / n).is_file()), None)
    if ckpt_path is None:
        raise FileNotFoundError(f"no checkpoint in {model_dir}: tried {list(checkpoint_names)}")
    model = get_net(params["model_arch"], modelfamily, num_classes=params["num_classes"],
                    **dict(model_kwargs or {}))
    remap = remap_cadene_state_dict if modelfamily == "imagenet" else None
    ckpt = load_checkpoint(ckpt_path, model, map_location=device, strict=strict, remap=remap)
    model.to(device).train(train)
    logger.info("loaded %s (%s, %s family, K=%d) from %s: epoch %s, best_acc %s", params["model_arch"],
                model_dir, modelfamily, params["num_classes"], ckpt_path.name, ckpt.get("epoch"),
                ckpt.get("best_acc"))
    return model, params


def write_params(path: PathLike, values: Dict[str, Any]) -> Path:
    """JSON of a run's arguments plus ``created_on`` (atomic)."""
    out = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    out["created_on"] = str(datetime.datetime.now())
    return atomic_write_json(path, out)
