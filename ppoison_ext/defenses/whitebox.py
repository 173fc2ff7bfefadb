"""White-box (online-attacker) defenses ``mad_wb``, ``reverse_sigmoid_wb``, ``rand_noise_wb``.

The defender simulates the attacker. After the inner defense answers a batch (y and y′ go to
the query log), the attacker, and the gray-box proxy unless ``model_adv_proxy_notrain``, take
one optimizer step on the soft cross-entropy to the released y′ (its one-hot top-1 with
``attacker_argmax``), summed over the batch (``step_reduction="mean"``: averaged), so MAD's
Jacobian can target the attacker as it learns. :class:`OnlineEvaluation` appends two rows to
``online.log.tsv`` each time the query count passes a multiple of ``log_every``.
``original_bugs=True`` restores two bugs of the white-box defenses (differences.md: Defenses).
"""

from __future__ import annotations

import copy
import datetime
import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_bools, check_choices, int_arg, type_arg
from ..datasets import get_dataset, get_transform
from ..fileio import append_text, atomic_write_text
from ..losses import soft_cross_entropy
from ..modeldir import dataset_name, modelfamily_for_dataset
from ..models import get_net
from ..training import get_optimizer, optimizer_step
from . import baselines, mad  # noqa: F401  (registers the inner defenses first)
from .base import (REGISTRY, Defense, DefenseOutput, boolean, build_registered, optional_str, proxy_arg,
                   register)
from .querylog import distances

__all__ = ["WhiteboxDefense", "OnlineEvaluation", "make_adv_optimizer", "WB_DEFENSES", "ONLINE_LOG",
           "ONLINE_COLUMNS", "ADV_OPTIMIZERS"]

logger = logging.getLogger(__name__)

ONLINE_LOG = "online.log.tsv"
ONLINE_COLUMNS = ["run_id", "epoch", "split", "loss", "accuracy", "best_accuracy", "l1_mean", "l1_std",
                  "l2_mean", "l2_std", "kl_mean", "kl_std"]
ADV_OPTIMIZERS = ("sgd", "sgdm", "adam")
WB_KEYS = {"model_adv": optional_str, "model_adv_proxy_notrain": boolean, "attacker_argmax": boolean,
           "adv_optimizer": str}


def make_adv_optimizer(name: str, params, *, proxy: bool = False) -> torch.optim.Optimizer:
    """The simulated attacker's optimizer: ``sgd`` lr 0.1/64; ``sgdm`` lr 0.1/64, momentum 0.5;
    ``adam`` lr 0.001/64 (for the gray-box proxy: Adam's default lr 0.001)."""
    check_choices(adv_optimizer=(name, ADV_OPTIMIZERS))
    if name == "adam":  # get_optimizer's Adam keeps the library's lr
        return torch.optim.Adam(params, lr=0.001 if proxy else 0.001 / 64)
    return get_optimizer(params, name, lr=0.1 / 64, momentum=0.5)


def _fmt(v) -> str:
    return str(float(v)) if not isinstance(v, str) else v


