"""White-box (online-attacker) defenses: ``mad_wb``, ``reverse_sigmoid_wb``, ``rand_noise_wb``
(the reference's ``MAD_WB``, ``ReverseSigmoid_WB``, ``RandomNoise_WB``). Built by
:func:`ppoison_ext.defenses.build_defense`.

The defender simulates the attacker: every answered query also trains an attacker model
online, so the defense (MAD's Jacobian) can target the attacker as it learns, and the
attacker's progress is logged. Per batch of queries:

1. the inner defense answers (y′; the undefended y and y′ go to the query log);
2. with ``attacker_argmax`` y′ becomes the one-hot top-1 label, and that is what the caller
   receives;
3. the attacker takes one optimizer step on soft cross-entropy between its prediction and
   the released y′ (and the gray-box proxy too, unless ``model_adv_proxy_notrain``);
4. each time the query count passes a multiple of ``log_every`` (1000), two rows go to
   ``online.log.tsv`` (header ``run_id epoch split loss accuracy best_accuracy l1_mean
   l1_std l2_mean l2_std kl_mean kl_std``): ``test`` (the attacker on the victim's test
   set: CE loss normalised as Σ_batches mean-loss / N at batch 128, as the reference does,
   accuracy %, best accuracy so far, distance statistics over all queries so far) and
   ``test_vic`` (the defended victim on the first 1000 test images: y′ + 1e-7
   renormalized, mean NLL, accuracy %, −1, distance statistics of those 1000). ``epoch`` is
   the query count divided by the victim training-set size. The file is appended to across
   runs (header only when new); ``run_id`` tells runs apart.

Batches, training mode, resuming:

* One optimizer step per batch on the batch's **summed** soft CE (``step_reduction
  ="sum"``), so a batch of B moves the attacker as B batch-1 steps taken at the same
  weights would; at B = 1 this is one step per query. ``"mean"`` is the plain mean.
  Logs are written when a batch crosses a multiple of ``log_every``, at the actual count.
* The attacker is put back in train mode after each evaluation, so it always trains in
  train mode. The gray-box proxy's optimizer is bound to the proxy's parameters.
  ``original_bugs=True`` (Python API only) restores two reference bugs instead: the
  attacker left in eval mode after the first log, and the proxy's optimizer bound to the
  attacker's parameters (the proxy never trains; sgdm/adam give the attacker extra
  zero-gradient momentum steps).
* ``rand_noise_wb`` with ε_z = 0 releases y unchanged.
* The query log is the streaming one of :class:`~ppoison_ext.defenses.QueryLogger`.
* Resumable: :meth:`WhiteboxDefense.resume_state` / :meth:`load_resume_state` snapshot and
  restore the attacker, proxy, optimizers, counters, ``run_id`` and the log position (rows
  of the resumed run written after the snapshot are dropped; other runs' rows are kept).
"""

from __future__ import annotations

import copy
import datetime
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..datasets import get_dataset, get_transform
from ..fileio import append_text, atomic_write_text
from ..losses import soft_cross_entropy
from ..modeldir import dataset_name, load_model_dir, modelfamily_for_dataset
from ..models import get_net
from .base import Defense, DefenseOutput
from .querylog import distances

__all__ = ["WhiteboxDefense", "build_whitebox", "make_adv_optimizer", "WB_DEFENSES",
           "ONLINE_LOG", "ONLINE_COLUMNS"]

logger = logging.getLogger(__name__)

WB_DEFENSES = ("mad_wb", "reverse_sigmoid_wb", "rand_noise_wb")
ONLINE_LOG = "online.log.tsv"
ONLINE_COLUMNS = ["run_id", "epoch", "split", "loss", "accuracy", "best_accuracy", "l1_mean", "l1_std",
                  "l2_mean", "l2_std", "kl_mean", "kl_std"]
ADV_OPTIMIZERS = ("sgd", "sgdm", "adam")


