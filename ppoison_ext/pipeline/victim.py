"""Victim training: ``ppoison train-victim DS_NAME MODEL_ARCH`` (the reference's
``knockoff/victim/train.py``), and the MAD surrogate ("advproxy").

Trains ``get_net(MODEL_ARCH, family(DS_NAME), pretrained, num_classes=K)`` on the
dataset's training split (family train transform) and tests it on its test split (family
test transform) after every epoch, with the reference's defaults: 100 epochs, batch 64,
SGD(lr 0.1, momentum 0.5, weight decay 5e-4), StepLR(30, 0.1), cross-entropy (class-
weighted with ``--weighted-loss``). Writes into ``--out_path``:

* ``params.json`` — the arguments (the reference's keys ``dataset, model_arch, out_path,
  device_id, batch_size, epochs, lr, momentum, log_interval, resume, lr_step, lr_gamma,
  num_workers, train_subset, pretrained, weighted_loss``, plus ``num_classes``,
  ``created_on``, and this version's ``seed``, ``data_root``, ``test_subset``);
* ``checkpoint.pth.tar`` — best test accuracy so far (``weights_only``-loadable);
* ``train.log.tsv`` — two rows per epoch (see :mod:`ppoison_ext.training`);
* ``last.pth.tar`` — the latest state, for ``--resume auto``.

**Surrogate (MAD proxy) creation** is the same command with
``--epochs 1 --train_subset 10 --lr 0.0``: at lr 0 the weights stay at their
initialisation (weight decay is scaled by lr too), only BatchNorm running statistics
take one update from the 10-image batch. :func:`make_proxy` does exactly that.

**Adaptive Misinformation's defender** is the same command with ``--outlier-exposure DATASET``
(``--oe-lambda``, default 1): Outlier Exposure on DATASET's training split (its test split, when
it has one, enters the test loss), and, jointly, the misinformation model, written to
``--misinformation-out`` (default ``OUT_PATH/misinformation``: ``params.json`` +
``checkpoint.pth.tar``, a model folder for ``am``'s ``model_misinfo``); see
:func:`ppoison_ext.training.train_model_oe`. On MNIST use the embedded FashionMNIST images as
the outliers, never the attacker's query set (notMNIST)::

    ppoison train-victim MNIST lenet -o models/victim/MNIST-lenet-admis --outlier-exposure FashionMNIST \
        --epochs 20 --lr 0.1 --lr-step 10 --batch-size 128 --momentum 0.9

Runs are reproducible: ``--train_subset`` draws its subset with
``numpy.random.RandomState(--seed)``, and the model is initialised after
``seed_everything(--seed)``. ``--resume auto`` continues a killed run from ``last.pth.tar``.
Deliberate differences from the reference: ``docs/differences.md``.

Example::

    ppoison train-victim MNIST lenet -o models/victim/MNIST-lenet-train-nodefense -d 0
    ppoison train-victim MNIST lenet -o models/victim/MNIST-lenet-train-nodefense-scratch-advproxy \\
        --epochs 1 --train_subset 10 --lr 0.0
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from .. import distributed
from ..datasets import dataset_to_modelfamily, get_dataset, get_transform
from ..models import get_net
from ..training import seed_everything, train_model, train_model_oe
from ..modeldir import write_params
from . import settings
from .common import resolve_device
from .settings import CommonSettings, device_setting, setting

logger = logging.getLogger(__name__)

__all__ = ["train_victim", "make_proxy", "VictimSettings", "build_parser", "main"]

#: Default output root, relative to the working directory (the reference: ``<knockoffnets>/models``).
DEFAULT_OUT = "models"


def _device_and_id(device: Union[int, str, torch.device, None]) -> Tuple[torch.device, Any]:
    if isinstance(device, torch.device):
        return device, str(device)
    if device is None or isinstance(device, int) or (
            isinstance(device, str) and device.lstrip("-").isdigit()):
        idx = 0 if device is None else int(device)
        return resolve_device(idx), idx
    return torch.device(device), str(device)


def _first(dataset, n: Optional[int], what: str):
    if n is None:
        return dataset
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{what} must be a positive int or None, got {n!r}")
    return Subset(dataset, list(range(min(n, len(dataset)))))


def train_victim(
    dataset: str,
    arch: str,
    out_path: Union[str, Path] = DEFAULT_OUT,
    *,
    device: Union[int, str, torch.device, None] = 0,
    batch_size: int = 64,
    epochs: int = 100,
    lr: float = 0.1,
    momentum: float = 0.5,
    log_interval: int = 100,
    resume: Optional[str] = None,
    lr_step: int = 30,
    lr_gamma: float = 0.1,
    num_workers: int = 0,
    train_subset: Optional[int] = None,
    pretrained: Optional[str] = None,
    weighted_loss: bool = False,
    data_root: Optional[Union[str, Path]] = None,
    seed: Optional[int] = 42,
    test_subset: Optional[int] = None,
    progress: bool = True,
    outlier_exposure: Optional[str] = None,
    oe_lambda: float = 1.0,
    misinformation_out: Optional[Union[str, Path]] = None,
    misinformation: bool = True,
    misinformation_id_only: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Trains a victim model and writes ``params.json``, ``checkpoint.pth.tar`` and
    ``train.log.tsv`` into ``out_path`` (see the module docs).

    Args:
        dataset: dataset name (e.g. ``"MNIST"``); its family picks the model zoo and transforms.
        arch: architecture name of that family (e.g. ``"lenet"``).
        out_path: output folder.
        device: GPU index (-1 = CPU; falls back to the CPU without a GPU), or a device.
        batch_size, epochs, lr, momentum, lr_step, lr_gamma, log_interval: as the reference.
        resume: a checkpoint path to continue from, or ``"auto"`` (``out_path/last.pth.tar``
            if present).
        num_workers: DataLoader workers.
        train_subset: train on this many random training images (seeded with ``seed``).
        pretrained: None, ``"imagenet"`` (imagenet family, local weights) or a checkpoint path.
        weighted_loss: class-weighted cross-entropy (``w_c = min count / count_c``).
        data_root: dataset root (default ``$PPOISON_DATA``, then the embedded data).
        seed: seeds the RNGs and the subset draw; None leaves them unseeded (as the reference).
        test_subset: test on the first N test images only.
        progress: show progress bars.
        outlier_exposure: train the victim as Adaptive Misinformation's defender, with Outlier
            Exposure on this dataset's training split (same model family; e.g.
            ``"FashionMNIST"`` for MNIST), by :func:`~ppoison_ext.training.train_model_oe`.
        oe_lambda: the weight λ of the OE loss (default 1, the original's README).
        misinformation_out: the misinformation model's folder (default
            ``out_path/misinformation``); giving it without ``outlier_exposure`` trains the
            misinformation model on the in-distribution data only.
        misinformation: with ``outlier_exposure``, also train the misinformation model (the
            original always does); False trains the OE defender alone.
        misinformation_id_only: train the misinformation model on the in-distribution part of
            each batch only (ModelGuard's recipe; the original uses the outliers too).

    Returns:
        ``(model, summary)`` from :func:`~ppoison_ext.training.train_model`, with
        ``params`` (what was written to ``params.json``) added.
    """
    if not isinstance(dataset, str) or dataset not in dataset_to_modelfamily:
        raise ValueError(f"dataset must be one of {sorted(dataset_to_modelfamily)}, got {dataset!r}")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be an architecture name, got {arch!r}")
    dev, device_id = _device_and_id(device)
    family = dataset_to_modelfamily[dataset]
    if seed is not None:
        seed_everything(seed)

    trainset = get_dataset(dataset, train=True, transform=get_transform(family, "train"), root=data_root)
    testset = get_dataset(dataset, train=False, transform=get_transform(family, "test"), root=data_root)
    num_classes = len(trainset.classes)
    if train_subset is not None:
        if (isinstance(train_subset, bool) or not isinstance(train_subset, int)
                or not 1 <= train_subset <= len(trainset)):
            raise ValueError(f"train_subset must be an int in [1, {len(trainset)}], got {train_subset!r}")
        rng = np.random.RandomState(seed) if seed is not None else np.random
        idxs = rng.choice(np.arange(len(trainset)), size=train_subset, replace=False)
        trainset = Subset(trainset, idxs.tolist())
    testset = _first(testset, test_subset, "test_subset")
    logger.info("victim %s/%s: %d train, %d test images, K=%d, device %s", dataset, arch, len(trainset),
                len(testset), num_classes, dev)

    model = get_net(arch, family, pretrained, num_classes=num_classes).to(dev)
    out_path = Path(out_path)
    train_misinfo = misinformation_out is not None or (outlier_exposure is not None and misinformation)
    if outlier_exposure is not None or train_misinfo:
        model, summary, am_params = _train_defender(
            model, trainset, testset, out_path, dataset=dataset, arch=arch, family=family, pretrained=pretrained,
            num_classes=num_classes, data_root=data_root, outlier_exposure=outlier_exposure, oe_lambda=oe_lambda,
            misinformation_out=(out_path / "misinformation") if train_misinfo and misinformation_out is None
            else misinformation_out, misinformation_id_only=misinformation_id_only, weighted_loss=weighted_loss,
            device=dev, batch_size=batch_size, epochs=epochs, lr=lr, momentum=momentum, lr_step=lr_step,
            lr_gamma=lr_gamma, num_workers=num_workers, progress=progress, resume=resume,
            log_interval=log_interval, seed=seed)
    else:
        am_params = {}
        model, summary = train_model(
            model, trainset, out_path, testset=testset, batch_size=batch_size, epochs=epochs, lr=lr,
            momentum=momentum, weight_decay=5e-4, lr_step=lr_step, lr_gamma=lr_gamma,
            weighted_loss=weighted_loss, device=dev, num_workers=num_workers, arch=arch, progress=progress,
            resume=resume, log_interval=log_interval, num_classes=num_classes,
        )
    params = {
        "dataset": dataset, "model_arch": arch, "out_path": str(out_path), "device_id": device_id,
        "batch_size": batch_size, "epochs": epochs, "lr": lr, "momentum": momentum,
        "log_interval": log_interval,
        "resume": None if resume is None else str(resume), "lr_step": lr_step, "lr_gamma": lr_gamma,
        "num_workers": num_workers, "train_subset": train_subset, "pretrained": pretrained,
        "weighted_loss": bool(weighted_loss), "num_classes": num_classes, "seed": seed,
        "data_root": None if data_root is None else str(data_root), "test_subset": test_subset,
        **am_params,
    }
    if distributed.is_main_process():
        write_params(out_path / "params.json", params)
    summary["params"] = params
    return model, summary