class OnlineEvaluation:
    """The observer appending to ``out_dir/online.log.tsv`` (header :data:`ONLINE_COLUMNS`).

    Each time the query count passes a multiple of ``log_every`` it writes a ``test`` row (the
    attacker on ``testset``: loss as Σ of batch-mean CE / N, accuracy %, best accuracy so far,
    distance statistics over all queries so far) and a ``test_vic`` row (the defended victim
    on the first ``minitest_size`` test images: mean NLL of y′ + 1e-7 renormalised, accuracy %,
    −1, distance statistics of those). ``epoch`` is the query count over ``train_size``;
    ``run_id`` tells apart the runs appending to one file.
    """

    def __init__(self, out_dir, *, testset: Optional[torch.utils.data.Dataset], train_size: Optional[int],
                 log_every: int = 1000, minitest_size: int = 1000, eval_batch_size: int = 128):
        for name, v in (("log_every", log_every), ("minitest_size", minitest_size),
                        ("eval_batch_size", eval_batch_size)):
            int_arg(v, name)
        self.testset, self.train_size = testset, train_size
        self.log_every, self.minitest_size, self.eval_batch_size = log_every, minitest_size, eval_batch_size
        self.run_id = str(datetime.datetime.now())
        self.best_test_acc = 0.0
        self._sums = np.zeros((3, 2))  # Σd and Σd² of the L1, L2 and KL distances
        self._n = self._last_log_at = self._log_events = 0
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.log_path = Path(out_dir) / ONLINE_LOG
        if not self.log_path.exists():
            self._rewrite_log([])

    def after_answer(self, wb: "WhiteboxDefense", out: DefenseOutput) -> None:
        """Adds the answer's distances (y′ before any argmax); logs when a multiple is passed."""
        d = distances(out.y, out.y_prime).cpu().numpy()
        with np.errstate(invalid="ignore"):
            self._sums[:, 0] += d.sum(0)
            self._sums[:, 1] += (d * d).sum(0)
        self._n += d.shape[0]
        if wb.call_count // self.log_every > self._last_log_at // self.log_every:
            self.log(wb)

    def _loader(self, dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False)

    def _eval_attacker(self, wb: "WhiteboxDefense", testset, device) -> tuple:
        wb.attacker.eval()
        total, correct, loss_sum = 0, 0, 0.0
        with torch.no_grad():
            for xb, yb in self._loader(testset):
                xb, yb = xb.to(device), torch.as_tensor(yb).to(device)
                z = wb.attacker(xb)
                loss_sum += F.cross_entropy(z, yb).item()
                correct += int((z.argmax(1) == yb).sum())
                total += yb.shape[0]
        if not wb.original_bugs:
            wb.attacker.train()
        return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)

    def _eval_victim(self, defense: Defense, testset, device) -> list:
        subset = torch.utils.data.Subset(testset, range(min(self.minitest_size, len(testset))))
        total, correct, nll, ds = 0, 0, 0.0, []
        with torch.no_grad():
            for xb, yb in self._loader(subset):
                xb, yb = xb.to(device), torch.as_tensor(yb)
                y = defense.victim_probs(xb)
                yp = defense.defend(xb, y).y_prime.detach().double().cpu() + 1e-7
                yp = yp / yp.sum(1, keepdim=True)
                nll += F.nll_loss(torch.log(yp), yb, reduction="sum").item()
                correct += int((yp.argmax(1) == yb).sum())
                total += yb.shape[0]
                ds.append(distances(y.detach().double().cpu(), yp))
        d = torch.cat(ds).numpy() if ds else np.zeros((0, 3))
        with np.errstate(invalid="ignore"):
            stats = [float(f(d[:, k])) for k in range(3) for f in (np.mean, np.std)]
        return [nll / max(total, 1), 100.0 * correct / max(total, 1)] + stats

    def _stats(self) -> list:
        n = max(self._n, 1)
        out = []
        with np.errstate(invalid="ignore"):
            for s, s2 in self._sums:
                mean = s / n
                var = s2 / n - mean * mean
                out += [mean, float(np.sqrt(max(var, 0.0))) if np.isfinite(var) else float("nan")]
        return out

    def log(self, wb: "WhiteboxDefense") -> None:
        """Evaluates the attacker and the defended victim; appends the two rows."""
        if self.testset is None:
            raise ValueError("online evaluation needs the victim's test set (testset=)")
        epoch = wb.call_count / self.train_size if self.train_size else float(wb.call_count)
        device = next(wb.attacker.parameters()).device
        test_loss, test_acc = self._eval_attacker(wb, self.testset, device)
        self.best_test_acc = max(self.best_test_acc, test_acc)
        vic = self._eval_victim(wb.defense, self.testset, device)
        rows = [[self.run_id, epoch, "test", test_loss, test_acc, self.best_test_acc] + self._stats(),
                [self.run_id, epoch, "test_vic", vic[0], vic[1], -1] + vic[2:]]
        append_text(self.log_path, "".join("\t".join(_fmt(c) for c in r) + "\n" for r in rows))
        self._last_log_at = wb.call_count
        self._log_events += 1
        logger.info("[%d] attacker test acc %.2f (best %.2f), defended victim acc %.2f", wb.call_count,
                    test_acc, self.best_test_acc, vic[1])

    def _rewrite_log(self, rows) -> None:
        atomic_write_text(self.log_path, "\t".join(ONLINE_COLUMNS) + "\n" + "".join(r + "\n" for r in rows))

    def get_state(self) -> Dict[str, Any]:
        return {"run_id": self.run_id, "best_test_acc": float(self.best_test_acc),
                "sums": torch.from_numpy(self._sums.copy()), "n": int(self._n),
                "last_log_at": int(self._last_log_at), "log_events": int(self._log_events)}

    def set_state(self, st: Mapping[str, Any]) -> None:
        """Restores :meth:`get_state` (``{}``: keeps the state) and drops this run's rows written
        after that point (other runs' rows are kept)."""
        if st:
            self.run_id, self.best_test_acc = str(st["run_id"]), float(st["best_test_acc"])
            self._sums = st["sums"].numpy().copy()
            self._n, self._last_log_at = int(st["n"]), int(st["last_log_at"])
            self._log_events = int(st["log_events"])
        if self.log_path.exists():
            lines = self.log_path.read_text().splitlines()[1:]
            kept, mine = [], 0
            for line in lines:
                ours = line.split("\t", 1)[0] == self.run_id
                mine += ours
                if not ours or mine <= 2 * self._log_events:
                    kept.append(line)
            if len(kept) != len(lines):
                self._rewrite_log(kept)


