"""Attacker (knockoff) training: ``ppoison train-attacker MODEL_DIR MODEL_ARCH TESTDATASET
--budgets b1,b2,...``.

One model is trained through the budgets in the given order, each continuing from the last state
of the one before; per budget b, after reseeding, on the first b transfer samples with a fresh
optimizer, writing ``checkpoint.<b>.pth.tar`` (best test accuracy), ``train.<b>.log.tsv`` and
``last.<b>.pth.tar``. With ``--resume auto`` (default) a rerun skips finished budgets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from .. import distributed
from ..attacks.transferset import load_transferset
from ..checkpoint import load_checkpoint
from ..datasets import dataset_to_modelfamily, get_dataset, get_transform, in_memory
from ..devices import as_device
from ..modeldir import dataset_name, read_params, write_params
from ..models import get_net
from ..training import OPTIMIZERS, get_optimizer, seed_everything, soft_cross_entropy, train_model
from .common import check_dataset, first_n
from .settings import CommonSettings, device_setting, entry_points, setting

logger = logging.getLogger(__name__)

__all__ = ["train_attacker", "parse_budgets", "AttackerSettings", "build_parser", "main"]


def train_attacker(*args: Any, **kwargs: Any) -> Tuple[nn.Module, Dict[str, Any]]:
    """Trains a knockoff through the budgets: ``AttackerSettings.of(*args, **kwargs).run()``."""
    return AttackerSettings.of(*args, **kwargs).run()


def parse_budgets(budgets: Union[str, Sequence[int], int]) -> List[int]:
    """``"50,100,500"`` (or a list of ints) → ``[50, 100, 500]``; empty entries are skipped."""
    if isinstance(budgets, int) and not isinstance(budgets, bool):
        items: List[Any] = [budgets]
    elif isinstance(budgets, str):
        items = [b.strip() for b in budgets.split(",") if b.strip()]
    elif isinstance(budgets, Sequence):
        items = list(budgets)
    else:
        raise TypeError("budgets must be a comma-separated str or a list of ints, "
                        f"got {type(budgets).__name__}")
    out = []
    for b in items:
        try:
            v = int(b)
        except (TypeError, ValueError):
            raise ValueError(f"budgets: {b!r} is not an integer") from None
        if isinstance(b, bool) or v < 1 or (isinstance(b, float) and b != v):
            raise ValueError(f"budgets: {b!r} is not a positive integer")
        out.append(v)
    if not out:
        raise ValueError("budgets: no budget given (e.g. --budgets 50,100,1000)")
    return out


def _check_victim_dataset(model_dir: Path, meta: Dict[str, Any], testdataset: str) -> None:
    """Refuses a transfer set built from a victim of another dataset (when the victim is on disk)."""
    vdir = meta.get("victim_model_dir")
    if not vdir or not (Path(vdir) / "params.json").is_file():
        return
    try:
        vdataset = dataset_name(read_params(vdir))
    except ValueError:
        return
    if vdataset != testdataset:
        raise ValueError(f"{Path(model_dir) / 'transferset.json'}: the transfer set was built from the victim in "
                         f"{vdir}, trained on {vdataset}, but the attacker is to be tested on {testdataset}; "
                         f"pass testdataset={vdataset!r} or the transfer set of a {testdataset} victim")


def _s4l_criterion(model, ts, semidataset, transform, weight, batch_size, seed, data_root):
    from ..attacks.s4l import S4LCriterion

    name = semidataset or ts.meta.get("queryset")
    if not name:
        raise ValueError("semitrainweight: the transfer set does not name its query set; pass semidataset")
    unlabelled = get_dataset(name, train=True, transform=transform, root=data_root)
    logger.info("S4L: rotation loss (weight %s) on %d unlabelled %s images", weight, len(unlabelled), name)
    return S4LCriterion(model, unlabelled, weight=weight, batch_size=batch_size, seed=seed)


@dataclass(kw_only=True)
class AttackerSettings(CommonSettings):
    """Train a knockoff on a transfer set, through a list of budgets."""

    call_defaults = {"num_workers": 0}

    model_dir: str = setting(metavar="DIR", help="folder containing the transfer set")
    model_arch: str = setting(metavar="MODEL_ARCH", help="model name")
    testdataset: str = setting(metavar="DS_NAME", help="name of the test dataset")
    budgets: str = setting("--budgets", metavar="B", help="comma-separated budgets, trained in order")
    device_id: int = device_setting()
    batch_size: int = setting("-b", "--batch-size", default=64, metavar="N",
                              help="input batch size for training (default: 64)")
    epochs: int = setting("-e", "--epochs", default=100, metavar="N", help="epochs per budget (default: 100)")
    lr: float = setting("--lr", default=0.01, metavar="LR", help="learning rate (default: 0.01)")
    momentum: float = setting("--momentum", default=0.5, metavar="M", help="SGD momentum (default: 0.5)")
    log_interval: int = setting("--log-interval", default=50, metavar="N",
                                help="batches between progress log lines (default: 50)")
    resume: str = setting("--resume", default="auto", metavar="PATH",
                          help="'auto' (default: skip finished budgets, continue an unfinished one), 'none', "
                               "or a checkpoint whose weights initialise the model")
    lr_step: int = setting("--lr-step", default=60, metavar="N", help="StepLR step (default: 60)")
    lr_gamma: float = setting("--lr-gamma", default=0.1, metavar="N", help="StepLR decay (default: 0.1)")
    num_workers: int = setting("-w", "--num_workers", default=10, metavar="N",
                               help="DataLoader worker processes (default: 10)")
    pretrained: Optional[str] = setting("--pretrained", default=None, help="'imagenet' or a checkpoint path")
    weighted_loss: bool = setting("--weighted-loss", default=False, help="class-weighted loss")
    argmaxed: bool = setting("--argmaxed", default=False, help="train on one-hot argmax labels")
    optimizer_choice: str = setting("--optimizer_choice", default="sgdm", choices=OPTIMIZERS,
                                    help="optimizer (default: sgdm; adam/adagrad ignore --lr)")
    test_subset: Optional[int] = setting("--test_subset", default=None, metavar="N",
                                         help="test on the first N test images only")
    transferset_subdir: Optional[str] = setting("--transferset-subdir", default=None, metavar="NAME",
                                                help="train on MODEL_DIR/NAME (e.g. 'aware', a defense-aware set)")
    semitrainweight: float = setting("--semitrainweight", default=0.0, metavar="W",
                                     help="S4L rotation-loss weight on the unlabelled query set (0: off; 1.0)")
    semidataset: Optional[str] = setting("--semidataset", default=None, metavar="DS_NAME",
                                         help="S4L unlabelled set (default: the transfer set's query set)")

    def __post_init__(self) -> None:
        if not isinstance(self.budgets, str):
            self.budgets = ",".join(map(str, parse_budgets(self.budgets)))

    def run(self) -> Tuple[nn.Module, Dict[str, Any]]:
        """Trains the knockoff on the transfer set in ``model_dir``; returns ``(model, {"budgets",
        "results": {b: train_model summary}, "num_classes"})``."""
        model_dir = Path(self.model_dir)
        budget_list = parse_budgets(self.budgets)
        if self.optimizer_choice not in OPTIMIZERS:
            raise ValueError(f"optimizer_choice must be one of {list(OPTIMIZERS)}, got {self.optimizer_choice!r}")
        check_dataset(self.testdataset, "testdataset")
        resume = self.resume
        if isinstance(resume, str) and resume.lower() in ("none", "no", "off", ""):
            resume = None
        dev = as_device(self.device_id)

        ts = load_transferset(model_dir / self.transferset_subdir if self.transferset_subdir else model_dir)
        K = ts.num_classes
        _check_victim_dataset(model_dir, ts.meta, self.testdataset)
        logger.info("transfer set %s: %d samples, %d classes", model_dir, len(ts), K)
        too_big = [b for b in budget_list if b > len(ts)]
        if too_big:
            raise ValueError(f"budgets {too_big} exceed the {len(ts)} samples of the transfer set in {model_dir}")

        family = dataset_to_modelfamily[self.testdataset]
        transform = get_transform(family, "test")
        testset = get_dataset(self.testdataset, train=False, transform=transform, root=self.data_root)
        ts.check_classes(len(testset.classes), f"test set {self.testdataset}")
        # the test transform is deterministic: decode and transform every image once, not every epoch
        testset = in_memory(first_n(testset, self.test_subset))

        seed_everything(self.seed)
        model = get_net(self.model_arch, family, self.pretrained, num_classes=K).to(dev)
        auto = resume is not None and str(resume) in ("auto", "True")
        if resume is not None and not auto:
            load_checkpoint(resume, model, map_location=dev)
            logger.info("initial weights from %s", resume)

        criterion, extra_params = soft_cross_entropy, []
        if self.semitrainweight:
            criterion = _s4l_criterion(model, ts, self.semidataset, transform, self.semitrainweight,
                                       self.batch_size, self.seed, self.data_root)
            extra_params = list(criterion.parameters())
        results: Dict[int, Dict[str, Any]] = {}
        for b in budget_list:
            seed_everything(self.seed)
            trainset = in_memory(ts.dataset(transform=transform, n=b, argmaxed=self.argmaxed))
            optimizer = get_optimizer(list(model.parameters()) + extra_params, self.optimizer_choice, lr=self.lr,
                                      momentum=self.momentum)
            logger.info("=> training at budget %d", b)
            model, summary = train_model(
                model, trainset, model_dir, testset=testset, batch_size=self.batch_size, epochs=self.epochs,
                lr=self.lr, momentum=self.momentum, lr_step=self.lr_step, lr_gamma=self.lr_gamma,
                optimizer=optimizer, criterion=criterion, weighted_loss=self.weighted_loss,
                checkpoint_suffix=f".{b}", device=dev, num_workers=self.num_workers, seed=self.seed,
                arch=self.model_arch, progress=not self.no_progress, resume="auto" if auto else None,
                save_last=True, log_interval=self.log_interval, num_classes=K,
            )
            if summary["skipped"]:
                logger.info("budget %d: all %d epochs already done; continuing from its final state", b, self.epochs)
            results[b] = summary

        if distributed.is_main_process():
            write_params(model_dir / "params_train.json", self.params())
        return model, {"budgets": budget_list, "results": results, "num_classes": K}


build_parser, main = entry_points(AttackerSettings)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
