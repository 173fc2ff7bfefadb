"""Training loops (the reference's Knockoff Nets ``knockoff/utils/model.py``), resumable.

:func:`train_model` trains a model for ``epochs`` epochs:

* SGD(lr, momentum, weight_decay=5e-4) unless an ``optimizer`` is given, and
  ``StepLR(lr_step, lr_gamma)`` stepped **after** each epoch (epochs 1..lr_step use lr).
* ``checkpoint{suffix}.pth.tar`` is rewritten whenever the epoch's test accuracy is
  ``>=`` the best so far, which means every epoch when there is no test set. Its
  ``best_acc`` is the test accuracy of *that* epoch.
* ``train{suffix}.log.tsv`` is appended to (header only when new): columns
  ``run_id epoch split loss accuracy best_accuracy``, a ``train`` and a ``test`` row per
  epoch. The losses keep the reference's normalisation quirk, so logs stay comparable: the
  **sum of the per-batch mean losses divided by the number of samples** (about mean loss /
  batch size). Train accuracy compares the argmax of the logits with the argmax of soft
  targets. Without a test set the test row is ``-1 -1 -1``.

Files, resuming and the rest (deliberate differences from the reference:
``docs/differences.md``):

* Resumable. After every epoch ``last{suffix}.pth.tar`` holds the model, optimizer,
  scheduler and RNG states, the epoch just finished and the history; ``resume='auto'``
  continues a killed run from there, bit for bit (rows a killed run logged for an
  unfinished epoch are dropped from the log). ``resume=<path>`` continues from a
  checkpoint at the epoch *after* the saved one, with its scheduler state (a checkpoint
  without one fast-forwards the schedule by the saved epoch count).
* Checkpoints hold the architecture name, not the pickled class, so they load with
  ``torch.load(weights_only=True)`` (:mod:`ppoison_ext.checkpoint`); every file is written
  atomically.
* ``weighted_loss`` takes the class counts from ``targets`` (or ``samples``), so it works
  on torchvision MNIST/CIFAR and on subsets.
* Under ``torchrun`` the loop runs data-parallel (:mod:`ppoison_ext.distributed`).
* :func:`train_model_oe` trains a defender with Outlier Exposure and Adaptive
  Misinformation's misinformation model jointly (same files, resumable with ``"auto"``).
* Nothing is printed: progress goes to a tqdm bar on stderr (``progress=False`` disables
  it) and messages to :mod:`logging`.
"""

from __future__ import annotations

import datetime
import logging
import math
import operator
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from . import distributed as D
from .checkpoint import load_checkpoint, save_checkpoint
from .fileio import atomic_write_text
from .losses import misinformation_loss, soft_cross_entropy, uniform_cross_entropy
from .models.heads import num_classes_of

logger = logging.getLogger(__name__)

__all__ = [
    "soft_cross_entropy",
    "get_optimizer",
    "OPTIMIZERS",
    "seed_everything",
    "optimizer_step",
    "class_weights",
    "test_step",
    "train_model",
    "train_model_oe",
    "training_state",
    "LOG_COLUMNS",
]

#: Header of ``train{suffix}.log.tsv``.
LOG_COLUMNS = ["run_id", "epoch", "split", "loss", "accuracy", "best_accuracy"]

#: Names accepted by :func:`get_optimizer` (the reference's ``--optimizer_choice``).
OPTIMIZERS = ("sgd", "sgdm", "adam", "adagrad")

PathLike = Union[str, "Path"]


