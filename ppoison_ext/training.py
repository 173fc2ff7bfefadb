"""Training, resumable, on one engine.

:func:`train_model` (SGD + ``StepLR`` stepped after each epoch, data-parallel under ``torchrun``)
and :func:`train_model_oe` (a defender with Outlier Exposure and Adaptive Misinformation's
misinformation model) both run :func:`fit`; what differs is a :class:`Steps` object. Files:
``checkpoint{suffix}.pth.tar`` (whenever the test accuracy is ``>=`` the best so far),
``train{suffix}.log.tsv`` (a ``train`` and a ``test`` row per epoch; a loss is the sum of the
per-batch mean losses divided by the number of samples; ``-1`` without a test set) and
``last{suffix}.pth.tar`` (model, optimizer, scheduler and RNG states after every epoch, from
which ``resume='auto'`` continues a killed run bit for bit). Every optimisation step in the
package is :func:`optimizer_step`. Progress goes to tqdm bars on stderr, messages to logging.
"""

from __future__ import annotations

import datetime
import logging
import math
import operator
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from . import distributed as D
from .checkpoint import load_checkpoint, save_checkpoint
from .checks import check_bools, int_arg, real_arg, type_arg
from .devices import as_device
from .fileio import PathLike, append_tsv, drop_tsv_rows
from .losses import misinformation_loss, soft_cross_entropy, uniform_cross_entropy
from .models.heads import num_classes_of

logger = logging.getLogger(__name__)

__all__ = ["soft_cross_entropy", "get_optimizer", "OPTIMIZERS", "seed_everything", "optimizer_step",
           "device_of", "class_weights", "test_step", "train_model", "train_model_oe", "fit", "Steps",
           "cycle_batches", "training_state", "LOG_COLUMNS"]

#: Header of ``train{suffix}.log.tsv``.
LOG_COLUMNS = ["run_id", "epoch", "split", "loss", "accuracy", "best_accuracy"]

#: Names accepted by :func:`get_optimizer` (``--optimizer_choice``).
OPTIMIZERS = ("sgd", "sgdm", "adam", "adagrad")


def get_optimizer(params, name: str = "sgdm", lr: float = 0.01, momentum: float = 0.5,
                  weight_decay: float = 0.0, *, exact_lr: bool = False) -> torch.optim.Optimizer:
    """Optimizer by name: ``sgd`` → SGD(lr), ``sgdm`` → SGD(lr, momentum), ``adam`` → Adam(),
    ``adagrad`` → Adagrad(); the last two use the library's default lr unless ``exact_lr``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {list(OPTIMIZERS)}, got {name!r}")
    for arg, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        real_arg(v, arg)
    if name in ("sgd", "sgdm"):
        momentum = momentum if name == "sgdm" else 0  # SGD's default
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    adaptive = torch.optim.Adam if name == "adam" else torch.optim.Adagrad
    if exact_lr:
        return adaptive(params, lr=lr, weight_decay=weight_decay)
    logger.debug("get_optimizer(%r): lr=%s ignored, library default used", name, lr)
    return adaptive(params, weight_decay=weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, *, set_to_none: bool = True) -> None:
    """One update of every loop in the package: clear the gradients, backpropagate ``loss``, step."""
    optimizer.zero_grad(set_to_none=set_to_none)
    loss.backward()
    optimizer.step()


def device_of(module: Any, default: Any = "cpu") -> torch.device:
    """The device of ``module``'s first parameter; ``default`` for anything without one."""
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device
    return as_device(default)


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, NumPy's legacy global RNG and torch (CPU and CUDA)."""
    seed = operator.index(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _dataset_targets(ds: Dataset) -> Optional[List[int]]:
    """Hard labels of every item, without loading images (None if unknown)."""
    if isinstance(ds, Subset):
        inner = _dataset_targets(ds.dataset)
        return None if inner is None else [inner[int(i)] for i in ds.indices]
    t = getattr(ds, "targets", None)
    if t is None and hasattr(ds, "samples"):
        t = [s[1] for s in ds.samples]
    if t is None and isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) > 1:
        t = ds.tensors[1]
    if t is None:
        return None
    if isinstance(t, Tensor):
        return (t.argmax(1) if t.dim() == 2 else t).long().tolist()
    return [int(v) for v in t]