def _load_attacker(model_adv: Optional[str], arch: str, family: str, K: int, device) -> nn.Module:
    """A fresh init of the victim's architecture, or its weights from ``model_adv`` (a
    checkpoint file, or a folder's ``checkpoint.pth.tar``/``model_best.pth.tar``), copied by name."""
    if model_adv is None:
        return get_net(arch, family, num_classes=K).to(device)
    p = Path(model_adv)
    if p.is_dir():
        p = next((c for c in (p / "checkpoint.pth.tar", p / "model_best.pth.tar") if c.is_file()), None)
        if p is None:
            raise FileNotFoundError(f"model_adv: no checkpoint.pth.tar (or model_best.pth.tar) in "
                                    f"{model_adv}")
    elif not p.is_file():
        raise FileNotFoundError(f"model_adv: {model_adv} does not exist")
    return get_net(arch, family, pretrained=str(p), num_classes=K).to(device)


class WhiteboxDefense(Defense):
    """A defense whose released answers also train a simulated attacker online.

    ``defense`` is the inner defense (its ``model`` is the victim, its ``logger`` the query
    log; for MAD its proxy should be ``attacker`` or the gray-box ``proxy``). ``observer``
    (e.g. an :class:`OnlineEvaluation`) gets ``after_answer(self, out)`` with the inner
    defense's answer before the argmax; its ``get_state``/``set_state`` join this defense's.
    ``original_bugs``: the attacker stays in eval mode after the first evaluation and the
    proxy's optimizer holds the attacker's parameters.
    """

    stateful = True

    def __init__(self, defense: Defense, attacker: nn.Module, *, proxy: Optional[nn.Module] = None,
                 proxy_train: bool = True, attacker_argmax: bool = False, adv_optimizer: str = "sgd",
                 step_reduction: str = "sum", original_bugs: bool = False, observer=None):
        type_arg(defense, "defense", Defense, "a ppoison_ext Defense")
        type_arg(attacker, "attacker", nn.Module, "an nn.Module")
        type_arg(proxy, "proxy", nn.Module, "an nn.Module", optional=True)
        check_bools(proxy_train=proxy_train, attacker_argmax=attacker_argmax, original_bugs=original_bugs)
        check_choices(step_reduction=(step_reduction, ("sum", "mean")))
        super().__init__(defense.model, logger=defense.logger)
        self.defense, self.attacker, self.proxy, self.observer = defense, attacker.train(), proxy, observer
        self.proxy_train = proxy_train and proxy is not None
        self.attacker_argmax, self.adv_optimizer = attacker_argmax, adv_optimizer
        self.step_reduction, self.original_bugs = step_reduction, original_bugs
        self.optimizer = make_adv_optimizer(adv_optimizer, attacker.parameters())
        self.proxy_optimizer = None
        if proxy is not None:
            params = attacker.parameters() if original_bugs else proxy.parameters()
            self.proxy_optimizer = make_adv_optimizer(adv_optimizer, params, proxy=True)

    @classmethod
    def from_args(cls, name, model, args, *, logger=None, device=None, out_dir=None, whitebox=None, **_):
        """``args``: the inner defense's keys plus ``model_adv`` (see :func:`_load_attacker`),
        ``model_adv_proxy`` (``mad_wb``: a gray-box proxy folder, else MAD targets the
        attacker), ``model_adv_proxy_notrain``, ``attacker_argmax``, ``adv_optimizer``.
        ``whitebox``: ``victim_params`` (required), ``testset`` (default: the params' dataset,
        test split, under ``data_root``), ``train_size``, :class:`OnlineEvaluation`'s options,
        ``step_reduction``, ``original_bugs``. ``out_dir=None``: no online evaluation."""
        options = dict(whitebox or {})
        params = options.pop("victim_params", None)
        if params is None:
            raise ValueError(f"{name} needs the victim's params.json "
                             "(victim_dir=, or whitebox={'victim_params': ...})")
        adv_optimizer = args.pop("adv_optimizer", "sgd")
        check_choices(adv_optimizer=(adv_optimizer, ADV_OPTIMIZERS))
        device = device or next(model.parameters()).device
        dataset = dataset_name(params)
        family = modelfamily_for_dataset(dataset)
        attacker = _load_attacker(args.pop("model_adv", None), params["model_arch"], family,
                                  int(params["num_classes"]), device)
        proxy = proxy_arg(args, None, model, device, train=True)
        notrain = args.pop("model_adv_proxy_notrain", False)
        attacker_argmax = args.pop("attacker_argmax", False)
        inner_name = name[:-len("_wb")]
        inner_proxy = (proxy if proxy is not None else attacker) if inner_name == "mad" else None
        inner = build_registered(inner_name, model, args, proxy=inner_proxy, logger=logger, device=device)
        data_root = options.pop("data_root", None)
        testset, train_size = options.pop("testset", None), options.pop("train_size", None)
        evaluation = {k: options.pop(k) for k in ("log_every", "minitest_size", "eval_batch_size")
                      if k in options}
        observer = None
        if out_dir is not None:
            if testset is None:
                transform = get_transform(family, "test")
                testset = get_dataset(dataset, train=False, transform=transform, root=data_root)
            if train_size is None:
                train_size = len(get_dataset(dataset, train=True, root=data_root))
            observer = OnlineEvaluation(out_dir, testset=testset, train_size=train_size, **evaluation)
        return cls(inner, attacker, proxy=proxy, proxy_train=not notrain, attacker_argmax=attacker_argmax,
                   adv_optimizer=adv_optimizer, observer=observer, **options).to(device)

    def hparams(self) -> dict:
        return {"defense": type(self.defense).__name__, **self.defense.hparams(),
                "attacker": type(self.attacker).__name__, "gray_box": self.proxy is not None,
                "proxy_train": self.proxy_train, "attacker_argmax": self.attacker_argmax,
                "adv_optimizer": self.adv_optimizer, "step_reduction": self.step_reduction}

    @property
    def keeps_top1(self) -> bool:
        return self.defense.keeps_top1  # attacker_argmax releases the top-1 of y′ as a one-hot

    @property
    def reseedable(self) -> bool:
        return self.defense.reseedable

    def reseed(self, seed: Optional[int]) -> None:
        self.defense.reseed(seed)

    @property
    def run_id(self) -> Optional[str]:
        """The ``run_id`` of this run's ``online.log.tsv`` rows (None without online evaluation)."""
        return None if self.observer is None else self.observer.run_id

    def _step(self, model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, target: Tensor,
              set_to_none: bool = True) -> None:
        with torch.enable_grad():
            loss = soft_cross_entropy(model(x), target, reduction=self.step_reduction)
            optimizer_step(opt, loss, set_to_none=set_to_none)

    def _released(self, y_prime: Tensor) -> Tensor:
        if not self.attacker_argmax:
            return y_prime
        return torch.zeros_like(y_prime).scatter_(1, y_prime.argmax(1, keepdim=True), 1.0)

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        out = self.defense.defend(x, y)
        return out._replace(y_prime=self._released(out.y_prime))

    def _answer(self, x: Tensor) -> DefenseOutput:
        return self.defense._answer(x)  # logged as it is: y′ before the argmax

    def _after_answer(self, x: Tensor, out: DefenseOutput) -> DefenseOutput:
        released = self._released(out.y_prime)
        target = released.detach().to(next(self.attacker.parameters()).device)
        self._step(self.attacker, self.optimizer, x, target)
        if self.proxy_train:
            self._step(self.proxy, self.proxy_optimizer, x, target, set_to_none=not self.original_bugs)
        if self.observer is not None:
            self.observer.after_answer(self, out)
        return out._replace(y_prime=released)

    def get_state(self) -> Dict[str, Any]:
        """Everything that evolves with the queries (tensors and numbers only)."""
        st = {"call_count": int(self.call_count), "attacker_training": bool(self.attacker.training),
              "attacker": self.attacker.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.proxy is not None:
            st.update(proxy=self.proxy.state_dict(), proxy_optimizer=self.proxy_optimizer.state_dict())
        st = copy.deepcopy(st)  # the state dicts alias the live tensors
        if self.observer is not None:
            st.update(self.observer.get_state())
        return st

    def set_state(self, st: Mapping[str, Any]) -> None:
        """Restores :meth:`get_state` (``{}``: the state before any query) and the observer's."""
        if st:
            self.call_count = int(st["call_count"])
            self.attacker.load_state_dict(st["attacker"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.attacker.train(bool(st["attacker_training"]))
            if self.proxy is not None:
                self.proxy.load_state_dict(st["proxy"])
                self.proxy_optimizer.load_state_dict(st["proxy_optimizer"])
        if self.observer is not None:
            self.observer.set_state(st)


WB_DEFENSES = ("mad_wb", "reverse_sigmoid_wb", "rand_noise_wb")
for _name in WB_DEFENSES:  # the inner defense's keys and the simulated attacker's
    register(_name, **REGISTRY[_name[:-len("_wb")]].keys, **WB_KEYS)(WhiteboxDefense)