def get_optimizer(params, name: str = "sgdm", lr: float = 0.01, momentum: float = 0.5,
                  weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Optimizer by name, as the reference's ``get_optimizer``: ``sgd`` → SGD(lr), ``sgdm`` →
    SGD(lr, momentum), ``adam`` → Adam(), ``adagrad`` → Adagrad().

    ``adam`` and ``adagrad`` **ignore** ``lr`` and ``momentum`` and use the library defaults
    (Adam lr 1e-3, Adagrad lr 1e-2), as the reference does, so its recipes give its results.
    No weight decay unless given (attacker training uses none).

    Raises:
        ValueError: unknown ``name``, negative ``lr``/``momentum``/``weight_decay``.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {list(OPTIMIZERS)}, got {name!r}")
    for arg, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{arg} must be a number >= 0, got {v!r}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    logger.debug("get_optimizer(%r): lr=%s ignored, library default used (as the reference)", name, lr)
    if name == "adam":
        return torch.optim.Adam(params, weight_decay=weight_decay)
    return torch.optim.Adagrad(params, weight_decay=weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, *, set_to_none: bool = True) -> None:
    """One update of every loop in the package: clear the gradients, backpropagate ``loss``, step."""
    optimizer.zero_grad(set_to_none=set_to_none)
    loss.backward()
    optimizer.step()


def seed_everything(seed: int) -> None:
    """Seeds Python's ``random``, NumPy's legacy global RNG and torch (CPU and CUDA)."""
    seed = operator.index(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- helpers -----------------------------------------------------------------------------------


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
    """Class weights ``w_c = min_c' count_c' / count_c`` (float32 [K]).

    Counts come from the dataset's ``targets`` (argmax for soft targets), ``samples``, a
    TensorDataset's second tensor, or a Subset of those.

    Raises:
        ValueError: the labels cannot be read, or a class has no sample.
    """
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
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        return len(classes)
    inner = getattr(dataset, "dataset", None)
    if inner is not None and hasattr(inner, "classes"):
        return len(inner.classes)
    return num_classes_of(model)


def _labels(targets: Tensor) -> Tensor:
    return targets.argmax(1) if targets.dim() == 2 else targets


def _check_positive_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _check_nonneg(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_loop_settings(batch_size, epochs, lr, momentum, weight_decay, lr_step, lr_gamma, num_workers,
                         log_interval) -> tuple:
    """The training loops' shared settings, checked and converted (ValueError naming the first bad one)."""
    return (_check_positive_int("batch_size", batch_size), _check_positive_int("epochs", epochs, 0),
            _check_nonneg("lr", lr), _check_nonneg("momentum", momentum),
            _check_nonneg("weight_decay", weight_decay), _check_positive_int("lr_step", lr_step),
            _check_nonneg("lr_gamma", lr_gamma), _check_positive_int("num_workers", num_workers, 0),
            _check_positive_int("log_interval", log_interval))


def _eval_sums(model: nn.Module, loader, device: torch.device, criterion: Callable,
               progress: bool = False, desc: str = "test") -> Tuple[float, int, int]:
    """(Σ per-batch mean loss, #correct, #samples) over ``loader`` in eval mode."""
    model.eval()
    loss_sum, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for inputs, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            loss_sum += float(criterion(outputs, targets).item())
            correct += int(outputs.argmax(1).eq(_labels(targets)).sum().item())
            total += int(targets.size(0))
    return loss_sum, correct, total


def _default_criterion(weight: Optional[Tensor]):
    def criterion(outputs: Tensor, targets: Tensor) -> Tensor:
        if targets.dim() == 2:
            return soft_cross_entropy(outputs, targets, weight)
        return F.cross_entropy(outputs, targets, weight=weight)
    return criterion


def test_step(model: nn.Module, loader, device: Union[str, torch.device, None] = None,
              criterion: Optional[Callable] = None, *, progress: bool = False) -> Tuple[float, float]:
    """Evaluates ``model`` on ``loader`` (the reference's ``test_step``).

    Args:
        model: put in eval mode (and left there).
        loader: yields (inputs, targets); hard int labels or soft [B, K] targets.
        device: where inputs go (default: the model's device).
        criterion: loss of (outputs, targets); default cross-entropy (soft CE for 2-D targets).
        progress: show a tqdm bar.

    Returns:
        ``(loss, accuracy)``: ``loss`` is the sum of the per-batch mean losses divided by
        the number of samples (the reference's normalisation), ``accuracy`` in percent
        (argmax of the outputs vs the label, or the argmax of soft targets).
    """
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    crit = criterion if criterion is not None else _default_criterion(None)
    loss_sum, correct, total = _eval_sums(model, loader, torch.device(device), crit, progress)
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


def _fmt(v: Any) -> str:
    return str(v)


def _append_log(path: Path, rows: Sequence[Sequence[Any]]) -> None:
    old = path.read_text() if path.exists() else "\t".join(LOG_COLUMNS) + "\n"
    if old and not old.endswith("\n"):
        old += "\n"
    atomic_write_text(path, old + "".join("\t".join(_fmt(c) for c in r) + "\n" for r in rows))


def _drop_unfinished_rows(path: Path, run_id: str, done: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        cols = line.split("\t")
        if i > 0 and len(cols) >= 2 and cols[0] == run_id:
            try:
                if int(cols[1]) > done:
                    continue
            except ValueError:
                pass
        kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "\n".join(kept) + "\n")


def _resolve_resume(resume: Any, out_path: Path, suffix: str) -> Optional[Path]:
    if resume is None or resume is False:
        return None
    if resume is True or (isinstance(resume, str) and resume == "auto"):
        p = _last_path(out_path, suffix)
        return p if p.is_file() else None
    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"resume={str(resume)!r}: no such checkpoint file")
    return p


# --- the training loop ---------------------------------------------------------------------------


def train_model(
    model: nn.Module,
    trainset: Dataset,
    out_path: PathLike,
    *,
    testset: Optional[Dataset] = None,
    batch_size: int = 64,
    epochs: int = 100,
    lr: float = 0.1,
    momentum: float = 0.5,
    weight_decay: float = 5e-4,
    lr_step: int = 30,
    lr_gamma: float = 0.1,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    criterion: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    criterion_test: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    weighted_loss: bool = False,
    checkpoint_suffix: str = "",
    log_suffix: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 0,
    seed: Optional[int] = None,
    arch: Optional[str] = None,
    progress: bool = True,
    resume: Union[None, bool, str, PathLike] = None,
    save_last: bool = True,
    log_interval: int = 100,
    num_classes: Optional[int] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Trains ``model`` on ``trainset`` (see the module docs).

    Args:
        model: the model (moved to ``device``; trained in place).
        trainset: yields (input, target); targets are int labels or soft [K] vectors.
        out_path: folder for ``checkpoint{suffix}.pth.tar``, ``train{suffix}.log.tsv``
            and ``last{suffix}.pth.tar`` (created).
        testset: evaluated after every epoch (hard labels); None logs -1s.
        batch_size, epochs, lr, momentum, weight_decay: SGD settings when no
            ``optimizer`` is given (defaults: the victim recipe, 64, 100, 0.1, 0.5, 5e-4).
        lr_step, lr_gamma: ``StepLR`` stepped after each epoch (ignored with ``scheduler``).
        optimizer: use this optimizer (on ``model``'s parameters) instead of SGD.
        scheduler: use this scheduler instead of ``StepLR``.
        criterion: training loss of (logits, targets); default cross-entropy (hard
            labels), soft cross-entropy for 2-D targets. Pass :func:`soft_cross_entropy`
            for transfer sets.
        criterion_test: test loss; default cross-entropy.
        weighted_loss: weight the default losses by :func:`class_weights` (the test loss
            too).
        checkpoint_suffix: file-name suffix, e.g. ``".1000"``.
        log_suffix: suffix of the log file (default: ``checkpoint_suffix``).
        device: training device (default CUDA if available, else CPU; a CUDA device falls
            back to the CPU when there is no GPU). Under ``torchrun`` a CUDA device becomes
            ``cuda:LOCAL_RANK``.
        num_workers: DataLoader workers.
        seed: if given, :func:`seed_everything` before training (not when resuming,
            which restores the saved RNG states instead).
        arch: architecture name stored in checkpoints (default: the class name).
        progress: show tqdm bars (stderr; rank 0 only).
        resume: None/False: start over (the log is still appended to);
            ``"auto"``/True: continue from ``last{suffix}.pth.tar`` if it exists (a run
            whose epochs are all done just loads its final state and returns); a path:
            continue from that checkpoint.
        save_last: write ``last{suffix}.pth.tar`` after every epoch (needed for resuming).
        log_interval: log a progress message every this many batches (INFO).
        num_classes: K for class weights / checkpoints (default: inferred).

    Returns:
        ``(model, summary)``: the trained model (unwrapped, in eval mode when a test set
        was evaluated) and a dict with ``best_test_acc``,
        ``best_train_acc``, ``epochs_done``, ``history`` (one dict per epoch: ``epoch``,
        ``lr``, ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``),
        ``checkpoint``, ``log``, ``last``, ``run_id``, ``resumed_from`` (epoch or None)
        and ``skipped`` (True when a finished run was only reloaded).

    Raises:
        ValueError / TypeError: invalid arguments, naming them.
        FileNotFoundError: ``resume`` names a missing file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(trainset, Dataset):
        raise TypeError(f"trainset must be a torch Dataset, got {type(trainset).__name__}")
    if testset is not None and not isinstance(testset, Dataset):
        raise TypeError(f"testset must be a torch Dataset or None, got {type(testset).__name__}")
    (batch_size, epochs, lr, momentum, weight_decay, lr_step, lr_gamma, num_workers,
     log_interval) = _check_loop_settings(batch_size, epochs, lr, momentum, weight_decay, lr_step, lr_gamma,
                                          num_workers, log_interval)
    if not isinstance(checkpoint_suffix, str):
        raise TypeError(f"checkpoint_suffix must be a str, got {type(checkpoint_suffix).__name__}")
    if log_suffix is not None and not isinstance(log_suffix, str):
        raise TypeError(f"log_suffix must be a str or None, got {type(log_suffix).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if len(trainset) == 0:
        raise ValueError("trainset is empty")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available; training on the CPU", device)
        device = torch.device("cpu")

    ctx = D.init_distributed(device)
    device = ctx.device
    main = ctx.is_main
    out_path = Path(out_path)
    if main:
        out_path.mkdir(parents=True, exist_ok=True)
    suffix = checkpoint_suffix
    log_path = out_path / f"train{suffix if log_suffix is None else log_suffix}.log.tsv"
    ckpt_path = out_path / f"checkpoint{suffix}.pth.tar"
    last_path = _last_path(out_path, suffix)
    arch = arch if arch is not None else type(model).__name__
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str (the architecture name), got {type(arch).__name__}")
    if num_classes is None:
        num_classes = _num_classes_of(model, trainset)

    model.to(device)
    weight = None
    if weighted_loss:
        if num_classes is None:
            raise ValueError("weighted_loss needs num_classes")
        weight = class_weights(trainset, num_classes).to(device)
        logger.info("class weights: %s", weight.tolist())
    crit_train = criterion if criterion is not None else _default_criterion(weight)
    crit_test = criterion_test if criterion_test is not None else (
        lambda o, t: F.cross_entropy(o, _labels(t), weight=weight))
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if scheduler is None:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)

    def _save_last(epoch: int, test_acc: float) -> None:
        sched = scheduler.state_dict() if hasattr(scheduler, "state_dict") else None
        extra = {"scheduler": sched, "epochs": epochs, "run_id": run_id, "best_train_acc": best_train_acc,
                 "best_test_acc": best_test_acc, "history": history, **_rng_state()}
        save_checkpoint(last_path, model, arch=arch, epoch=epoch, best_acc=test_acc, optimizer=optimizer,
                        num_classes=num_classes, extra=extra)

    # ----- resume
    start_epoch = 1
    best_train_acc, best_test_acc = -1.0, -1.0
    history: List[Dict[str, float]] = []
    run_id = str(datetime.datetime.now())
    resumed_from = None
    resume_file = _resolve_resume(resume, out_path, suffix)
    if resume_file is not None:
        ckpt = load_checkpoint(resume_file, model, map_location=device)
        done = int(ckpt.get("epoch", 0))
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        else:  # a checkpoint without scheduler state (e.g. a converted reference one): fast-forward
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(done):
                    scheduler.step()
        best_test_acc = float(ckpt.get("best_test_acc", ckpt.get("best_acc", -1.0)))
        best_train_acc = float(ckpt.get("best_train_acc", -1.0))
        history = [dict(h) for h in ckpt.get("history", [])]
        run_id = ckpt.get("run_id", run_id)
        _set_rng_state(ckpt)
        start_epoch = done + 1
        resumed_from = done
        if main:
            _drop_unfinished_rows(log_path, run_id, done)
        logger.info("resuming %s from %s: %d epoch(s) done", log_path.name, resume_file.name, done)
    else:
        if seed is not None:
            seed_everything(seed)
        if main and save_last and epochs >= 1:
            # epoch 0: claims the run id before any log row is written, so that rows of a run
            # killed inside its first epoch are recognised and dropped on resume
            _save_last(0, -1.0)
    D.barrier()

    summary: Dict[str, Any] = {
        "checkpoint": str(ckpt_path), "log": str(log_path), "last": str(last_path) if save_last else None,
        "run_id": run_id, "resumed_from": resumed_from,
        "skipped": start_epoch > epochs and resumed_from is not None,
    }
    if start_epoch > epochs:
        model.eval()
        summary.update(best_test_acc=best_test_acc, best_train_acc=best_train_acc,
                       epochs_done=start_epoch - 1, history=history)
        return model, summary

    # ----- data
    pin = device.type == "cuda"
    if ctx.distributed:
        per_rank = max(1, math.ceil(batch_size / ctx.world_size))
        sampler = DistributedSampler(trainset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=0 if seed is None else int(seed))
        train_loader = DataLoader(trainset, batch_size=per_rank, sampler=sampler, num_workers=num_workers,
                                  pin_memory=pin)
    else:
        sampler = None
        train_loader = DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                                  pin_memory=pin)
    test_loader = None
    if testset is not None:
        shard = testset if not ctx.distributed else Subset(
            testset, D.shard_indices(len(testset), ctx.rank, ctx.world_size))
        test_loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                 pin_memory=pin)
    net = D.wrap_ddp(model, ctx)

    show = progress and main
    bar = tqdm(range(start_epoch, epochs + 1), desc=f"train{suffix}", disable=not show, unit="epoch",
               initial=start_epoch - 1, total=epochs)
    test_loss, test_acc = -1.0, -1.0
    for epoch in bar:
        if sampler is not None:
            sampler.set_epoch(epoch)
        lr_now = float(optimizer.param_groups[0]["lr"])
        # -- train step
        net.train()
        loss_sum, correct, total = 0.0, 0, 0
        for batch_idx, (inputs, targets) in enumerate(
                tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not show, unit="batch")):
            inputs, targets = inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)
            optimizer.zero_grad()
            outputs = net(inputs)
            loss = crit_train(outputs, targets)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.item())
            correct += int(outputs.argmax(1).eq(_labels(targets)).sum().item())
            total += int(targets.size(0))
            if (batch_idx + 1) % log_interval == 0:
                logger.info("[train] epoch %d [%d/%d]\tloss %.6f\tacc %.1f", epoch, total,
                            len(train_loader.dataset), loss_sum / total, 100.0 * correct / total)
        loss_sum, correct, total = D.all_reduce_sum([loss_sum, correct, total], device)
        train_loss, train_acc = loss_sum / max(total, 1), 100.0 * correct / max(total, 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            scheduler.step()
        best_train_acc = max(best_train_acc, train_acc)
        # -- test step
        if test_loader is not None:
            tl, tc, tt = _eval_sums(model, test_loader, device, crit_test)  # unwrapped: shards may differ
            tl, tc, tt = D.all_reduce_sum([tl, tc, tt], device)
            test_loss, test_acc = tl / max(tt, 1), 100.0 * tc / max(tt, 1)
            best_test_acc = max(best_test_acc, test_acc)
        history.append({"epoch": epoch, "lr": lr_now, "train_loss": train_loss, "train_acc": train_acc,
                        "test_loss": test_loss, "test_acc": test_acc})
        bar.set_postfix(loss=f"{train_loss:.4g}", acc=f"{train_acc:.1f}", test=f"{test_acc:.1f}")
        logger.info("epoch %d/%d: train loss %.6g acc %.2f; test loss %.6g acc %.2f (best %.2f)", epoch,
                    epochs, train_loss, train_acc, test_loss, test_acc, best_test_acc)
        if main:
            sched_state = scheduler.state_dict() if hasattr(scheduler, "state_dict") else None
            if test_acc >= best_test_acc:
                save_checkpoint(ckpt_path, model, arch=arch, epoch=epoch, best_acc=test_acc,
                                optimizer=optimizer, num_classes=num_classes,
                                extra={"scheduler": sched_state})
            _append_log(log_path, [[run_id, epoch, "train", train_loss, train_acc, best_train_acc],
                                   [run_id, epoch, "test", test_loss, test_acc, best_test_acc]])
            if save_last:  # written last: marks the epoch as done
                _save_last(epoch, test_acc)
        D.barrier()
    bar.close()
    summary.update(best_test_acc=best_test_acc, best_train_acc=best_train_acc, epochs_done=epochs,
                   history=history)
    return model, summary


# --- Outlier Exposure and the misinformation model (Adaptive Misinformation) --------------------


def _oe_batches(loader):
    """The next batch of ``loader`` forever, restarting it when it runs out. The first
    iterator is made here, before the epoch's in-distribution loader starts (as the original
    orders them; DataLoader iterators draw from torch's RNG)."""
    it = iter(loader)

    def batches(it):
        while True:
            try:
                yield next(it)
            except StopIteration:
                it = iter(loader)
                try:
                    yield next(it)
                except StopIteration:
                    raise ValueError("the outlier set yielded no batch") from None

    return batches(it)


def train_model_oe(
    model: nn.Module,
    trainset: Dataset,
    out_path: PathLike,
    *,
    outlier_set: Optional[Dataset],
    oe_lambda: float = 1.0,
    misinfo_model: Optional[nn.Module] = None,
    misinfo_out: Optional[PathLike] = None,
    misinfo_outliers: bool = True,
    testset: Optional[Dataset] = None,
    outlier_testset: Optional[Dataset] = None,
    batch_size: int = 64,
    epochs: int = 100,
    lr: float = 0.1,
    momentum: float = 0.5,
    weight_decay: float = 5e-4,
    lr_step: int = 30,
    lr_gamma: float = 0.1,
    device: Union[str, torch.device, None] = None,
    num_workers: int = 0,
    arch: Optional[str] = None,
    progress: bool = True,
    resume: Union[None, bool, str] = None,
    log_interval: int = 100,
    num_classes: Optional[int] = None,
) -> Tuple[nn.Module, Optional[nn.Module], Dict[str, Any]]:
    """Trains a defender with Outlier Exposure and, jointly, Adaptive Misinformation's
    misinformation model, as the original's training loop (``AM:admis/utils/model.py``).

    Per step: an in-distribution batch (x, y) (shuffled) and the next batch x_o of the outlier
    set (unshuffled, same batch size, restarted when it runs out, a new pass every epoch) are
    concatenated and the defender runs **one** forward on the concatenation. Its loss is
    ``CE(z_ID, y) + oe_lambda · uniform_cross_entropy(z_OE)``
    (:func:`ppoison_ext.losses.uniform_cross_entropy`). The misinformation model runs on the
    same concatenated batch, labelled with y for the in-distribution part and with the
    defender's argmax on the outliers (detached), and is trained with
    :func:`ppoison_ext.losses.misinformation_loss` (−log(1 − p_label + 1e-7) up to a constant);
    ``misinfo_outliers=False`` trains it on the in-distribution part only (ModelGuard's recipe).
    It takes its optimizer step first, then the defender. Both use SGD(lr, momentum,
    weight_decay) and StepLR(lr_step, lr_gamma) stepped after each epoch. ``outlier_set=None``
    trains the defender with plain cross-entropy (and the misinformation model on the
    in-distribution batches).

    Files in ``out_path``: ``checkpoint.pth.tar`` (the defender, whenever the epoch's test
    accuracy is ``>=`` the best so far), ``train.log.tsv`` (:data:`LOG_COLUMNS`; the train row's
    loss is the total loss, summed over batches and divided by the number of in-distribution
    samples, the original's normalisation; the test row's is the mean over test batches of CE
    plus ``oe_lambda`` × the uniform cross-entropy of the paired ``outlier_testset`` batch, when
    one is given) and ``last.pth.tar`` (both models' states, for ``resume="auto"``). In
    ``misinfo_out``: ``checkpoint.pth.tar`` of the misinformation model, written once, at the
    end (as the original), and its ``train.log.tsv`` (its own loss; accuracy against the true
    labels of the in-distribution data, which it learns to avoid).

    Args:
        model: the defender (trained in place).
        trainset: in-distribution data, (image, int label).
        out_path: the defender's folder.
        outlier_set: the Outlier Exposure data (labels ignored), or None.
        oe_lambda: λ ≥ 0 (the original's README: 1; its argparse default 0.0 disables OE).
        misinfo_model: the misinformation model (trained in place), or None.
        misinfo_out: its folder (required with ``misinfo_model``).
        misinfo_outliers: train it on the outliers too (the original) or not (ModelGuard).
        testset: evaluated after every epoch; ``outlier_testset``: its OE loss term.
        batch_size, epochs, lr, momentum, weight_decay, lr_step, lr_gamma: as
            :func:`train_model`.
        device, num_workers, arch, progress, log_interval, num_classes: as :func:`train_model`.
        resume: None/False start over; ``"auto"``/True continue from ``last.pth.tar`` when
            present. Single process only (no ``torchrun``).

    Returns:
        ``(model, misinfo_model, summary)``; summary as :func:`train_model`'s, its history
        rows with ``oe_loss``, ``misinfo_loss``, ``misinfo_train_acc``, ``misinfo_test_acc``
        added.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, ds in (("trainset", trainset), ("outlier_set", outlier_set), ("testset", testset),
                     ("outlier_testset", outlier_testset)):
        if ds is not None and not isinstance(ds, Dataset):
            raise TypeError(f"{name} must be a torch Dataset{'' if name == 'trainset' else ' or None'}, "
                            f"got {type(ds).__name__}")
    if trainset is None:
        raise TypeError("trainset must be a torch Dataset, got NoneType")
    if misinfo_model is not None and not isinstance(misinfo_model, nn.Module):
        raise TypeError(f"misinfo_model must be a torch.nn.Module or None, got {type(misinfo_model).__name__}")
    if misinfo_model is not None and misinfo_out is None:
        raise ValueError("misinfo_out (the misinformation model's folder) is required with misinfo_model")
    if not isinstance(misinfo_outliers, bool):
        raise TypeError(f"misinfo_outliers must be a bool, got {type(misinfo_outliers).__name__}")
    if outlier_set is not None and len(outlier_set) == 0:
        raise ValueError("outlier_set is empty")
    if len(trainset) == 0:
        raise ValueError("trainset is empty")
    oe_lambda = _check_nonneg("oe_lambda", oe_lambda)
    (batch_size, epochs, lr, momentum, weight_decay, lr_step, lr_gamma, num_workers,
     log_interval) = _check_loop_settings(batch_size, epochs, lr, momentum, weight_decay, lr_step, lr_gamma,
                                          num_workers, log_interval)
    if resume not in (None, False, True, "auto"):
        raise ValueError(f"resume must be None, False, True or 'auto' with outlier exposure, got {resume!r}")
    if D.launched_with_torchrun():
        raise ValueError("train_model_oe runs in a single process; launch it without torchrun")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("device %s requested but CUDA is not available; training on the CPU", device)
        device = torch.device("cpu")

    out_path = Path(out_path)
    out_path.mkdir(parents=True, exist_ok=True)
    mis_path = Path(misinfo_out) if misinfo_model is not None else None
    if mis_path is not None:
        mis_path.mkdir(parents=True, exist_ok=True)
    log_path, ckpt_path, last_path = out_path / "train.log.tsv", out_path / "checkpoint.pth.tar", out_path / "last.pth.tar"
    arch = arch if arch is not None else type(model).__name__
    if num_classes is None:
        num_classes = _num_classes_of(model, trainset)

    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_step, gamma=lr_gamma)
    opt_m = sched_m = None
    if misinfo_model is not None:
        misinfo_model.to(device)
        opt_m = torch.optim.SGD(misinfo_model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched_m = torch.optim.lr_scheduler.StepLR(opt_m, step_size=lr_step, gamma=lr_gamma)

    start_epoch = 1
    best_train_acc, best_test_acc = -1.0, -1.0
    history: List[Dict[str, float]] = []
    run_id = str(datetime.datetime.now())
    resumed_from = None

    def _save_last(epoch: int, test_acc: float) -> None:
        extra: Dict[str, Any] = {"scheduler": scheduler.state_dict(), "epochs": epochs, "run_id": run_id,
                                 "best_train_acc": best_train_acc, "best_test_acc": best_test_acc,
                                 "history": history, **_rng_state()}
        if misinfo_model is not None:
            extra.update(misinfo_state=misinfo_model.state_dict(), misinfo_optimizer=opt_m.state_dict(),
                         misinfo_scheduler=sched_m.state_dict())
        save_checkpoint(last_path, model, arch=arch, epoch=epoch, best_acc=test_acc, optimizer=optimizer,
                        num_classes=num_classes, extra=extra)

    resume_file = _resolve_resume(resume, out_path, "")
    if resume_file is not None:
        ckpt = load_checkpoint(resume_file, model, map_location=device)
        if misinfo_model is not None:
            if "misinfo_state" not in ckpt:
                raise ValueError(f"{resume_file} holds no misinformation model; start over without resume")
            misinfo_model.load_state_dict(ckpt["misinfo_state"])
            opt_m.load_state_dict(ckpt["misinfo_optimizer"])
            sched_m.load_state_dict(ckpt["misinfo_scheduler"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        done = int(ckpt.get("epoch", 0))
        best_test_acc = float(ckpt.get("best_test_acc", -1.0))
        best_train_acc = float(ckpt.get("best_train_acc", -1.0))
        history = [dict(h) for h in ckpt.get("history", [])]
        run_id = ckpt.get("run_id", run_id)
        _set_rng_state(ckpt)
        start_epoch, resumed_from = done + 1, done
        _drop_unfinished_rows(log_path, run_id, done)
        if mis_path is not None:
            _drop_unfinished_rows(mis_path / "train.log.tsv", run_id, done)
        logger.info("resuming outlier-exposure training from %s: %d epoch(s) done", resume_file, done)
    elif epochs >= 1:
        _save_last(0, -1.0)

    summary: Dict[str, Any] = {"checkpoint": str(ckpt_path), "log": str(log_path), "last": str(last_path),
                               "misinfo_checkpoint": None if mis_path is None else str(mis_path / "checkpoint.pth.tar"),
                               "run_id": run_id, "resumed_from": resumed_from,
                               "skipped": start_epoch > epochs and resumed_from is not None}
    pin = device.type == "cuda"
    train_loader = DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=num_workers, pin_memory=pin)
    oe_loader = None if outlier_set is None else DataLoader(outlier_set, batch_size=batch_size, shuffle=False,
                                                            num_workers=num_workers, pin_memory=pin)
    test_loader = None if testset is None else DataLoader(testset, batch_size=batch_size, shuffle=False,
                                                          num_workers=num_workers, pin_memory=pin)
    oe_test_loader = None if outlier_testset is None else DataLoader(outlier_testset, batch_size=batch_size,
                                                                     shuffle=False, num_workers=num_workers)
    show = progress
    test_loss, test_acc, mis_test_acc = -1.0, -1.0, -1.0
    for epoch in tqdm(range(start_epoch, epochs + 1), desc="train-oe", disable=not show, unit="epoch",
                      initial=start_epoch - 1, total=epochs):
        lr_now = float(optimizer.param_groups[0]["lr"])
        model.train()
        if misinfo_model is not None:
            misinfo_model.train()
        oe_iter = None if oe_loader is None else _oe_batches(oe_loader)
        sums = {"loss": 0.0, "oe": 0.0, "mis": 0.0}
        correct = mis_correct = total = 0
        for batch_idx, (inputs, targets) in enumerate(
                tqdm(train_loader, desc=f"epoch {epoch}", leave=False, disable=not show, unit="batch")):
            inputs, targets = inputs.to(device, non_blocking=pin), targets.to(device, non_blocking=pin)
            b = inputs.shape[0]
            if oe_iter is not None:
                x_oe = next(oe_iter)[0].to(device, non_blocking=pin)
                x_all = torch.cat([inputs, x_oe])
                logits = model(x_all)
                loss_oe = uniform_cross_entropy(logits[b:])
            else:
                x_all, logits, loss_oe = inputs, model(inputs), None
            loss = F.cross_entropy(logits[:b], targets)
            if loss_oe is not None:
                loss = loss + oe_lambda * loss_oe
            if misinfo_model is not None:
                if oe_iter is not None and misinfo_outliers:
                    mis_x = x_all
                    mis_y = torch.cat([targets, logits[b:].detach().argmax(1)])
                else:
                    mis_x, mis_y = inputs, targets
                mis_logits = misinfo_model(mis_x)
                loss_m = misinformation_loss(mis_logits, mis_y)
                opt_m.zero_grad()
                loss_m.backward()
                opt_m.step()
                sums["mis"] += float(loss_m.item())
                mis_correct += int(mis_logits[:b].argmax(1).eq(targets).sum().item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sums["loss"] += float(loss.item())
            sums["oe"] += 0.0 if loss_oe is None else float(loss_oe.item())
            correct += int(logits[:b].argmax(1).eq(targets).sum().item())
            total += b
            if (batch_idx + 1) % log_interval == 0:
                logger.info("[train-oe] epoch %d [%d/%d]\tloss %.6f\tacc %.1f", epoch, total,
                            len(train_loader.dataset), sums["loss"] / total, 100.0 * correct / total)
        train_loss, train_acc = sums["loss"] / max(total, 1), 100.0 * correct / max(total, 1)
        mis_train_acc = 100.0 * mis_correct / max(total, 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            scheduler.step()
            if sched_m is not None:
                sched_m.step()
        best_train_acc = max(best_train_acc, train_acc)
        if test_loader is not None:
            test_loss, test_acc, mis_test_acc = _oe_test(model, misinfo_model, test_loader, oe_test_loader,
                                                         oe_lambda, device)
            best_test_acc = max(best_test_acc, test_acc)
        history.append({"epoch": epoch, "lr": lr_now, "train_loss": train_loss, "train_acc": train_acc,
                        "test_loss": test_loss, "test_acc": test_acc, "oe_loss": sums["oe"] / max(total, 1),
                        "misinfo_loss": sums["mis"] / max(total, 1), "misinfo_train_acc": mis_train_acc,
                        "misinfo_test_acc": mis_test_acc})
        logger.info("epoch %d/%d: train loss %.6g acc %.2f; test loss %.6g acc %.2f (best %.2f); "
                    "misinformation train acc %.2f test acc %.2f", epoch, epochs, train_loss, train_acc,
                    test_loss, test_acc, best_test_acc, mis_train_acc, mis_test_acc)
        if test_acc >= best_test_acc:
            save_checkpoint(ckpt_path, model, arch=arch, epoch=epoch, best_acc=test_acc, optimizer=optimizer,
                            num_classes=num_classes, extra={"scheduler": scheduler.state_dict()})
        _append_log(log_path, [[run_id, epoch, "train", train_loss, train_acc, best_train_acc],
                               [run_id, epoch, "test", test_loss, test_acc, best_test_acc]])
        if mis_path is not None:
            _append_log(mis_path / "train.log.tsv",
                        [[run_id, epoch, "train", sums["mis"] / max(total, 1), mis_train_acc, -1],
                         [run_id, epoch, "test", -1, mis_test_acc, -1]])
        _save_last(epoch, test_acc)  # written last: marks the epoch as done
    if mis_path is not None and epochs >= 1:
        save_checkpoint(mis_path / "checkpoint.pth.tar", misinfo_model, arch=arch, epoch=epochs,
                        best_acc=mis_test_acc, num_classes=num_classes)
    model.eval()
    if misinfo_model is not None:
        misinfo_model.eval()
    summary.update(best_test_acc=best_test_acc, best_train_acc=best_train_acc, epochs_done=epochs, history=history)
    return model, misinfo_model, summary


def _oe_test(model: nn.Module, misinfo_model: Optional[nn.Module], loader, oe_loader, oe_lambda: float,
             device: torch.device) -> Tuple[float, float, float]:
    """(test loss, defender accuracy %, misinformation-model accuracy % or -1) in eval mode."""
    model.eval()
    if misinfo_model is not None:
        misinfo_model.eval()
    oe_iter = None if oe_loader is None else _oe_batches(oe_loader)
    loss_sum, batches, correct, mis_correct, total = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for inputs, targets in loader:
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            if oe_iter is not None:
                loss = loss + oe_lambda * uniform_cross_entropy(model(next(oe_iter)[0].to(device)))
            loss_sum += float(loss.item())
            batches += 1
            correct += int(logits.argmax(1).eq(targets).sum().item())
            if misinfo_model is not None:
                mis_correct += int(misinfo_model(inputs).argmax(1).eq(targets).sum().item())
            total += int(targets.shape[0])
    if total == 0:
        raise ValueError("the test set yielded no samples")
    return (loss_sum / batches, 100.0 * correct / total,
            100.0 * mis_correct / total if misinfo_model is not None else -1.0)