def class_weights(trainset: Dataset, num_classes: int) -> Tensor:
    """Class weights ``w_c = min_c' count_c' / count_c`` (float32 [K]) from the dataset's labels
    (ValueError when they cannot be read or a class has no sample)."""
    labels = _dataset_targets(trainset)
    if labels is None:
        raise ValueError(f"weighted_loss needs the labels of the training set; {type(trainset).__name__} has "
                         "no targets/samples attribute")
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes).float()
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"weighted_loss: classes {missing[:10]} have no training sample")
    return counts.min() / counts


def _num_classes_of(model: nn.Module, dataset: Dataset) -> Optional[int]:
    for ds in (dataset, getattr(dataset, "dataset", None)):  # a Subset's classes are its dataset's
        if getattr(ds, "classes", None) is not None:
            return len(ds.classes)
    return num_classes_of(model)


def _labels(targets: Tensor) -> Tensor:
    return targets.argmax(1) if targets.dim() == 2 else targets


def _check_common(model, trainset, arch, num_classes, batch_size, epochs, lr, momentum, weight_decay, lr_step,
                  lr_gamma, num_workers, log_interval) -> tuple:
    """Checks the training loops' shared arguments; returns them converted, ``arch`` and
    ``num_classes`` defaulted (the model's class name; inferred)."""
    type_arg(model, "model", nn.Module, "a torch.nn.Module")
    _check_dataset("trainset", trainset, optional=False)
    if len(trainset) == 0:
        raise ValueError("trainset is empty")
    arch = arch if arch is not None else type(model).__name__
    type_arg(arch, "arch", str, "a str (the architecture name)")
    if num_classes is None:
        num_classes = _num_classes_of(model, trainset)
    return (arch, num_classes, int_arg(batch_size, "batch_size"),
            int_arg(epochs, "epochs", low=0), real_arg(lr, "lr"),
            real_arg(momentum, "momentum"), real_arg(weight_decay, "weight_decay"),
            int_arg(lr_step, "lr_step"), real_arg(lr_gamma, "lr_gamma"),
            int_arg(num_workers, "num_workers", low=0),
            int_arg(log_interval, "log_interval"))


def _training_device(device: Any) -> torch.device:
    """:func:`as_device`, falling back to the CPU with a warning when CUDA is missing."""
    device = as_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available; training on the CPU", device)
        device = torch.device("cpu")
    return device


def _sgd_and_step_lr(model: nn.Module, lr, momentum, weight_decay, lr_step, lr_gamma) -> Tuple[Any, Any]:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)


def _eval_sums(model: nn.Module, loader, device: torch.device, criterion: Callable, progress: bool = False,
               desc: str = "test", on_batch: Optional[Callable[[Tensor, Tensor], None]] = None
               ) -> Tuple[float, int, int]:
    """(Σ per-batch mean loss, #correct, #samples) over ``loader`` in eval mode;
    ``on_batch(inputs, targets)`` runs after each batch is counted."""
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            loss_sum += float(criterion(outputs, targets).item())
            correct += int(outputs.argmax(1).eq(_labels(targets)).sum().item())
            total += int(targets.size(0))
            if on_batch is not None:
                on_batch(inputs, targets)
    return loss_sum, correct, total


def _default_criterion(weight: Optional[Tensor]):
    def criterion(outputs: Tensor, targets: Tensor) -> Tensor:
        if targets.dim() == 2:
            return soft_cross_entropy(outputs, targets, weight)
        return F.cross_entropy(outputs, targets, weight=weight)
    return criterion


def test_step(model: nn.Module, loader, device: Union[str, torch.device, None] = None,
              criterion: Optional[Callable] = None, *, progress: bool = False) -> Tuple[float, float]:
    """``(loss, accuracy %)`` of ``model`` (left in eval mode) on ``loader``'s (inputs, int labels
    or soft [B, K] targets); the loss is the sum of the per-batch mean losses divided by the
    number of samples, by default cross-entropy (soft CE for 2-D targets)."""
    crit = criterion if criterion is not None else _default_criterion(None)
    device = as_device(device, default=device_of(model))
    loss_sum, correct, total = _eval_sums(model, loader, device, crit, progress)
    if total == 0:
        raise ValueError("test_step: the loader yielded no samples")
    return loss_sum / total, 100.0 * correct / total


test_step.__test__ = False  # not a pytest test when imported into a test module


def _last_path(out_path: Path, suffix: str) -> Path:
    return out_path / f"last{suffix}.pth.tar"


