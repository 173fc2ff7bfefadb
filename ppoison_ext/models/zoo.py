"""The model zoo: ``get_net(name, modelfamily, pretrained, num_classes)``, with Knockoff Nets'
names and families. Nothing is downloaded (see :func:`get_net`); checkpoint files are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..checkpoint import read_state_dict
from ..checks import int_arg
from . import cifar, imagenet, mnist

logger = logging.getLogger(__name__)

__all__ = ["MODEL_FAMILIES", "MODEL_NAMES", "DEFAULT_NUM_CLASSES", "INPUT_SIZES", "CopyReport", "get_net",
           "copy_weights_"]

MODEL_FAMILIES: Tuple[str, ...] = ("mnist", "cifar", "imagenet")

_BUILDERS: Dict[str, Dict[str, Any]] = {
    "mnist": {"lenet": mnist.lenet},
    "cifar": dict(cifar.BUILDERS),
}

#: Architecture names per family (cifar ``resnet`` and ``preresnet`` need a ``depth=`` keyword;
#: imagenet also accepts Cadene's ``inceptionv3``).
MODEL_NAMES: Dict[str, List[str]] = {
    "mnist": list(_BUILDERS["mnist"]),
    "cifar": list(_BUILDERS["cifar"]),
    "imagenet": list(imagenet.NAMES),
}

#: ``num_classes`` used when ``get_net`` is not given one.
DEFAULT_NUM_CLASSES: Dict[str, int] = {"mnist": 10, "cifar": 10, "imagenet": 1000}

#: Input size (C, H, W) per family; every model also carries it as ``model.input_size``.
INPUT_SIZES: Dict[str, Tuple[int, int, int]] = {"mnist": (1, 28, 28), "cifar": (3, 32, 32),
                                                 "imagenet": (3, 224, 224)}


@dataclass
class CopyReport:
    """What :func:`copy_weights_` did, by state_dict key."""

    copied: List[str] = field(default_factory=list)
    #: source keys the model does not have
    not_in_model: List[str] = field(default_factory=list)
    #: keys present in both with different shapes, as ``"key: source (..) != model (..)"``
    shape_mismatch: List[str] = field(default_factory=list)
    #: model keys the source does not provide (they keep their initialisation)
    not_in_source: List[str] = field(default_factory=list)

    @property
    def skipped(self) -> List[str]:
        """Source keys not copied (absent from the model, or of another shape)."""
        return self.not_in_model + [s.split(":", 1)[0] for s in self.shape_mismatch]

    def summary(self) -> str:
        n = len(self.copied) + len(self.not_in_model) + len(self.shape_mismatch)
        return (f"copied {len(self.copied)}/{n} source tensors; skipped {len(self.not_in_model)} not in the "
                f"model, {len(self.shape_mismatch)} with mismatched shapes; {len(self.not_in_source)} model "
                "tensors kept their init")


def copy_weights_(src_state_dict: Mapping[str, Tensor],
                  dst: Union[nn.Module, Mapping[str, Tensor]]) -> CopyReport:
    """Copy tensors by name where the shapes match, into ``dst`` (a model, or a state_dict
    written in place). Returns a :class:`CopyReport`; skipped names are also logged at INFO level.
    """
    dst_sd = dst.state_dict() if isinstance(dst, nn.Module) else dst
    report = CopyReport()
    with torch.no_grad():
        for name, src in src_state_dict.items():
            if not isinstance(src, Tensor):
                continue
            if name not in dst_sd:
                report.not_in_model.append(name)
                continue
            d = dst_sd[name]
            if d.shape != src.shape:
                report.shape_mismatch.append(f"{name}: source {tuple(src.shape)} != model {tuple(d.shape)}")
                continue
            d.copy_(src)
            report.copied.append(name)
    seen = set(src_state_dict)
    report.not_in_source = [k for k in dst_sd if k not in seen]
    logger.info("copy_weights_: %s", report.summary())
    for what, names in (("shape mismatch", report.shape_mismatch), ("not in model", report.not_in_model)):
        for n in names:
            logger.info("copy_weights_: skipped (%s) %s", what, n)
    return report


def _unknown_name(name: str, family: str) -> ValueError:
    extra = ""
    if family == "imagenet" and name in imagenet.CADENE_ONLY:
        extra = (f" ({name!r} is a Cadene pretrainedmodels / bagnet architecture; "
                 "ppoison_ext provides only torchvision's architectures)")
    else:
        for fam, names in MODEL_NAMES.items():
            if fam != family and name in names:
                extra = f" ({name!r} exists in the {fam!r} family)"
                break
    return ValueError(f"unknown {family}-family model {name!r}{extra}; known: {MODEL_NAMES[family]}")


def _build(name: str, family: str, num_classes: int, **kwargs: Any) -> nn.Module:
    if family == "imagenet":
        if imagenet.canonical(name) not in imagenet.NAMES:
            raise _unknown_name(name, family)
        model = imagenet.build(name, **kwargs)
        imagenet.set_num_classes(model, num_classes)
        return model
    builder = _BUILDERS[family].get(name)
    if builder is None:
        raise _unknown_name(name, family)
    if name in ("resnet", "preresnet") and "depth" not in kwargs:
        raise ValueError(f"cifar {name!r} needs a depth= keyword (e.g. depth=20, 6n+2)")
    model = builder(num_classes=num_classes, **kwargs)
    model.input_size = INPUT_SIZES[family]
    return model


def get_net(name: str, modelfamily: str, pretrained: Optional[Union[str, os.PathLike]] = None,
            num_classes: Optional[int] = None, **kwargs: Any) -> nn.Module:
    """Build architecture ``name`` of ``modelfamily``, optionally with weights.

    Families (:data:`MODEL_NAMES`): ``mnist`` (``lenet``), ``cifar`` (bearpaw CIFAR models;
    ``resnet18/34/50`` are CIFAR ResNets of depth 20/32/56) and ``imagenet`` (torchvision
    models, last Linear replaced by ``nn.Linear(in, num_classes)``, with a ``last_linear`` alias
    to it). Except for SqueezeNet (a 1×1-conv head), the logits are the direct output of the
    model's last ``nn.Linear`` (:func:`~ppoison_ext.models.last_linear`).

    Args:
        pretrained: ``None`` (also ``""`` or ``False``): random init with the architectures'
            init schemes (for the imagenet family too); ``"imagenet"`` (imagenet family only:
            ImageNet weights from a local file, never downloaded; the head is then replaced if
            ``num_classes != 1000``); or the path of a checkpoint / state_dict file, whose
            tensors are copied by name where shapes match (:func:`copy_weights_`).
        num_classes: K; defaults to :data:`DEFAULT_NUM_CLASSES` of the family.
        **kwargs: passed to the architecture's constructor (e.g. ``depth=20`` for the
            cifar ``resnet``/``preresnet``).

    Raises:
        ValueError: unknown family or name (the message lists the known ones), bad
            ``num_classes``, ``pretrained='imagenet'`` outside the imagenet family, or an
            unreadable ``pretrained`` file.
        FileNotFoundError: ``pretrained`` is a path that does not exist, or no local
            ImageNet weights were found (the message says where to put them).
    """
    family = modelfamily
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known families: {list(MODEL_FAMILIES)}")
    if num_classes is None:
        num_classes = DEFAULT_NUM_CLASSES[family]
    int_arg(num_classes, "num_classes")

    if pretrained is None or pretrained is False or (isinstance(pretrained, str) and pretrained == ""):
        return _build(name, family, num_classes, **kwargs)

    if isinstance(pretrained, str) and pretrained == "imagenet":
        if family != "imagenet":
            raise ValueError(f"pretrained='imagenet' is only available for the imagenet family, "
                         f"not {family!r}")
        if imagenet.canonical(name) not in imagenet.NAMES:
            raise _unknown_name(name, family)
        path = imagenet.find_imagenet_weights(name)
        model = imagenet.build(name, **kwargs)
        imagenet.load_imagenet_weights_(model, name, path)
        if num_classes != 1000:
            imagenet.set_num_classes(model, num_classes)
        return model

    if not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(f"pretrained must be None, 'imagenet' or a file path, "
                         f"got {type(pretrained).__name__}")
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained={str(pretrained)!r} is neither 'imagenet' nor an existing file")
    model = _build(name, family, num_classes, **kwargs)
    src = read_state_dict(path)
    if family == "imagenet":
        src = imagenet.remap_cadene_state_dict(src, model)
    report = copy_weights_(src, model)
    logger.info("get_net(%r, %r): weights from %s: %s", name, family, path, report.summary())
    return model
