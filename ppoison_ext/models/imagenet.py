"""ImageNet-family architectures: torchvision's classification models, built offline.

The models have what code written for Cadene's ``pretrainedmodels`` expects: the classifier
layer is reachable as ``model.last_linear`` (``model.last_conv`` for SqueezeNet), and assigning
``model.last_linear = nn.Linear(...)`` replaces the real head (``fc``, ``classifier[6]``, ...);
``model.input_size`` is (3, 224, 224), or (3, 299, 299) for Inception v3; and
:func:`remap_cadene_state_dict` renames Cadene state_dict keys to torchvision's.

Inception v3 and GoogLeNet are built without their auxiliary classifiers, so they return a
plain logits tensor in training mode too. Nothing here downloads: ImageNet weights are read
only from local files (:func:`find_imagenet_weights`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from ..checks import type_arg

logger = logging.getLogger(__name__)

__all__ = ["NAMES", "ALIASES", "CADENE_ONLY", "NO_LINEAR_HEAD", "PRETRAINED_DIR_ENV", "build",
           "set_num_classes", "head_name", "imagenet_weight_candidates", "find_imagenet_weights",
           "load_imagenet_weights_", "remap_cadene_state_dict"]

#: Every torchvision classification architecture, by its torchvision builder name.
NAMES: List[str] = sorted(torchvision.models.list_models(module=torchvision.models))

#: Cadene names that differ from torchvision's.
ALIASES: Dict[str, str] = {"inceptionv3": "inception_v3"}

#: Cadene ``pretrainedmodels`` / bagnet architectures, which torchvision does not have.
CADENE_ONLY = frozenset({
    "fbresnet152", "cafferesnet101", "bninception", "resnext101_32x4d", "resnext101_64x4d",
    "inceptionv4", "inceptionresnetv2", "nasnetalarge", "nasnetamobile", "dpn68", "dpn68b",
    "dpn92", "dpn98", "dpn131", "dpn107", "xception", "senet154", "se_resnet50", "se_resnet101",
    "se_resnet152", "se_resnext50_32x4d", "se_resnext101_32x4d", "pnasnet5large", "polynet",
    "bagnet9", "bagnet17", "bagnet33",
})

#: Architectures whose head is not a Linear layer (a 1×1 conv → ReLU → global average
#: pool), so :func:`~ppoison_ext.models.last_linear` raises for them and MAD's
#: closed-form Jacobian does not apply.
NO_LINEAR_HEAD = frozenset({"squeezenet1_0", "squeezenet1_1"})

#: Environment variable naming a folder of ``<name>.pth`` ImageNet weight files.
PRETRAINED_DIR_ENV = "PPOISON_PRETRAINED_DIR"

_INPUT_SIZES = {"inception_v3": (3, 299, 299)}
_AUX = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}
_DENSENET_OLD_KEY = re.compile(  # torchvision's DenseNet files say "norm.1" for "norm1"
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def canonical(name: str) -> str:
    """The torchvision name for a (possibly Cadene) architecture name."""
    return ALIASES.get(name, name)


class _HeadAlias:
    """Mixin that exposes the classifier head under a Cadene-style alias.

    ``model.<alias>`` reads the module at ``_head_path``; assigning ``model.<alias> = m``
    replaces that module. The alias is not a registered submodule, so the state_dict keeps
    torchvision's key names.
    """

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        if name == d.get("_head_alias"):
            return self.get_submodule(d["_head_path"])  # type: ignore[attr-defined]
        return super().__getattr__(name)  # type: ignore[misc]

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if name == d.get("_head_alias"):
            type_arg(value, name, nn.Module, "an nn.Module")
            self.set_submodule(d["_head_path"], value)  # type: ignore[attr-defined]
            return
        super().__setattr__(name, value)


@functools.cache
def _aliased_class(cls: type) -> type:
    return type(cls.__name__, (_HeadAlias, cls), {"__module__": __name__, "__qualname__": cls.__name__})


def __getattr__(name: str) -> type:
    # Lets pickle find the aliased subclasses that `build` creates on demand.
    base = getattr(torchvision.models, name, None)
    if inspect.isclass(base) and issubclass(base, nn.Module):
        return _aliased_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _find_head(model: nn.Module, name: str) -> str:
    if name in NO_LINEAR_HEAD:
        return "classifier.1"
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    if not heads:
        raise RuntimeError(f"no 1000-way nn.Linear head found in torchvision's {name}")
    return heads[-1]


def build(name: str, **kwargs: Any) -> nn.Module:
    """A randomly initialised torchvision ``name`` with its 1000-way ImageNet head, ``last_linear``
    (or ``last_conv``) and ``input_size``, without auxiliary classifiers. ``kwargs`` go to the
    torchvision builder (not ``weights`` nor ``num_classes``: use :func:`set_num_classes`).
    """
    cname = canonical(name)
    if cname not in NAMES:
        raise ValueError(f"unknown imagenet-family architecture {name!r}")
    for bad in ("weights", "num_classes", "pretrained"):
        if bad in kwargs:
            raise TypeError(f"{bad}= is not accepted here; use get_net(pretrained=..., num_classes=...)")
    if cname in _AUX:
        kwargs.setdefault("init_weights", True)  # torchvision's init; silences its FutureWarning
    model = torchvision.models.get_model(cname, weights=None, **kwargs)
    if cname in _AUX:
        model.aux_logits = False
        for attr in _AUX[cname]:
            setattr(model, attr, None)
    model.__class__ = _aliased_class(type(model))
    model._head_path = _find_head(model, cname)
    model._head_alias = "last_conv" if cname in NO_LINEAR_HEAD else "last_linear"
    size = _INPUT_SIZES.get(cname, (3, 224, 224))
    if "image_size" in kwargs:  # VisionTransformer
        size = (3, int(kwargs["image_size"]), int(kwargs["image_size"]))
    elif "input_size" in kwargs:  # MaxVit
        size = (3, *(int(s) for s in kwargs["input_size"]))
    model.input_size = size
    return model


def head_name(model: nn.Module) -> str:
    """The module path of a :func:`build` model's classifier head (e.g. ``"fc"``)."""
    path = model.__dict__.get("_head_path")
    if path is None:
        raise ValueError(f"{type(model).__name__} was not built by ppoison_ext.models.imagenet")
    return path