def _train_defender(model, trainset, testset, out_path: Path, *, dataset, arch, family, pretrained, num_classes,
                    data_root, outlier_exposure, oe_lambda, misinformation_out, misinformation_id_only,
                    weighted_loss, device, resume, seed, **train_kw):
    """Adaptive Misinformation's defender (Outlier Exposure) and misinformation model."""
    if weighted_loss:
        raise ValueError("--weighted-loss is not supported with --outlier-exposure / --misinformation-out")
    if resume not in (None, "auto"):
        raise ValueError(f"with --outlier-exposure / --misinformation-out, --resume must be 'auto', got {resume!r}")
    outliers = outlier_test = None
    if outlier_exposure is not None:
        if not isinstance(outlier_exposure, str) or outlier_exposure not in dataset_to_modelfamily:
            raise ValueError(f"outlier_exposure must be one of {sorted(dataset_to_modelfamily)}, "
                             f"got {outlier_exposure!r}")
        if outlier_exposure == dataset:
            raise ValueError("outlier_exposure must be another dataset than the victim's")
        oe_family = dataset_to_modelfamily[outlier_exposure]
        if oe_family != family:
            raise ValueError(f"outlier_exposure {outlier_exposure!r} is of model family {oe_family!r}, the victim's "
                             f"dataset {dataset!r} of {family!r}: their images differ in shape")
        outliers = get_dataset(outlier_exposure, train=True, transform=get_transform(oe_family, "train"),
                               root=data_root)
        try:
            outlier_test = get_dataset(outlier_exposure, train=False, transform=get_transform(oe_family, "test"),
                                       root=data_root)
        except (FileNotFoundError, ValueError, TypeError):  # e.g. a set with one split
            outlier_test = None
        logger.info("outlier exposure: %s (%d train, %s test images), lambda %g", outlier_exposure, len(outliers),
                    "no" if outlier_test is None else len(outlier_test), oe_lambda)
    misinfo = None
    if misinformation_out is not None:
        misinfo = get_net(arch, family, pretrained, num_classes=num_classes).to(device)
    model, misinfo, summary = train_model_oe(
        model, trainset, out_path, outlier_set=outliers, oe_lambda=oe_lambda, misinfo_model=misinfo,
        misinfo_out=misinformation_out, misinfo_outliers=not misinformation_id_only, testset=testset,
        outlier_testset=outlier_test, device=device, arch=arch, num_classes=num_classes,
        resume=resume, weight_decay=5e-4, **train_kw)
    am_params = {"outlier_exposure": outlier_exposure, "oe_lambda": oe_lambda,
                 "misinformation_out": None if misinformation_out is None else str(misinformation_out),
                 "misinformation_id_only": bool(misinformation_id_only)}
    if misinfo is not None and distributed.is_main_process():
        write_params(Path(misinformation_out) / "params.json", {
            "dataset": dataset, "model_arch": arch, "num_classes": num_classes, "misinformation_of": str(out_path),
            "outlier_exposure": outlier_exposure if not misinformation_id_only else None,
            "loss": "-log(1 - p_label + 1e-7)", "seed": seed, **{k: train_kw[k] for k in (
                "batch_size", "epochs", "lr", "momentum", "lr_step", "lr_gamma")}})
    return model, summary, am_params