def training_state(out_path: PathLike, checkpoint_suffix: str = "") -> Optional[Dict[str, Any]]:
    """What ``last{suffix}.pth.tar`` in ``out_path`` says (no model needed):
    ``{"epoch": epochs finished, "epochs": epochs planned, "best_test_acc", "history"}``,
    or None when there is no such file."""
    path = _last_path(Path(out_path), checkpoint_suffix)
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    return {k: ckpt.get(k) for k in ("epoch", "epochs", "best_test_acc", "best_train_acc", "history")}


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    out: Dict[str, Any] = {
        "rng_torch": torch.get_rng_state(),
        "rng_numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
        "rng_python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng_cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def _set_rng_state(ckpt: Dict[str, Any]) -> None:
    if "rng_torch" in ckpt:
        torch.set_rng_state(ckpt["rng_torch"].cpu())
    if "rng_numpy" in ckpt:
        name, keys, pos, has_gauss, cached = ckpt["rng_numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "rng_python" in ckpt:
        version, internal, gauss = ckpt["rng_python"]
        random.setstate((version, tuple(internal), gauss))
    if "rng_cuda" in ckpt and torch.cuda.is_available():
        states = ckpt["rng_cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in states])


class Steps:
    """What :func:`fit` asks of a kind of training; this one minimises ``criterion(logits, targets)``.

    ``evaluate()`` (or None) returns the epoch's (test loss, test accuracy). ``companions``:
    ``(key, model, optimizer, scheduler)`` of models trained beside the main one, saved in
    ``last.pth.tar``; ``logs``: further run logs to trim on resume.
    """

    companions: Tuple = ()
    logs: Tuple = ()

    def __init__(self, criterion: Optional[Callable] = None,
                 evaluate: Optional[Callable[[], Tuple[float, float]]] = None):
        self.criterion, self.evaluate = criterion, evaluate

    def start_epoch(self) -> None:
        pass

    def loss(self, net: nn.Module, inputs: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        """The batch's loss (to minimise) and the logits its accuracy is counted on."""
        outputs = net(inputs)
        return self.criterion(outputs, targets), outputs

    def epoch_record(self, run_id: str, epoch: int) -> Dict[str, float]:
        """Extra history columns of the epoch just trained; may append to :attr:`logs`' files."""
        return {}

    def finish(self, epochs: int) -> None:
        pass


def fit(model: nn.Module, data, steps: Steps, *, optimizer: torch.optim.Optimizer, scheduler: Any = None,
        device: Union[str, torch.device, None] = None, ctx: Optional[D.DistContext] = None, epochs: int,
        out_path: Optional[Path] = None, log_path: Optional[Path] = None, suffix: str = "",
        batch_size: int = 1, num_workers: int = 0, resume: Any = None, seed: Optional[int] = None,
        save_last: bool = False, progress: bool = False, log_interval: int = 100, arch: str = "",
        num_classes: Optional[int] = None, desc: str = "train",
        summary_extra: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The package's one training loop: ``epochs`` epochs of ``steps`` with ``optimizer``, the
    scheduler (if any) stepped after each, then ``steps.evaluate``.

    ``data`` is a Dataset (read shuffled in ``batch_size`` batches; sharded under ``torchrun``)
    or an iterable of (inputs, targets) batches read anew every epoch. With ``out_path`` the run
    writes :func:`train_model`'s files (``last`` only with ``save_last``) and can resume.
    """
    ctx = ctx if ctx is not None else D.DistContext(device=as_device(device))
    device, main, files = ctx.device, ctx.is_main, out_path is not None
    ckpt_path = out_path / f"checkpoint{suffix}.pth.tar" if files else None
    last_path = _last_path(out_path, suffix) if files else None
    save_last = save_last and files
    schedulers = [sch for sch in [scheduler] + [c[3] for c in steps.companions] if sch is not None]
    start_epoch, best_train_acc, best_test_acc = 1, -1.0, -1.0
    history: List[Dict[str, float]] = []
    run_id = str(datetime.datetime.now())
    resumed_from = None

    def write_last(epoch: int, test_acc: float) -> None:
        extra = {"scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
                 "epochs": epochs, "run_id": run_id, "best_train_acc": best_train_acc,
                 "best_test_acc": best_test_acc, "history": history, **_rng_state()}
        for key, companion, companion_optimizer, companion_scheduler in steps.companions:
            extra.update({f"{key}_state": companion.state_dict(),
                          f"{key}_optimizer": companion_optimizer.state_dict(),
                          f"{key}_scheduler": companion_scheduler.state_dict()})
        save_checkpoint(last_path, model, arch=arch, epoch=epoch, best_acc=test_acc, optimizer=optimizer,
                        num_classes=num_classes, extra=extra)

    resume_file = None
    if files and resume is not None and resume is not False:
        if resume is True or (isinstance(resume, str) and resume == "auto"):
            resume_file = last_path if last_path.is_file() else None
        else:
            resume_file = Path(resume)
            if not resume_file.is_file():
                raise FileNotFoundError(f"resume={str(resume)!r}: no such checkpoint file")
    if resume_file is not None:
        ckpt = load_checkpoint(resume_file, model, map_location=device)
        for key, companion, companion_optimizer, companion_scheduler in steps.companions:
            if f"{key}_state" not in ckpt:
                raise ValueError(f"{resume_file} holds no {key} model; start over without resume")
            companion.load_state_dict(ckpt[f"{key}_state"])
            companion_optimizer.load_state_dict(ckpt[f"{key}_optimizer"])
            companion_scheduler.load_state_dict(ckpt[f"{key}_scheduler"])
        done = int(ckpt.get("epoch", 0))
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        elif scheduler is not None:  # a checkpoint without scheduler state (a converted one): fast-forward
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(done):
                    scheduler.step()
        best_test_acc = float(ckpt.get("best_test_acc", ckpt.get("best_acc", -1.0)))
        best_train_acc = float(ckpt.get("best_train_acc", -1.0))
        history = [dict(h) for h in ckpt.get("history", [])]
        run_id = ckpt.get("run_id", run_id)
        _set_rng_state(ckpt)
        start_epoch, resumed_from = done + 1, done
        if main:  # drops the rows the unfinished epoch logged
            for path in (log_path, *steps.logs):
                drop_tsv_rows(path, lambda row: len(row) >= 2 and row[0] == run_id and row[1].isdecimal()
                              and int(row[1]) > done)
        logger.info("resuming %s from %s: %d epoch(s) done", log_path.name, resume_file.name, done)
    else:
        if seed is not None:
            seed_everything(seed)
        if main and save_last and epochs >= 1:
            # epoch 0: claims the run id before any log row is written, so that rows of a run
            # killed inside its first epoch are recognised and dropped on resume
            write_last(0, -1.0)
    D.barrier()

    summary: Dict[str, Any] = {"checkpoint": str(ckpt_path), "log": str(log_path),
                               "last": str(last_path) if save_last else None} if files else {}
    summary.update(summary_extra or {}, run_id=run_id, resumed_from=resumed_from,
                   skipped=start_epoch > epochs and resumed_from is not None)
    if start_epoch > epochs:
        model.eval()
        steps.finish(epochs)
        summary.update(best_test_acc=best_test_acc, best_train_acc=best_train_acc,
                       epochs_done=start_epoch - 1, history=history)
        return model, summary

    pin = device.type == "cuda"
    sampler, train_loader = None, data
    if ctx.distributed:
        sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=0 if seed is None else int(seed))
        train_loader = DataLoader(data, batch_size=max(1, math.ceil(batch_size / ctx.world_size)),
                                  sampler=sampler, num_workers=num_workers, pin_memory=pin)
    elif isinstance(data, Dataset):
        train_loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                  pin_memory=pin)
    net = D.wrap_ddp(model, ctx)
    show = progress and main
    bar = tqdm(range(start_epoch, epochs + 1), desc=desc, disable=not show, unit="epoch",
               initial=start_epoch - 1, total=epochs)
    test_loss, test_acc = -1.0, -1.0
    for epoch in bar:
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr_now = float(optimizer.param_groups[0]["lr"])
        net.train()
        for _, companion, _, _ in steps.companions:
            companion.train()
        steps.start_epoch()
        loss_sum, correct, total = 0.0, 0, 0
        for batch_idx, (inputs, targets) in enumerate(
                tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not show, unit="batch")):
            inputs, targets = inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)
            loss, outputs = steps.loss(net, inputs, targets)
            optimizer_step(optimizer, loss)
            loss_sum += float(loss.item())
            correct += int(outputs.argmax(1).eq(_labels(targets)).sum().item())
            total += int(targets.size(0))
            if (batch_idx + 1) % log_interval == 0:
                logger.info("[%s] epoch %d, %d samples\tloss %.6f\tacc %.1f", desc, epoch, total,
                            loss_sum / total, 100.0 * correct / total)
        loss_sum, correct, total = D.all_reduce_sum([loss_sum, correct, total], device)
        train_loss, train_acc = loss_sum / max(total, 1), 100.0 * correct / max(total, 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for sch in schedulers:
                sch.step()
        best_train_acc = max(best_train_acc, train_acc)
        if steps.evaluate is not None:
            test_loss, test_acc = steps.evaluate()
            best_test_acc = max(best_test_acc, test_acc)
        history.append({"epoch": epoch, "lr": lr_now, "train_loss": train_loss, "train_acc": train_acc,
                        "test_loss": test_loss, "test_acc": test_acc})
        bar.set_postfix(loss=f"{train_loss:.4g}", acc=f"{train_acc:.1f}", test=f"{test_acc:.1f}")
        logger.info("%s epoch %d/%d: train loss %.6g acc %.2f; test loss %.6g acc %.2f (best %.2f)", desc,
                    epoch, epochs, train_loss, train_acc, test_loss, test_acc, best_test_acc)
        if main and files:
            if test_acc >= best_test_acc:
                sched_state = scheduler.state_dict() if hasattr(scheduler, "state_dict") else None
                save_checkpoint(ckpt_path, model, arch=arch, epoch=epoch, best_acc=test_acc,
                                optimizer=optimizer, num_classes=num_classes,
                                extra={"scheduler": sched_state})
            rows = [[run_id, epoch, "train", train_loss, train_acc, best_train_acc],
                    [run_id, epoch, "test", test_loss, test_acc, best_test_acc]]
            append_tsv(log_path, LOG_COLUMNS, rows)
        history[-1].update(steps.epoch_record(run_id, epoch))
        if main and save_last:  # written last: marks the epoch as done
            write_last(epoch, test_acc)
        D.barrier()
    bar.close()
    steps.finish(epochs)
    summary.update(best_test_acc=best_test_acc, best_train_acc=best_train_acc, epochs_done=epochs,
                   history=history)
    return model, summary


def _check_dataset(name: str, ds: Any, optional: bool = True) -> None:
    if (ds is not None or not optional) and not isinstance(ds, Dataset):
        or_none = " or None" if optional else ""
        raise TypeError(f"{name} must be a torch Dataset{or_none}, got {type(ds).__name__}")


def train_model(model: nn.Module, trainset: Dataset, out_path: PathLike, *, testset: Optional[Dataset] = None,
                batch_size: int = 64, epochs: int = 100, lr: float = 0.1, momentum: float = 0.5,
                weight_decay: float = 5e-4, lr_step: int = 30, lr_gamma: float = 0.1,
                optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Optional[Any] = None,
                criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                criterion_test: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                weighted_loss: bool = False, checkpoint_suffix: str = "", log_suffix: Optional[str] = None,
                device: Union[str, torch.device, None] = None, num_workers: int = 0,
                seed: Optional[int] = None, arch: Optional[str] = None, progress: bool = True,
                resume: Union[None, bool, str, PathLike] = None, save_last: bool = True,
                log_interval: int = 100, num_classes: Optional[int] = None
                ) -> Tuple[nn.Module, Dict[str, Any]]:
    """Trains ``model`` on ``trainset`` (int labels or soft [K] targets) into ``out_path``.

    SGD(lr, momentum, weight_decay) and StepLR(lr_step, lr_gamma) unless ``optimizer`` /
    ``scheduler`` are given; ``criterion`` defaults to cross-entropy (soft for 2-D targets),
    weighted by :func:`class_weights` with ``weighted_loss``. ``seed`` seeds everything first
    (not when resuming). ``resume``: None/False start over (the log is appended to),
    ``"auto"``/True continue from ``last{suffix}.pth.tar`` if it exists, a path: from that
    checkpoint (FileNotFoundError if missing). ``arch`` (default: the class name) and
    ``num_classes`` (default: inferred) go into the checkpoints.

    Returns ``(model, summary)``: the unwrapped model and ``best_test_acc``, ``best_train_acc``,
    ``epochs_done``, ``history`` (one dict per epoch), ``checkpoint``, ``log``, ``last``,
    ``run_id``, ``resumed_from`` (epoch or None), ``skipped`` (a finished run reloaded).
    """
    (arch, num_classes, batch_size, epochs, lr, momentum, weight_decay, lr_step, lr_gamma, num_workers,
     log_interval) = _check_common(model, trainset, arch, num_classes, batch_size, epochs, lr, momentum,
                                   weight_decay, lr_step, lr_gamma, num_workers, log_interval)
    _check_dataset("testset", testset)
    type_arg(checkpoint_suffix, "checkpoint_suffix", str, "a str")
    type_arg(log_suffix, "log_suffix", str, "a str", optional=True)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    ctx = D.init_distributed(_training_device(device))
    device = ctx.device
    out_path = Path(out_path)
    if ctx.is_main:
        out_path.mkdir(parents=True, exist_ok=True)
    model.to(device)
    weight = None
    if weighted_loss:
        if num_classes is None:
            raise ValueError("weighted_loss needs num_classes")
        weight = class_weights(trainset, num_classes).to(device)
        logger.info("class weights: %s", weight.tolist())
    crit_test = criterion_test if criterion_test is not None else (
        lambda o, t: F.cross_entropy(o, _labels(t), weight=weight))
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if scheduler is None:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)

    evaluate = None
    if testset is not None:
        shard = testset if not ctx.distributed else Subset(
            testset, D.shard_indices(len(testset), ctx.rank, ctx.world_size))
        test_loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                 pin_memory=device.type == "cuda")

        def evaluate() -> Tuple[float, float]:
            sums = _eval_sums(model, test_loader, device, crit_test)  # unwrapped: shards may differ
            loss_sum, correct, total = D.all_reduce_sum(list(sums), device)
            return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)

    steps = Steps(criterion if criterion is not None else _default_criterion(weight), evaluate)
    log_name = f"train{checkpoint_suffix if log_suffix is None else log_suffix}.log.tsv"
    return fit(model, trainset, steps, out_path=out_path, log_path=out_path / log_name,
               suffix=checkpoint_suffix, optimizer=optimizer, scheduler=scheduler, ctx=ctx, epochs=epochs,
               batch_size=batch_size, num_workers=num_workers, resume=resume, seed=seed, save_last=save_last,
               progress=progress, log_interval=log_interval, arch=arch, num_classes=num_classes,
               desc=f"train{checkpoint_suffix}")


def cycle_batches(loader, what: str = "the outlier set"):
    """The batches of ``loader`` forever, restarting it when it runs out (ValueError naming
    ``what`` if it yields none). The first iterator is made on the call, so Outlier Exposure's
    draws from torch's RNG before the epoch's in-distribution loader starts."""
    it = iter(loader)

    def batches(it):
        while True:
            empty = True
            for batch in it:
                empty = False
                yield batch
            if empty:
                raise ValueError(f"{what} yielded no batch")
            it = iter(loader)

    return batches(it)


class _OutlierExposure(Steps):
    """The steps of :func:`train_model_oe`: the defender's loss with the Outlier Exposure term,
    and the misinformation model (a companion) trained on the same batch first."""

    def __init__(self, model, misinfo_model, misinfo_out, *, outlier_set, testset, outlier_testset,
                 batch_size, num_workers, oe_lambda, misinfo_outliers, device, optimizer_args, num_classes,
                 arch):
        super().__init__(evaluate=self._evaluate if testset is not None else None)
        self.model, self.misinfo_model, self.device = model, misinfo_model, device

        def loader(ds: Optional[Dataset]) -> Optional[DataLoader]:
            pin = device.type == "cuda"
            return None if ds is None else DataLoader(ds, batch_size=batch_size, shuffle=False,
                                                      num_workers=num_workers, pin_memory=pin)

        self.outlier_loader, self.test_loader = loader(outlier_set), loader(testset)
        self.outlier_test_loader = loader(outlier_testset)
        self.oe_lambda, self.misinfo_outliers = oe_lambda, misinfo_outliers
        self.num_classes, self.arch = num_classes, arch
        self.mis_path = Path(misinfo_out) if misinfo_model is not None else None
        self.mis_test_acc = -1.0
        if misinfo_model is not None:
            misinfo_model.to(device)
            self.companions = (("misinfo", misinfo_model, *_sgd_and_step_lr(misinfo_model, *optimizer_args)),)
            self.logs = (self.mis_path / "train.log.tsv",)

    def start_epoch(self) -> None:
        self.outliers = None if self.outlier_loader is None else cycle_batches(self.outlier_loader)
        self.oe_sum = self.mis_sum = 0.0
        self.mis_correct = self.total = 0

    def loss(self, net, inputs, targets):
        b = inputs.shape[0]
        if self.outliers is not None:
            pin = self.device.type == "cuda"
            x_all = torch.cat([inputs, next(self.outliers)[0].to(self.device, non_blocking=pin)])
            logits = net(x_all)
            loss_oe = uniform_cross_entropy(logits[b:])
            loss = F.cross_entropy(logits[:b], targets) + self.oe_lambda * loss_oe
            self.oe_sum += float(loss_oe.item())
        else:
            x_all, logits = inputs, net(inputs)
            loss = F.cross_entropy(logits, targets)
        if self.misinfo_model is not None:
            if self.outliers is not None and self.misinfo_outliers:
                mis_x, mis_y = x_all, torch.cat([targets, logits[b:].detach().argmax(1)])
            else:
                mis_x, mis_y = inputs, targets
            mis_logits = self.misinfo_model(mis_x)
            loss_m = misinformation_loss(mis_logits, mis_y)
            optimizer_step(self.companions[0][2], loss_m)
            self.mis_sum += float(loss_m.item())
            self.mis_correct += int(mis_logits[:b].argmax(1).eq(targets).sum().item())
        self.total += b
        return loss, logits[:b]

    def _evaluate(self) -> Tuple[float, float]:
        """The test loss is the mean over test batches of CE (+ λ · the uniform CE of the paired
        outlier test batch); the misinformation model's accuracy is kept for the record."""
        if self.misinfo_model is not None:
            self.misinfo_model.eval()
        outliers = None if self.outlier_test_loader is None else cycle_batches(self.outlier_test_loader)
        counts = [0, 0]  # batches, misinformation-model hits

        def criterion(logits: Tensor, targets: Tensor) -> Tensor:
            loss = F.cross_entropy(logits, targets)
            if outliers is not None:
                outlier_logits = self.model(next(outliers)[0].to(self.device))
                loss = loss + self.oe_lambda * uniform_cross_entropy(outlier_logits)
            return loss

        def count(inputs: Tensor, targets: Tensor) -> None:
            counts[0] += 1
            if self.misinfo_model is not None:
                counts[1] += int(self.misinfo_model(inputs).argmax(1).eq(targets).sum().item())

        loss_sum, correct, total = _eval_sums(self.model, self.test_loader, self.device, criterion,
                                              on_batch=count)
        if total == 0:
            raise ValueError("the test set yielded no samples")
        self.mis_test_acc = 100.0 * counts[1] / total if self.misinfo_model is not None else -1.0
        return loss_sum / counts[0], 100.0 * correct / total

    def epoch_record(self, run_id: str, epoch: int) -> Dict[str, float]:
        n = max(self.total, 1)
        mis_train_acc = 100.0 * self.mis_correct / n
        if self.mis_path is not None:
            rows = [[run_id, epoch, "train", self.mis_sum / n, mis_train_acc, -1],
                    [run_id, epoch, "test", -1, self.mis_test_acc, -1]]
            append_tsv(self.logs[0], LOG_COLUMNS, rows)
        return {"oe_loss": self.oe_sum / n, "misinfo_loss": self.mis_sum / n,
                "misinfo_train_acc": mis_train_acc, "misinfo_test_acc": self.mis_test_acc}

    def finish(self, epochs: int) -> None:
        if self.mis_path is not None and epochs >= 1:
            save_checkpoint(self.mis_path / "checkpoint.pth.tar", self.misinfo_model, arch=self.arch,
                            epoch=epochs, best_acc=self.mis_test_acc, num_classes=self.num_classes)
        self.model.eval()
        if self.misinfo_model is not None:
            self.misinfo_model.eval()


def train_model_oe(model: nn.Module, trainset: Dataset, out_path: PathLike, *, outlier_set: Optional[Dataset],
                   oe_lambda: float = 1.0, misinfo_model: Optional[nn.Module] = None,
                   misinfo_out: Optional[PathLike] = None, misinfo_outliers: bool = True,
                   testset: Optional[Dataset] = None, outlier_testset: Optional[Dataset] = None,
                   batch_size: int = 64, epochs: int = 100, lr: float = 0.1, momentum: float = 0.5,
                   weight_decay: float = 5e-4, lr_step: int = 30, lr_gamma: float = 0.1,
                   device: Union[str, torch.device, None] = None, num_workers: int = 0,
                   arch: Optional[str] = None, progress: bool = True, resume: Union[None, bool, str] = None,
                   log_interval: int = 100, num_classes: Optional[int] = None
                   ) -> Tuple[nn.Module, Optional[nn.Module], Dict[str, Any]]:
    """Trains a defender with Outlier Exposure and, jointly, Adaptive Misinformation's
    misinformation model (``docs/differences.md``: Adaptive Misinformation, Training).

    Per step, an in-distribution batch (x, y) and the next batch x_o of the unshuffled outlier
    set are concatenated for **one** defender forward; its loss is ``CE(z_ID, y) + oe_lambda ·
    uniform_cross_entropy(z_OE)``. The misinformation model steps first, on the same batch
    labelled y and the defender's argmax on the outliers (``misinfo_outliers=False``: on the
    in-distribution part only), with :func:`~ppoison_ext.losses.misinformation_loss`. Both use
    SGD and StepLR; ``outlier_set=None`` trains the defender with plain CE.

    Files in ``out_path`` as :func:`train_model`'s (``last.pth.tar`` holds both models); the
    test row's loss is the mean over test batches of CE + ``oe_lambda`` × the uniform CE of the
    paired ``outlier_testset`` batch. ``misinfo_out`` (required with ``misinfo_model``) gets
    the misinformation model's final ``checkpoint.pth.tar`` and ``train.log.tsv``. Single
    process only. Returns ``(model, misinfo_model, summary)``, the summary as
    :func:`train_model`'s plus ``misinfo_checkpoint`` and per-epoch OE and misinformation stats.
    """
    (arch, num_classes, batch_size, epochs, lr, momentum, weight_decay, lr_step, lr_gamma, num_workers,
     log_interval) = _check_common(model, trainset, arch, num_classes, batch_size, epochs, lr, momentum,
                                   weight_decay, lr_step, lr_gamma, num_workers, log_interval)
    for name, ds in (("outlier_set", outlier_set), ("testset", testset),
                     ("outlier_testset", outlier_testset)):
        _check_dataset(name, ds)
    if misinfo_model is not None and not isinstance(misinfo_model, nn.Module):
        raise TypeError(f"misinfo_model must be a torch.nn.Module or None, got "
                        f"{type(misinfo_model).__name__}")
    if misinfo_model is not None and misinfo_out is None:
        raise ValueError("misinfo_out (the misinformation model's folder) is required with misinfo_model")
    check_bools(misinfo_outliers=misinfo_outliers)
    if outlier_set is not None and len(outlier_set) == 0:
        raise ValueError("outlier_set is empty")
    oe_lambda = real_arg(oe_lambda, "oe_lambda")
    if resume not in (None, False, True, "auto"):
        raise ValueError(f"resume must be None, False, True or 'auto' with outlier exposure, got {resume!r}")
    if D.launched_with_torchrun():
        raise ValueError("train_model_oe runs in a single process; launch it without torchrun")
    device = _training_device(device)
    out_path = Path(out_path)
    out_path.mkdir(parents=True, exist_ok=True)
    if misinfo_model is not None:
        Path(misinfo_out).mkdir(parents=True, exist_ok=True)
    model.to(device)
    optimizer_args = (lr, momentum, weight_decay, lr_step, lr_gamma)
    optimizer, scheduler = _sgd_and_step_lr(model, *optimizer_args)
    steps = _OutlierExposure(model, misinfo_model, misinfo_out, outlier_set=outlier_set, testset=testset,
                             outlier_testset=outlier_testset, batch_size=batch_size, num_workers=num_workers,
                             oe_lambda=oe_lambda, misinfo_outliers=misinfo_outliers, device=device,
                             optimizer_args=optimizer_args, num_classes=num_classes, arch=arch)
    misinfo_checkpoint = None if steps.mis_path is None else str(steps.mis_path / "checkpoint.pth.tar")
    model, summary = fit(model, trainset, steps, out_path=out_path, log_path=out_path / "train.log.tsv",
                         optimizer=optimizer, scheduler=scheduler, device=device, epochs=epochs,
                         batch_size=batch_size, num_workers=num_workers, resume=resume, save_last=True,
                         progress=progress, log_interval=log_interval, arch=arch, num_classes=num_classes,
                         desc="train-oe", summary_extra={"misinfo_checkpoint": misinfo_checkpoint})
    return model, misinfo_model, summary