def set_num_classes(model: nn.Module, num_classes: int) -> None:
    """Replace a :func:`build` model's head with a fresh ``nn.Linear(in, num_classes)``
    (PyTorch default init), or for SqueezeNet a fresh ``Conv2d(512, num_classes, 1)`` with
    torchvision's N(0, 0.01) init."""
    path = head_name(model)
    old = model.get_submodule(path)
    if isinstance(old, nn.Conv2d):
        new: nn.Module = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        nn.init.normal_(new.weight, 0.0, 0.01)
        nn.init.zeros_(new.bias)
    else:
        assert isinstance(old, nn.Linear)
        new = nn.Linear(old.in_features, num_classes)
    ref = next(old.parameters())
    model.set_submodule(path, new.to(device=ref.device, dtype=ref.dtype))
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes


def _pretrained_dir() -> Optional[Path]:
    value = os.environ.get(PRETRAINED_DIR_ENV)
    return Path(value).expanduser() if value else None


def imagenet_weight_candidates(name: str) -> List[Path]:
    """Where :func:`find_imagenet_weights` looks for ``name``'s weights, in order.

    1. ``$PPOISON_PRETRAINED_DIR/<name>.pth`` (also the Cadene alias, e.g. ``inceptionv3.pth``);
    2. torch hub's checkpoint cache, ``torch.hub.get_dir()/checkpoints/``, under each file
       name torchvision's weight enum gives (``resnet18-f37072fd.pth``, ...), V1 first.
       Files that need another image size (``*_swag`` end-to-end ViT/RegNet weights) are
       not considered.
    """
    cname = canonical(name)
    out: List[Path] = []
    pdir = _pretrained_dir()
    if pdir is not None:
        out += [pdir / f"{n}.pth" for n in dict.fromkeys((name, cname))]
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        enum = torchvision.models.get_model_weights(cname)
    except (ValueError, KeyError):
        enum = []
    for w in enum:
        if "SWAG_E2E" in w.name:
            continue
        out.append(hub / Path(urlparse(w.url).path).name)
    return list(dict.fromkeys(out))