def make_proxy(dataset: str, arch: str, out_path: Union[str, Path],
               **kwargs: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """The reference's MAD surrogate recipe: :func:`train_victim` with ``epochs=1``,
    ``train_subset=10``, ``lr=0.0`` (weights stay at their seeded initialisation; BatchNorm
    statistics see one 10-image batch). Other keywords go to :func:`train_victim`."""
    for key in ("epochs", "train_subset", "lr"):
        if key in kwargs:
            raise TypeError(f"make_proxy fixes {key}; call train_victim to choose it")
    return train_victim(dataset, arch, out_path, epochs=1, train_subset=10, lr=0.0, **kwargs)


@dataclass(kw_only=True)
class VictimSettings(CommonSettings):
    """Train a victim model (knockoff/victim/train.py). A MAD surrogate is
    '--epochs 1 --train_subset 10 --lr 0.0'."""

    dataset: str = setting(metavar="DS_NAME", help="dataset name, e.g. MNIST")
    model_arch: str = setting(metavar="MODEL_ARCH", help="model name, e.g. lenet")
    out_path: str = setting("-o", "--out_path", default=DEFAULT_OUT, metavar="PATH",
                            help=f"output folder (default: ./{DEFAULT_OUT})")
    device_id: int = device_setting()
    batch_size: int = setting("-b", "--batch-size", default=64, metavar="N",
                              help="input batch size for training (default: 64)")
    epochs: int = setting("-e", "--epochs", default=100, metavar="N", help="number of epochs (default: 100)")
    lr: float = setting("--lr", default=0.1, metavar="LR", help="learning rate (default: 0.1)")
    momentum: float = setting("--momentum", default=0.5, metavar="M", help="SGD momentum (default: 0.5)")
    log_interval: int = setting("--log-interval", default=100, metavar="N",
                                help="batches between progress log lines (default: 100)")
    resume: Optional[str] = setting("--resume", default=None, metavar="PATH",
                                    help="checkpoint to continue from, or 'auto' (out_path/last.pth.tar if "
                                         "present)")
    lr_step: int = setting("--lr-step", default=30, metavar="N", help="StepLR step (default: 30)")
    lr_gamma: float = setting("--lr-gamma", default=0.1, metavar="N", help="StepLR decay (default: 0.1)")
    num_workers: int = setting("-w", "--num_workers", default=10, metavar="N",
                               help="DataLoader worker processes (default: 10)")
    train_subset: Optional[int] = setting("--train_subset", default=None, metavar="N",
                                          help="train on N random training images (seeded with --seed)")
    test_subset: Optional[int] = setting("--test_subset", default=None, metavar="N",
                                         help="test on the first N test images only")
    pretrained: Optional[str] = setting("--pretrained", default=None, help="'imagenet' or a checkpoint path")
    weighted_loss: bool = setting("--weighted-loss", default=False, help="class-weighted cross-entropy")
    outlier_exposure: Optional[str] = setting(
        "--outlier-exposure", default=None, metavar="DATASET", group="Adaptive Misinformation",
        help="train the victim as AM's defender with Outlier Exposure on DATASET's training split "
             "(same model family; e.g. FashionMNIST for MNIST) and, jointly, the misinformation model")
    oe_lambda: float = setting("--oe-lambda", default=1.0, metavar="L", group="Adaptive Misinformation",
                               help="weight of the Outlier Exposure loss (default: 1.0, the original's README)")
    misinformation_out: Optional[str] = setting(
        "--misinformation-out", default=None, metavar="DIR", group="Adaptive Misinformation",
        help="folder of the misinformation model (default: OUT_PATH/misinformation); given without "
             "--outlier-exposure, it is trained on the in-distribution data only")
    misinformation: bool = setting("--misinformation", default=True, group="Adaptive Misinformation",
                                   help="with --outlier-exposure, also train the misinformation model "
                                        "(default; --no-misinformation: the OE defender alone)")
    misinformation_id_only: bool = setting(
        "--misinformation-id-only", default=False, group="Adaptive Misinformation",
        help="train the misinformation model on the in-distribution images only (ModelGuard's recipe)")

    def run(self) -> Tuple[nn.Module, Dict[str, Any]]:
        """:func:`train_victim` with these settings."""
        return train_victim(
            self.dataset, self.model_arch, self.out_path, device=self.device_id, batch_size=self.batch_size,
            epochs=self.epochs, lr=self.lr, momentum=self.momentum, log_interval=self.log_interval,
            resume=self.resume, lr_step=self.lr_step, lr_gamma=self.lr_gamma, num_workers=self.num_workers,
            train_subset=self.train_subset, pretrained=self.pretrained, weighted_loss=self.weighted_loss,
            data_root=self.data_root, seed=self.seed, test_subset=self.test_subset,
            progress=not self.no_progress, outlier_exposure=self.outlier_exposure, oe_lambda=self.oe_lambda,
            misinformation_out=self.misinformation_out, misinformation=self.misinformation,
            misinformation_id_only=self.misinformation_id_only,
        )


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    return settings.build_parser(VictimSettings, prog=prog)


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    return settings.run_step(VictimSettings, argv, prog=prog)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