def make_adv_optimizer(name: str, params, *, proxy: bool = False) -> torch.optim.Optimizer:
    """The reference's online optimizers: ``sgd`` lr 0.1/64; ``sgdm`` lr 0.1/64, momentum 0.5;
    ``adam`` lr 0.001/64 (for the gray-box proxy: Adam's default lr 0.001)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1 / 64)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=0.1 / 64, momentum=0.5)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.001 if proxy else 0.001 / 64)
    raise ValueError(f"adv_optimizer must be one of {list(ADV_OPTIMIZERS)}, got {name!r}")


def _copy(obj):
    """A deep copy of a state dict (its tensors alias the live parameters otherwise)."""
    return copy.deepcopy(obj)


def _fmt(v) -> str:
    return str(float(v)) if not isinstance(v, str) else v


class WhiteboxDefense(Defense):
    """A defense whose released answers also train a simulated attacker online.

    Args:
        defense: the inner defense (its ``model`` is the victim, its ``logger`` the query
            log). For MAD, its proxy should be ``attacker`` (white box) or ``proxy``.
        attacker: the attacker's model, trained online.
        proxy: a gray-box proxy of the attacker (None: the attacker itself).
        proxy_train: also train the proxy online (``not model_adv_proxy_notrain``).
        attacker_argmax: release (and train on) the one-hot top-1 of y′.
        adv_optimizer: ``sgd``, ``sgdm`` or ``adam`` (:func:`make_adv_optimizer`).
        out_dir: folder of ``online.log.tsv``; None: no online evaluation.
        testset: the victim's test set (or a callable returning it, called at the first log).
        train_size: the victim training-set size for the ``epoch`` column (or a callable).
        log_every: evaluate and log each time the query count passes a multiple of this.
        minitest_size: test images of the ``test_vic`` row (1000).
        eval_batch_size: batch size of both evaluations (``test`` and ``test_vic``).
        step_reduction: ``sum`` or ``mean`` of the batch's soft CE (see the module docs).
        original_bugs: reproduce the reference's proxy-optimizer and eval-mode bugs.

    Shape:
        x: [B, ...]; returns [B, K] (one-hot with ``attacker_argmax``).
    """

    def __init__(self, defense: Defense, attacker: nn.Module, *, proxy: Optional[nn.Module] = None,
                 proxy_train: bool = True, attacker_argmax: bool = False, adv_optimizer: str = "sgd",
                 out_dir=None, testset: Union[None, torch.utils.data.Dataset, Callable[[], Any]] = None,
                 train_size: Union[None, int, Callable[[], int]] = None, log_every: int = 1000,
                 minitest_size: int = 1000, eval_batch_size: int = 128, step_reduction: str = "sum",
                 original_bugs: bool = False):
        if not isinstance(defense, Defense):
            raise TypeError(f"defense must be a ppoison_ext Defense, got {type(defense).__name__}")
        if not isinstance(attacker, nn.Module):
            raise TypeError(f"attacker must be an nn.Module, got {type(attacker).__name__}")
        if proxy is not None and not isinstance(proxy, nn.Module):
            raise TypeError(f"proxy must be an nn.Module or None, got {type(proxy).__name__}")
        for name, v in (("proxy_train", proxy_train), ("attacker_argmax", attacker_argmax),
                        ("original_bugs", original_bugs)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
        for name, v in (("log_every", log_every), ("minitest_size", minitest_size),
                        ("eval_batch_size", eval_batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if step_reduction not in ("sum", "mean"):
            raise ValueError(f"step_reduction must be 'sum' or 'mean', got {step_reduction!r}")
        super().__init__(defense.model, logger=defense.logger)
        self.defense = defense
        self.attacker = attacker.train()
        self.proxy = proxy
        self.proxy_train = proxy_train and proxy is not None
        self.attacker_argmax = attacker_argmax
        self.adv_optimizer = adv_optimizer
        self.optimizer = make_adv_optimizer(adv_optimizer, attacker.parameters())
        self.proxy_optimizer = None
        if proxy is not None:
            # original_bugs: bind the proxy's optimizer to the attacker's parameters (the reference's bug).
            params = attacker.parameters() if original_bugs else proxy.parameters()
            self.proxy_optimizer = make_adv_optimizer(adv_optimizer, params, proxy=True)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._testset, self._train_size = testset, train_size
        self.log_every, self.minitest_size, self.eval_batch_size = log_every, minitest_size, eval_batch_size
        self.step_reduction, self.original_bugs = step_reduction, original_bugs
        self.run_id = str(datetime.datetime.now())
        self.best_test_acc = 0.0
        self._sums = np.zeros((3, 2))
        self._n = 0
        self._last_log_at = 0
        self._log_events = 0
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self.out_dir / ONLINE_LOG
            if not self.log_path.exists():
                self._rewrite_log([])

    def hparams(self) -> dict:
        return {"defense": type(self.defense).__name__, **self.defense.hparams(),
                "attacker": type(self.attacker).__name__, "gray_box": self.proxy is not None,
                "proxy_train": self.proxy_train, "attacker_argmax": self.attacker_argmax,
                "adv_optimizer": self.adv_optimizer, "step_reduction": self.step_reduction}

    # -- datasets (lazy) ------------------------------------------------------------------------
    @property
    def testset(self):
        if callable(self._testset) and not isinstance(self._testset, torch.utils.data.Dataset):
            self._testset = self._testset()
        return self._testset

    @property
    def train_size(self) -> Optional[int]:
        if callable(self._train_size):
            self._train_size = int(self._train_size())
        return self._train_size

    # -- the defense --------------------------------------------------------------------------
    def _step(self, model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, target: Tensor,
              set_to_none: bool = True) -> None:
        with torch.enable_grad():
            loss = soft_cross_entropy(model(x), target, reduction=self.step_reduction)
            opt.zero_grad(set_to_none=set_to_none)
            loss.backward()
            opt.step()

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:
        out = self.defense.defend(x, y)
        return DefenseOutput(self._released(out.y_prime), out.y, out.obj, out.sobj)

    def _released(self, y_prime: Tensor) -> Tensor:
        if not self.attacker_argmax:
            return y_prime
        return torch.zeros_like(y_prime).scatter_(1, y_prime.argmax(1, keepdim=True), 1.0)

    def perturb(self, x: Tensor) -> DefenseOutput:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        out = self.defense.perturb(x)  # counts and logs (y, y′ before the argmax)
        released = self._released(out.y_prime)
        target = released.detach().to(next(self.attacker.parameters()).device)
        self._step(self.attacker, self.optimizer, x, target)
        if self.proxy is not None and self.proxy_train:
            self._step(self.proxy, self.proxy_optimizer, x, target, set_to_none=not self.original_bugs)
        d = distances(out.y, out.y_prime).cpu().numpy()
        with np.errstate(invalid="ignore"):
            self._sums[:, 0] += d.sum(0)
            self._sums[:, 1] += (d * d).sum(0)
        self._n += d.shape[0]
        with self._count_lock:
            self.call_count += x.shape[0]
        every = self.log_every
        if self.out_dir is not None and self.call_count // every > self._last_log_at // every:
            self.log_online()
        return DefenseOutput(released, out.y, out.obj, out.sobj)

    # -- online evaluation ------------------------------------------------------------------------
    def _stats(self):
        n = max(self._n, 1)
        out = []
        with np.errstate(invalid="ignore"):
            for s, s2 in self._sums:
                mean = s / n
                var = s2 / n - mean * mean
                out += [mean, float(np.sqrt(max(var, 0.0))) if np.isfinite(var) else float("nan")]
        return out

    def _eval_attacker(self, testset, device) -> tuple:
        loader = torch.utils.data.DataLoader(testset, batch_size=self.eval_batch_size, shuffle=False)
        self.attacker.eval()
        total, correct, loss_sum = 0, 0, 0.0
        with torch.no_grad():
            for xb, yb in loader:
                xb, yb = xb.to(device), torch.as_tensor(yb).to(device)
                z = self.attacker(xb)
                loss_sum += F.cross_entropy(z, yb).item()
                correct += int((z.argmax(1) == yb).sum())
                total += yb.shape[0]
        if not self.original_bugs:
            self.attacker.train()
        return loss_sum / max(total, 1), 100.0 * correct / max(total, 1)

    def _eval_victim(self, testset, device) -> list:
        n = min(self.minitest_size, len(testset))
        sub = torch.utils.data.Subset(testset, range(n))
        loader = torch.utils.data.DataLoader(sub, batch_size=self.eval_batch_size, shuffle=False)
        total, correct, nll, ds = 0, 0, 0.0, []
        with torch.no_grad():
            for xb, yb in loader:
                xb, yb = xb.to(device), torch.as_tensor(yb)
                y = self.defense.victim_probs(xb)
                yp = self.defense.defend(xb, y).y_prime.detach().double().cpu() + 1e-7
                yp = yp / yp.sum(1, keepdim=True)
                nll += F.nll_loss(torch.log(yp), yb, reduction="sum").item()
                correct += int((yp.argmax(1) == yb).sum())
                total += yb.shape[0]
                ds.append(distances(y.detach().double().cpu(), yp))
        d = torch.cat(ds).numpy() if ds else np.zeros((0, 3))
        stats = []
        for k in range(3):
            col = d[:, k]
            with np.errstate(invalid="ignore"):
                stats += [float(np.mean(col)), float(np.std(col))]
        return [nll / max(total, 1), 100.0 * correct / max(total, 1)] + stats

    def log_online(self) -> None:
        """Evaluates the attacker and the defended victim; appends the two rows."""
        testset = self.testset
        if testset is None:
            raise ValueError("online evaluation needs the victim's test set (testset=)")
        size = self.train_size
        epoch = self.call_count / size if size else float(self.call_count)
        device = next(self.attacker.parameters()).device
        test_loss, test_acc = self._eval_attacker(testset, device)
        self.best_test_acc = max(self.best_test_acc, test_acc)
        vic = self._eval_victim(testset, device)
        rows = [[self.run_id, epoch, "test", test_loss, test_acc, self.best_test_acc] + self._stats(),
                [self.run_id, epoch, "test_vic", vic[0], vic[1], -1] + vic[2:]]
        append_text(self.log_path, "".join("\t".join(_fmt(c) for c in r) + "\n" for r in rows))
        self._last_log_at = self.call_count
        self._log_events += 1
        logger.info("[%d] attacker test acc %.2f (best %.2f), defended victim acc %.2f", self.call_count,
                    test_acc, self.best_test_acc, vic[1])

    def _rewrite_log(self, rows) -> None:
        atomic_write_text(self.log_path, "\t".join(ONLINE_COLUMNS) + "\n" + "".join(r + "\n" for r in rows))

    # -- resuming --------------------------------------------------------------------------------
    def resume_state(self) -> Dict[str, Any]:
        """Everything that evolves with the queries (tensors and numbers only)."""
        st = {"run_id": self.run_id, "call_count": int(self.call_count),
              "attacker": _copy(self.attacker.state_dict()),
              "optimizer": _copy(self.optimizer.state_dict()), "best_test_acc": float(self.best_test_acc),
              "sums": torch.from_numpy(self._sums.copy()), "n": int(self._n),
              "last_log_at": int(self._last_log_at), "log_events": int(self._log_events),
              "attacker_training": bool(self.attacker.training)}
        if self.proxy is not None:
            st["proxy"] = _copy(self.proxy.state_dict())
            st["proxy_optimizer"] = _copy(self.proxy_optimizer.state_dict())
        return st

    def load_resume_state(self, st: Optional[Mapping[str, Any]]) -> None:
        """Restores :meth:`resume_state` (None: the state before any query) and cuts this
        run's rows of ``online.log.tsv`` back to those written up to that point."""
        if st is not None:
            self.run_id = str(st["run_id"])
            self.call_count = int(st["call_count"])
            self.attacker.load_state_dict(st["attacker"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.attacker.train(bool(st["attacker_training"]))
            self.best_test_acc = float(st["best_test_acc"])
            self._sums = st["sums"].numpy().copy()
            self._n, self._last_log_at = int(st["n"]), int(st["last_log_at"])
            self._log_events = int(st["log_events"])
            if self.proxy is not None:
                self.proxy.load_state_dict(st["proxy"])
                self.proxy_optimizer.load_state_dict(st["proxy_optimizer"])
        if self.out_dir is not None and self.log_path.exists():
            lines = self.log_path.read_text().splitlines()[1:]
            kept, mine = [], 0
            for line in lines:
                if line.split("\t", 1)[0] == self.run_id:
                    mine += 1
                    if mine > 2 * self._log_events:
                        continue
                kept.append(line)
            if len(kept) != len(lines):
                self._rewrite_log(kept)


def _load_attacker(model_adv: Optional[str], arch: str, family: str, K: int, device) -> nn.Module:
    if model_adv is None:
        return get_net(arch, family, num_classes=K).to(device)
    p = Path(model_adv)
    if p.is_dir():
        cands = [p / "checkpoint.pth.tar", p / "model_best.pth.tar"]
        p = next((c for c in cands if c.is_file()), None)
        if p is None:
            raise FileNotFoundError(f"model_adv: no checkpoint.pth.tar (or model_best.pth.tar) in "
                                    f"{model_adv}")
    elif not p.is_file():
        raise FileNotFoundError(f"model_adv: {model_adv} does not exist")
    return get_net(arch, family, pretrained=str(p), num_classes=K).to(device)


def build_whitebox(name: str, wb_args: Mapping[str, Any], build_inner: Callable[[Optional[nn.Module]], Defense],
                   *, model: nn.Module, device, out_dir, victim_params: Optional[Mapping[str, Any]] = None,
                   proxy_dir: Optional[str] = None, testset=None, data_root=None, train_size: Optional[int] = None,
                   log_every: int = 1000, minitest_size: int = 1000, eval_batch_size: int = 128,
                   step_reduction: str = "sum", original_bugs: bool = False) -> WhiteboxDefense:
    """Builds ``mad_wb``, ``reverse_sigmoid_wb`` or ``rand_noise_wb`` (called by
    :func:`ppoison_ext.defenses.build_defense`, which parses the arguments).

    ``wb_args`` are the white-box keys: ``model_adv`` (None: a fresh init of the victim's
    architecture; a directory: its ``checkpoint.pth.tar``, weights copied by name),
    ``model_adv_proxy_notrain``, ``attacker_argmax`` and ``adv_optimizer``; ``proxy_dir``
    (``mad_wb``'s ``model_adv_proxy``) a gray-box proxy directory. ``build_inner(proxy)``
    builds the inner defense; MAD gets the gray-box proxy, else the attacker, as its proxy.
    The victim's test set (for ``online.log.tsv``) is its params' dataset, test split, family
    test transform, under ``data_root``; it is loaded at the first log unless ``testset`` is
    given. See :class:`WhiteboxDefense` for the other arguments.
    """
    if name not in WB_DEFENSES:
        raise ValueError(f"unknown white-box defense {name!r}; known: {list(WB_DEFENSES)}")
    if victim_params is None:
        raise ValueError(f"{name} needs the victim's params.json (victim_dir=, or whitebox={{'victim_params': ...}})")
    kw = dict(wb_args)
    model_adv = kw.pop("model_adv", None)
    notrain = kw.pop("model_adv_proxy_notrain", False)
    attacker_argmax = kw.pop("attacker_argmax", False)
    adv_optimizer = kw.pop("adv_optimizer", "sgd")
    if kw:
        raise ValueError(f"defense_args: unknown white-box keys {sorted(kw)}")
    if adv_optimizer not in ADV_OPTIMIZERS:
        raise ValueError(f"defense_args: adv_optimizer must be one of {list(ADV_OPTIMIZERS)}, "
                         f"got {adv_optimizer!r}")
    arch, K = victim_params["model_arch"], int(victim_params["num_classes"])
    dataset = dataset_name(victim_params)
    family = modelfamily_for_dataset(dataset)
    attacker = _load_attacker(model_adv, arch, family, K, device)
    proxy = None
    if proxy_dir is not None:
        if not Path(proxy_dir).is_dir():
            raise ValueError(f"model_adv_proxy must be a model directory, got {proxy_dir}")
        proxy, _ = load_model_dir(proxy_dir, device=device,
                                  checkpoint_names=("checkpoint.pth.tar", "model_best.pth.tar"))
        proxy.train()
    inner = build_inner((proxy if proxy is not None else attacker) if name == "mad_wb" else None)

    if testset is None:
        def testset():
            return get_dataset(dataset, train=False, transform=get_transform(family, "test"), root=data_root)

    if train_size is None:
        def train_size():
            return len(get_dataset(dataset, train=True, root=data_root))

    wb = WhiteboxDefense(inner, attacker, proxy=proxy, proxy_train=not notrain,
                         attacker_argmax=attacker_argmax, adv_optimizer=adv_optimizer, out_dir=out_dir,
                         testset=testset, train_size=train_size, log_every=log_every,
                         minitest_size=minitest_size, eval_batch_size=eval_batch_size,
                         step_reduction=step_reduction, original_bugs=original_bugs)
    return wb.to(device)