def find_imagenet_weights(name: str) -> Path:
    """The first existing file among :func:`imagenet_weight_candidates`. Never downloads.

    Raises:
        FileNotFoundError: listing the paths tried and how to provide the file.
    """
    cands = imagenet_weight_candidates(name)
    for p in cands:
        if p.is_file():
            return p
    cname = canonical(name)
    pdir = _pretrained_dir()
    hint = f"${PRETRAINED_DIR_ENV} is not set" if pdir is None else f"${PRETRAINED_DIR_ENV}={pdir}"
    tried = ", ".join(str(p) for p in cands)
    raise FileNotFoundError(
        f"no local ImageNet weights for {name!r}; ppoison_ext never downloads. Tried: {tried} ({hint}). "
        f"Put torchvision's state_dict for {cname} at ${PRETRAINED_DIR_ENV}/{cname}.pth or in "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'} under torchvision's file name (on a machine with "
        f"network access, torchvision.models.get_model({cname!r}, weights='DEFAULT') leaves it in its hub "
        "cache)")


def _unwrap_state_dict(obj: Any, path: Path) -> Dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(obj)


def load_imagenet_weights_(model: nn.Module, name: str, path: Optional[os.PathLike] = None) -> Path:
    """Load ImageNet weights into a 1000-class :func:`build` model, in place.

    ``model`` is from ``build(name)``, before :func:`set_num_classes`; ``path`` defaults to
    :func:`find_imagenet_weights`. Returns the file used. Inception v3 and GoogLeNet get
    ``transform_input=True``, as torchvision sets for its ImageNet weights.

    Raises:
        FileNotFoundError: no local file (see :func:`find_imagenet_weights`).
        ValueError: the file is unreadable or does not fit the architecture.
    """
    cname = canonical(name)
    path = Path(path) if path is not None else find_imagenet_weights(name)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"cannot read ImageNet weights from {path}: {type(e).__name__}: {e}") from e
    sd = _unwrap_state_dict(obj, path)
    if cname.startswith("densenet"):
        sd = {(m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v for k, v in sd.items()}
    sd = remap_cadene_state_dict(sd, model)
    for prefix in _AUX.get(cname, ()):
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix + ".")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = str(e) if len(str(e)) <= 800 else str(e)[:800] + " ..."
        raise ValueError(f"ImageNet weights in {path} do not fit torchvision's {cname}: {detail}") from e
    if cname in _AUX:
        model.transform_input = True
    logger.info("loaded ImageNet weights for %s from %s", cname, path)
    return path


_CADENE_RENAMES: Tuple[Tuple[str, Tuple[Tuple[str, str], ...]], ...] = (
    ("AlexNet", (("_features.", "features."), ("linear0.", "classifier.1."), ("linear1.", "classifier.4."),
                 ("last_linear.", "classifier.6."))),
    ("VGG", (("_features.", "features."), ("linear0.", "classifier.0."), ("linear1.", "classifier.3."),
             ("last_linear.", "classifier.6."))),
    ("ResNet", (("last_linear.", "fc."),)),
    ("Inception3", (("last_linear.", "fc."),)),
    ("DenseNet", (("last_linear.", "classifier."),)),
    ("SqueezeNet", (("last_conv.", "classifier.1."),)),
)


def remap_cadene_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module) -> Dict[str, Tensor]:
    """Rename Cadene ``pretrainedmodels`` keys to torchvision's for ``model``'s class.

    Cadene moved torchvision layers (ResNet ``fc`` → ``last_linear``; VGG ``features`` →
    ``_features`` and ``classifier[0/3/6]`` → ``linear0/linear1/last_linear``; AlexNet
    ``classifier[1/4/6]``; DenseNet ``classifier``; SqueezeNet ``classifier[1]`` →
    ``last_conv``), as in Knockoff Nets' imagenet-family checkpoints. Keys already valid for
    ``model``, and models of other classes, are left alone. Inception v3's ``AuxLogits.*``
    keys are dropped when the model has no aux head.
    """
    own = model.state_dict().keys()
    rules = next((r for cls_name, r in _CADENE_RENAMES
                  if isinstance(model, getattr(torchvision.models, cls_name))), ())
    out: Dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if k not in own:
            for old, new in rules:
                if k.startswith(old) and new + k[len(old):] in own:
                    k = new + k[len(old):]
                    break
        out[k] = v
    if isinstance(model, torchvision.models.Inception3) and getattr(model, "AuxLogits", None) is None:
        out = {k: v for k, v in out.items() if not k.startswith("AuxLogits.")}
    return out
