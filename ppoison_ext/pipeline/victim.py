"""Victim training: ``ppoison train-victim DS_NAME MODEL_ARCH -o OUT_PATH``, and the MAD surrogate
(:func:`make_proxy`). Writes ``params.json``, ``checkpoint.pth.tar`` (best test accuracy),
``train.log.tsv`` and ``last.pth.tar`` (for ``--resume auto``). ``--outlier-exposure DATASET`` trains
Adaptive Misinformation's defender and its misinformation model
(:func:`ppoison_ext.training.train_model_oe`); on MNIST use FashionMNIST as the outliers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
from torch import nn
from torch.utils.data import Subset

from ..checks import int_arg
from .. import distributed
from ..datasets import dataset_to_modelfamily, get_dataset, get_transform
from ..devices import as_device
from ..models import get_net
from ..modeldir import write_params
from ..training import seed_everything, train_model, train_model_oe
from .common import check_dataset, first_n
from .settings import CommonSettings, device_setting, entry_points, group_fields, setting

logger = logging.getLogger(__name__)

__all__ = ["train_victim", "make_proxy", "VictimSettings", "build_parser", "main"]

#: the default output folder, relative to the working directory
DEFAULT_OUT = "models"
_AM = "Adaptive Misinformation"


def train_victim(*args: Any, **kwargs: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Trains a victim model: ``VictimSettings.of(*args, **kwargs).run()``."""
    return VictimSettings.of(*args, **kwargs).run()


def make_proxy(dataset: str, arch: str, out_path, **kwargs: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """MAD's surrogate: :func:`train_victim` with ``epochs=1``, ``train_subset=10``, ``lr=0.0`` (the
    weights stay at their seeded initialisation; BatchNorm statistics see one 10-image batch)."""
    for key in ("epochs", "train_subset", "lr"):
        if key in kwargs:
            raise TypeError(f"make_proxy fixes {key}; call train_victim to choose it")
    return train_victim(dataset, arch, out_path, epochs=1, train_subset=10, lr=0.0, **kwargs)


@dataclass(kw_only=True)
class VictimSettings(CommonSettings):
    """Train a victim model. A MAD surrogate is '--epochs 1 --train_subset 10 --lr 0.0'."""

    call_defaults = {"num_workers": 0}

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
        "--outlier-exposure", default=None, metavar="DATASET", group=_AM,
        help="train the victim as AM's defender with Outlier Exposure on DATASET's training split "
             "(same model family; e.g. FashionMNIST for MNIST) and, jointly, the misinformation model")
    oe_lambda: float = setting("--oe-lambda", default=1.0, metavar="L", group=_AM,
                               help="weight of the Outlier Exposure loss (default: 1.0)")
    misinformation_out: Optional[str] = setting(
        "--misinformation-out", default=None, metavar="DIR", group=_AM,
        help="folder of the misinformation model (default: OUT_PATH/misinformation); given without "
             "--outlier-exposure, it is trained on the in-distribution data only")
    misinformation: bool = setting("--misinformation", default=True, group=_AM,
                                   help="with --outlier-exposure, also train the misinformation model "
                                        "(default; --no-misinformation: the OE defender alone)")
    misinformation_id_only: bool = setting(
        "--misinformation-id-only", default=False, group=_AM,
        help="train the misinformation model on the in-distribution images only (ModelGuard's recipe)")

    def run(self) -> Tuple[nn.Module, Dict[str, Any]]:
        """Trains the victim into ``out_path`` (``seed`` None leaves the RNGs unseeded); returns
        ``(model, summary)`` of :func:`~ppoison_ext.training.train_model` plus ``params``."""
        check_dataset(self.dataset, "dataset")
        if not isinstance(self.model_arch, str) or not self.model_arch:
            raise ValueError(f"arch must be an architecture name, got {self.model_arch!r}")
        dev = as_device(self.device_id)
        family = dataset_to_modelfamily[self.dataset]
        if self.seed is not None:
            seed_everything(self.seed)

        trainset = get_dataset(self.dataset, train=True, transform=get_transform(family, "train"),
                               root=self.data_root)
        testset = get_dataset(self.dataset, train=False, transform=get_transform(family, "test"), root=self.data_root)
        num_classes = len(trainset.classes)
        n = self.train_subset
        if n is not None:
            int_arg(n, "train_subset", high=len(trainset))
            rng = np.random.RandomState(self.seed) if self.seed is not None else np.random
            trainset = Subset(trainset, rng.choice(np.arange(len(trainset)), size=n, replace=False).tolist())
        testset = first_n(testset, self.test_subset)
        logger.info("victim %s/%s: %d train, %d test images, K=%d, device %s", self.dataset, self.model_arch,
                    len(trainset), len(testset), num_classes, dev)

        model = get_net(self.model_arch, family, self.pretrained, num_classes=num_classes).to(dev)
        out_path = Path(self.out_path)
        train_kw = dict(batch_size=self.batch_size, epochs=self.epochs, lr=self.lr, momentum=self.momentum,
                        lr_step=self.lr_step, lr_gamma=self.lr_gamma, num_workers=self.num_workers,
                        progress=not self.no_progress, resume=self.resume, log_interval=self.log_interval,
                        device=dev, arch=self.model_arch, num_classes=num_classes, weight_decay=5e-4)
        record = {k: v for k, v in self.params().items() if k not in group_fields(VictimSettings, _AM)}
        record["num_classes"] = num_classes
        misinfo_out = self.misinformation_out
        if misinfo_out is None and self.outlier_exposure is not None and self.misinformation:
            misinfo_out = str(out_path / "misinformation")
        if self.outlier_exposure is not None or misinfo_out is not None:
            model, summary = self._train_defender(model, trainset, testset, out_path, misinfo_out, train_kw)
            record.update(outlier_exposure=self.outlier_exposure, oe_lambda=self.oe_lambda,
                          misinformation_out=None if misinfo_out is None else str(misinfo_out),
                          misinformation_id_only=bool(self.misinformation_id_only))
        else:
            model, summary = train_model(model, trainset, out_path, testset=testset,
                                         weighted_loss=self.weighted_loss, **train_kw)
        if distributed.is_main_process():
            write_params(out_path / "params.json", record)
        summary["params"] = record
        return model, summary

    def _train_defender(self, model, trainset, testset, out_path: Path, misinfo_out, train_kw):
        """Adaptive Misinformation's defender (Outlier Exposure) and misinformation model."""
        if self.weighted_loss:
            raise ValueError("--weighted-loss is not supported with --outlier-exposure / --misinformation-out")
        if self.resume not in (None, "auto"):
            raise ValueError("with --outlier-exposure / --misinformation-out, --resume must be 'auto', "
                             f"got {self.resume!r}")
        outliers = outlier_test = None
        oe = self.outlier_exposure
        if oe is not None:
            family = dataset_to_modelfamily[self.dataset]
            check_dataset(oe, "outlier_exposure")
            if oe == self.dataset:
                raise ValueError("outlier_exposure must be another dataset than the victim's")
            oe_family = dataset_to_modelfamily[oe]
            if oe_family != family:
                raise ValueError(f"outlier_exposure {oe!r} is of model family {oe_family!r}, the victim's dataset "
                                 f"{self.dataset!r} of {family!r}: their images differ in shape")
            outliers = get_dataset(oe, train=True, transform=get_transform(oe_family, "train"), root=self.data_root)
            try:
                outlier_test = get_dataset(oe, train=False, transform=get_transform(oe_family, "test"),
                                           root=self.data_root)
            except (FileNotFoundError, ValueError, TypeError):  # e.g. a set with one split
                outlier_test = None
            logger.info("outlier exposure: %s (%d train, %s test images), lambda %g", oe, len(outliers),
                        "no" if outlier_test is None else len(outlier_test), self.oe_lambda)
        misinfo = None
        if misinfo_out is not None:
            misinfo = get_net(self.model_arch, dataset_to_modelfamily[self.dataset], self.pretrained,
                              num_classes=train_kw["num_classes"]).to(train_kw["device"])
        model, misinfo, summary = train_model_oe(
            model, trainset, out_path, outlier_set=outliers, oe_lambda=self.oe_lambda, misinfo_model=misinfo,
            misinfo_out=misinfo_out, misinfo_outliers=not self.misinformation_id_only, testset=testset,
            outlier_testset=outlier_test, **train_kw)
        if misinfo is not None and distributed.is_main_process():
            write_params(Path(misinfo_out) / "params.json", {
                "dataset": self.dataset, "model_arch": self.model_arch, "num_classes": train_kw["num_classes"],
                "misinformation_of": str(out_path),
                "outlier_exposure": oe if not self.misinformation_id_only else None,
                "loss": "-log(1 - p_label + 1e-7)", "seed": self.seed,
                **{k: getattr(self, k) for k in ("batch_size", "epochs", "lr", "momentum", "lr_step", "lr_gamma")}})
        return model, summary


build_parser, main = entry_points(VictimSettings)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
