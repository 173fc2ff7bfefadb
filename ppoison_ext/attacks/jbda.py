"""Jacobian-based dataset augmentation attacks: JBDA (Papernot et al., AsiaCCS 2017,
arXiv 1602.02697), JB-self and JB-top-k (PRADA, Juuti et al., EuroS&P 2019, arXiv 1805.02628).

1. Query a seed set → D = {(x, y′)}; train a throw-away substitute for 1 epoch (lr 0.01).
2. Round ρ = 0, 1, ...: train a **fresh** substitute F_A on D (``train_epochs`` at lr 0.1),
   then augment D_s (κ random rows of D if ``kappa`` is set and ρ ≥ σ, else all of D, capped
   by the budget) with step λ_ρ = 0.1·(−1)^round(ρ/τ) (Python's half-to-even round):
   ``jbda`` queries x + λ·sign ∇ₓ CE(F_A(x), argmax y), ``jbself`` x − λ·sign ∇, ``jbtop<k>``
   x + δ for each of the k classes F_A ranks highest besides the label, δ from targeted
   PGD-L∞ (radius |λ|); D grows by the queried images and their answers, up to the budget.
3. When the budget is spent (or after ``rho`` rounds), train the final substitute
   (``final_train_epochs`` at lr 0.01). Files: ``checkpoint.<queries>.pth.tar``,
   ``train.<queries>.log.tsv``.

Queried images are clamped to the pixel range; each ``orig_*`` flag restores a bug of the
original attack (differences.md: JBDA family). Queries go to the black box in batches of
``query_batch_size`` (gradients and PGD steps are per sample).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset
from tqdm import tqdm

from ..checks import int_arg
from ..devices import as_device
from ..fileio import atomic_write
from ..models import get_net
from ..losses import soft_cross_entropy
from ..training import train_model
from .base import Attack
from .transferset import TransferSet, TransferSetWriter, load_transferset

logger = logging.getLogger(__name__)

__all__ = ["JacobianAdversary", "AugmentedSet", "parse_policy", "step_size_for_round", "pixel_bounds",
           "fgsm_untargeted", "clamp_original", "pgd_linf_targeted", "rand_sample", "save_augmented_set",
           "IMAGES_FILE"]

#: The exact (normalised, float32) images of a saved augmented set.
IMAGES_FILE = "jbda_images.pt"

_TOP_RE = re.compile(r"^jbtop(\d+)$")


def parse_policy(policy: str) -> Tuple[str, Optional[int]]:
    """``"jbda"`` → ``("jbda", None)``, ``"jbself"`` → ``("jbself", None)``,
    ``"jbtop3"`` → ``("jbtop", 3)``; ValueError for any other name or ``jbtop0``."""
    if policy in ("jbda", "jbself"):
        return policy, None
    m = _TOP_RE.match(policy) if isinstance(policy, str) else None
    if m is None or int(m.group(1)) < 1:
        raise ValueError(
            f"policy must be 'jbda', 'jbself' or 'jbtop<k>' with k >= 1 (e.g. 'jbtop3'), got {policy!r}")
    return "jbtop", int(m.group(1))


def step_size_for_round(rho: int, tau: Optional[int], base: float = 0.1) -> float:
    """λ_ρ = base·(−1)^round(ρ/τ) (Python's half-to-even ``round``; Papernot et al. use ⌊ρ/τ⌋);
    ``base`` when ``tau`` is None."""
    if tau is None:
        return base
    return base * ((-1) ** round(rho / tau))


def pixel_bounds(mean: Sequence[float], std: Sequence[float]) -> Tuple[Tensor, Tensor]:
    """The valid pixel range [0, 1] in normalised units: ``((0 − mean)/std, (1 − mean)/std)``
    as [C, 1, 1] tensors."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def fgsm_untargeted(model: nn.Module, x: Tensor, targets: Tensor, epsilon: float) -> Tensor:
    """δ = ε·sign(∇ₓ CE(model(x), targets)) per sample (each row's batch-1 gradient), unclamped."""
    if epsilon == 0:
        return torch.zeros_like(x)
    with torch.enable_grad():
        xr = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(xr), targets, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xr)
    return epsilon * grad.sign()


def clamp_original(x: Tensor, delta: Tensor) -> Tensor:
    """``orig_clamp``'s FGSM clamp ``min(max(δ, −x), 1 − x)``: x + δ ∈ [0, 1] in the
    *normalised* units of x."""
    return torch.min(torch.max(delta, -x), 1 - x)


def pgd_linf_targeted(model: nn.Module, x: Tensor, targets: Tensor, epsilon: float, alpha: float = 0.01,
                      num_iter: int = 8, *, orig_sign: bool = False) -> Tensor:
    """Targeted PGD-L∞ ascending logit ``targets`` (one class per row): ``num_iter`` steps
    δ ← clamp(δ + α·sign ∇_δ z_c(x + δ), −|ε|, |ε|) from δ = 0, without an image-range clamp
    (``orig_sign``: ``clamp(−ε, ε)`` as given, which for ε < 0 sets every element to ε)."""
    eps = epsilon if orig_sign else abs(epsilon)
    delta = torch.zeros_like(x)
    idx = targets.view(-1, 1)
    with torch.enable_grad():
        for _ in range(num_iter):
            d = delta.detach().requires_grad_(True)
            loss = model(x + d).gather(1, idx).sum()
            (grad,) = torch.autograd.grad(loss, d)
            delta = torch.clamp(d.detach() + alpha * grad.sign(), min=-eps, max=eps)
    return delta.detach()


def rand_sample(n: int, kappa: int) -> Tensor:
    """Indices of ``min(kappa, n)`` rows of ``range(n)`` drawn uniformly without replacement
    with NumPy's global RNG, in increasing order."""
    chosen = np.random.choice(np.arange(n), size=min(int(kappa), n), replace=False)
    return torch.from_numpy(np.sort(chosen)).long()


@dataclass
class AugmentedSet:
    """The attacker's set D: normalised images ``x`` [N, C, H, W], released posteriors ``y``
    [N, K] and ``origin`` [N] (the query-set index of a seed image, −1 for a synthetic one)."""

    x: Tensor
    y: Tensor
    origin: Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def dataset(self) -> Dataset:
        return TensorDataset(self.x, self.y)

    def num_unique(self) -> int:
        """Number of distinct images in ``x``."""
        if len(self) == 0:
            return 0
        return int(torch.unique(self.x.reshape(len(self), -1), dim=0).shape[0])

    def truncate(self, n: int) -> "AugmentedSet":
        return AugmentedSet(self.x[:n], self.y[:n], self.origin[:n])


def save_augmented_set(D: AugmentedSet, out_dir: Union[str, Path], *, mean: Sequence[float],
                       std: Sequence[float], meta: Optional[Dict[str, Any]] = None) -> Path:
    """Stores D in ``out_dir`` as a transfer set of the images de-normalised and rounded to
    uint8 (``index`` = ``origin``), which ``train-attacker`` reads like any other, plus the exact
    normalised float32 images in ``jbda_images.pt`` (synthetic images are not uint8 images)."""
    out_dir = Path(out_dir)
    x = D.x.detach().float().cpu()
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    raw = torch.round((x * s + m) * 255).clamp_(0, 255).to(torch.uint8)
    raw = raw[:, 0] if raw.shape[1] == 1 else raw.permute(0, 2, 3, 1)
    info = dict(meta or {})
    info.update({"exact_images": IMAGES_FILE, "image_normalization": {"mean": list(mean), "std": list(std)}})
    with TransferSetWriter(out_dir, num_classes=int(D.y.shape[1]), kind="images",
                           image_shape=list(raw.shape[1:]), meta=info, resume=False) as w:
        for start in range(0, len(D), 4096):
            sl = slice(start, start + 4096)
            w.append(D.origin[sl], raw[sl].numpy(), D.y[sl])
    atomic_write(out_dir / IMAGES_FILE, lambda f: torch.save(x.contiguous(), f))
    return out_dir


class JacobianAdversary(Attack):
    """JBDA / JB-self / JB-top-k against a (defended) black box (see the module docs).

    :meth:`build_transferset` queries the seed set and runs the augmentation rounds;
    :meth:`run` after :meth:`setup` also trains the final substitute. ``blackbox`` (or the one
    given to :meth:`build_transferset`) counts the queries with its ``call_count`` if it has
    one; ``budget`` includes the seed set; ``kappa``, ``tau``, ``rho`` = None: all of D, never
    flipping λ, until the budget is spent; ``bounds``: the pixel range in normalised units
    (:func:`pixel_bounds`), needed unless ``orig_clamp``.
    """

    attack_params = ("policy", "budget", "model_adv_name", "kappa", "tau", "rho", "sigma", "step_size",
                     "query_batch_size")

    def __init__(self, blackbox: Optional[Callable[[Tensor], Tensor]] = None, *, policy: str = "jbda",
                 budget: int = 10000,
                 model_adv_name: str, modelfamily: str, num_classes: int, testset: Optional[Dataset],
                 out_dir: Union[str, Path], device: Union[str, torch.device] = "cpu",
                 model_adv_pretrained: Optional[str] = None, batch_size: int = 64, train_epochs: int = 20,
                 final_train_epochs: int = 100, kappa: Optional[int] = None, tau: Optional[int] = 5,
                 rho: Optional[int] = None, sigma: int = 3, step_size: float = 0.1, pgd_alpha: float = 0.01,
                 pgd_iters: int = 8, query_batch_size: int = 64,
                 bounds: Optional[Tuple[Tensor, Tensor]] = None, useprobs: bool = True,
                 orig_aliasing: bool = False, orig_jbself_store: bool = False,
                 orig_clamp: bool = False, orig_topk_cap: bool = False, orig_pgd_sign: bool = False,
                 num_workers: int = 0, progress: bool = True, model_kwargs: Optional[Dict[str, Any]] = None):
        self.policy = policy
        self.strategy, self.topk = parse_policy(policy)
        for name, v, lo in (("budget", budget, 1), ("num_classes", num_classes, 2),
                            ("batch_size", batch_size, 1), ("train_epochs", train_epochs, 0),
                            ("final_train_epochs", final_train_epochs, 0),
                            ("query_batch_size", query_batch_size, 1), ("pgd_iters", pgd_iters, 0),
                            ("sigma", sigma, -(1 << 62)), ("num_workers", num_workers, 0)):
            int_arg(v, name, low=lo)
        for name, v in (("kappa", kappa), ("tau", tau), ("rho", rho)):
            int_arg(v, name, optional=True)
        if self.topk is not None and self.topk > num_classes - 1:
            raise ValueError(f"policy {policy!r}: k must be at most K - 1 = {num_classes - 1}")
        if not orig_clamp and bounds is None:
            raise ValueError(
                "bounds (the valid pixel range in normalised units) are needed unless orig_clamp=True")
        self.blackbox, self.budget, self.num_classes, self.testset = blackbox, budget, num_classes, testset
        self.model_adv_name, self.model_adv_pretrained = model_adv_name, model_adv_pretrained
        self.modelfamily, self.model_kwargs = modelfamily, dict(model_kwargs or {})
        self.out_dir, self.device = Path(out_dir), as_device(device)
        self.batch_size, self.train_epochs = batch_size, train_epochs
        self.final_train_epochs = final_train_epochs
        self.kappa, self.tau, self.rho, self.sigma = kappa, tau, rho, sigma
        self.step_size, self.pgd_alpha, self.pgd_iters = float(step_size), float(pgd_alpha), pgd_iters
        self.query_batch_size, self.useprobs = query_batch_size, useprobs
        self.bounds = None if bounds is None else tuple(b.float().to(self.device) for b in bounds)
        self.orig_aliasing, self.orig_jbself_store = orig_aliasing, orig_jbself_store
        self.orig_clamp, self.orig_topk_cap, self.orig_pgd_sign = orig_clamp, orig_topk_cap, orig_pgd_sign
        self.num_workers, self.progress = num_workers, progress
        self.D: Optional[AugmentedSet] = None
        self._own_count = 0
        self.rounds: List[Dict[str, Any]] = []

    @property
    def call_count(self) -> int:
        c = getattr(self.blackbox, "call_count", None)
        return int(c) if isinstance(c, int) else self._own_count

    def query(self, x: Tensor) -> Tensor:
        """Released posteriors (CPU float32 [B, K]) for images x, in batches."""
        out = []
        for start in range(0, x.shape[0], self.query_batch_size):
            xb = x[start:start + self.query_batch_size].to(self.device)
            y = self.blackbox(xb).detach().float().cpu()
            self._own_count += xb.shape[0]
            if not self.useprobs:
                y = F.one_hot(y.argmax(1), self.num_classes).float()
            out.append(y)
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    def _clip(self, x: Tensor) -> Tensor:
        lo, hi = self.bounds
        return torch.max(torch.min(x, hi), lo)

    def train_substitute(self, epochs: int, lr: float,
                         momentum: float = 0.9) -> Tuple[nn.Module, Dict[str, Any]]:
        """A fresh substitute trained on D (files suffixed ``.<queries so far>``)."""
        model = get_net(self.model_adv_name, self.modelfamily, self.model_adv_pretrained,
                        num_classes=self.num_classes, **self.model_kwargs).to(self.device)
        return train_model(
            model, self.D.dataset(), self.out_dir, testset=self.testset, batch_size=self.batch_size,
            epochs=epochs, lr=lr, momentum=momentum, lr_gamma=0.1, criterion=soft_cross_entropy,
            checkpoint_suffix=f".{self.call_count}", device=self.device, num_workers=self.num_workers,
            arch=self.model_adv_name, progress=self.progress, save_last=False, log_interval=500,
            num_classes=self.num_classes)

    def setup(self, x_seed: Tensor, seed_indices: Optional[Sequence[int]] = None) -> AugmentedSet:
        """Queries the seed images (normalised [N, C, H, W]) and trains the throw-away
        1-epoch substitute (lr 0.01, momentum 0.9)."""
        if x_seed.dim() != 4 or x_seed.shape[0] == 0:
            raise ValueError(f"x_seed must be a non-empty [N, C, H, W] tensor, got {tuple(x_seed.shape)}")
        if x_seed.shape[0] >= self.budget:
            raise ValueError(f"the seed set ({x_seed.shape[0]} images) must be smaller than the budget "
                             f"({self.budget})")
        x_seed = x_seed.detach().float().cpu()
        y_seed = self.query(x_seed)
        origin = (torch.as_tensor(list(seed_indices), dtype=torch.long) if seed_indices is not None
                  else torch.full((x_seed.shape[0],), -1, dtype=torch.long))
        self.D = AugmentedSet(x_seed.clone(), y_seed, origin)
        logger.info("seed set: %d images queried", len(self.D))
        self.train_substitute(epochs=1, lr=0.01)
        return self.D

    def _select(self, rho: int) -> Tuple[Optional[Tensor], int]:
        """(row indices of D to augment, or None for all of D; their count)."""
        n = len(self.D)
        if self.kappa is not None and rho >= self.sigma:
            sel = rand_sample(n, self.kappa)
            return sel, int(sel.numel())
        return None, n

    def augment_fgsm(self, model: nn.Module, rho: int) -> AugmentedSet:
        """One JBDA / JB-self round (see the module docs)."""
        D = self.D
        sel, m = self._select(rho)
        if m + self.call_count >= self.budget:
            m = max(self.budget - self.call_count, 0)
            logger.info("reducing the augmentation set to %d rows to stay within the budget", m)
        rows = sel[:m] if sel is not None else slice(0, m)
        xs, ys, os_ = D.x[rows], D.y[rows], D.origin[rows]  # sampled rows are copies
        if sel is None and not self.orig_aliasing:  # orig_aliasing: the writes below overwrite D itself
            xs, ys, os_ = xs.clone(), ys.clone(), os_.clone()
        lam = step_size_for_round(rho, self.tau, self.step_size)
        logger.info("round %d: augmenting %d rows (|D| = %d, %d queries so far), step %+.3g", rho, m, len(D),
                    self.call_count, lam)
        model.eval()
        qb = self.query_batch_size
        for start in tqdm(range(0, m, qb), desc=f"{self.strategy} round {rho}", leave=False,
                          disable=not self.progress, unit="batch"):
            sl = slice(start, min(start + qb, m))
            x = xs[sl].to(self.device).clone()
            targets = ys[sl].argmax(1).to(self.device)
            delta = fgsm_untargeted(model, x, targets, lam)
            if self.orig_clamp:
                delta = clamp_original(x, delta)
                x_plus, x_minus = x + delta, x - delta
            else:
                x_plus, x_minus = self._clip(x + delta), self._clip(x - delta)
            x_query = x_plus if self.strategy == "jbda" else x_minus
            y_new = self.query(x_query)
            x_store = x_plus if (self.strategy == "jbda" or self.orig_jbself_store) else x_minus
            xs[sl] = x_store.detach().cpu()
            ys[sl] = y_new
            os_[sl] = -1
        return self._extended(xs, ys, os_)

    def augment_topk(self, model: nn.Module, rho: int) -> AugmentedSet:
        """One JB-top-k round (see the module docs)."""
        D, k = self.D, self.topk
        sel, m = self._select(rho)
        if m * k + self.call_count >= self.budget:
            remaining = max(self.budget - self.call_count, 0)
            m = int(math.ceil(remaining / (3.0 if self.orig_topk_cap else float(k))))
        rows = sel[:m] if sel is not None else torch.arange(min(m, len(D)))
        m = int(rows.numel())
        lam = step_size_for_round(rho, self.tau, self.step_size)
        logger.info("round %d: %d rows x %d classes (|D| = %d, %d queries so far), step %+.3g", rho, m, k,
                    len(D), self.call_count, lam)
        model.eval()
        xs_aug, ys_aug = [], []
        qb = max(1, self.query_batch_size // k)
        for start in tqdm(range(0, m, qb), desc=f"jbtop{k} round {rho}", leave=False,
                          disable=not self.progress, unit="batch"):
            idx = rows[start:start + qb]
            x = D.x[idx].to(self.device)
            label = D.y[idx].argmax(1).to(self.device)
            with torch.no_grad():
                order = model(x).argsort(dim=1, descending=True)
            keep = order != label.view(-1, 1)
            classes = order[keep].view(x.shape[0], -1)[:, :k]  # top-k of F_A, the label's class removed
            deltas = [pgd_linf_targeted(model, x, classes[:, j], lam, self.pgd_alpha, self.pgd_iters,
                                        orig_sign=self.orig_pgd_sign) for j in range(k)]
            xq = (x.unsqueeze(1) + torch.stack(deltas, 1)).reshape(-1, *x.shape[1:])  # sample-major
            if not self.orig_clamp:
                xq = self._clip(xq)
            if not self.orig_topk_cap:
                xq = xq[:max(self.budget - self.call_count, 0)]
            if xq.shape[0] == 0:
                break
            ys_aug.append(self.query(xq))
            xs_aug.append(xq.detach().cpu())
        if not xs_aug:
            return D
        xa = torch.cat(xs_aug)
        return self._extended(xa, torch.cat(ys_aug), torch.full((xa.shape[0],), -1, dtype=torch.long))

    def _extended(self, x: Tensor, y: Tensor, origin: Tensor) -> AugmentedSet:
        """D with the rows (x, y, origin) appended, truncated to the budget."""
        D = self.D
        grown = AugmentedSet(torch.cat([D.x, x]), torch.cat([D.y, y]), torch.cat([D.origin, origin]))
        return grown.truncate(self.budget)

    def build_transferset(self, blackbox, queryset, out_dir=None, *,
                          seed_indices: Optional[Sequence[int]] = None) -> TransferSet:
        """Queries the seed set ``queryset`` (a normalised [N, C, H, W] tensor, or a dataset of
        (image, label) whose images are all used), runs the augmentation rounds against
        ``blackbox`` and stores D in ``out_dir`` (:func:`save_augmented_set`; ``seed_indices``:
        the seed images' query-set indices, default −1)."""
        is_tensor = isinstance(queryset, Tensor)
        x_seed = queryset if is_tensor else torch.stack([queryset[i][0] for i in range(len(queryset))])
        out = self.output_folder(out_dir)
        self.blackbox = blackbox
        self.setup(x_seed, seed_indices)
        D = self.augment()
        lo, hi = self.bounds if self.bounds is not None else (torch.zeros(1), torch.ones(1))
        std = (1.0 / (hi - lo)).flatten().cpu()  # bounds are ((0 - mean)/std, (1 - mean)/std)
        mean = (-lo.flatten().cpu() * std)
        save_augmented_set(D, out, mean=mean.tolist(), std=std.tolist(),
                           meta={"policy": self.policy, "budget": self.budget})
        return load_transferset(out)

    def augment(self) -> AugmentedSet:
        """Runs the augmentation rounds until the budget is spent (call :meth:`setup` first);
        returns D. Each round trains a fresh substitute to craft its queries."""
        self._rounds_until_final(train_final=False)
        return self.D

    def run(self) -> Tuple[AugmentedSet, nn.Module, Dict[str, Any]]:
        """Runs the rounds and trains the final substitute (call :meth:`setup` first); returns
        ``(D, final substitute, summary)`` with ``rounds`` (one dict per round), ``final`` (the
        final training's summary), ``queries``, ``size``, ``unique``."""
        model, final = self._rounds_until_final(train_final=True)
        summary = {"rounds": self.rounds, "final": final, "queries": self.call_count, "size": len(self.D),
                   "unique": self.D.num_unique()}
        return self.D, model, summary

    def _rounds_until_final(self, train_final: bool):
        if self.D is None:
            raise ValueError("call setup(x_seed) before run()")
        if self.blackbox is None:
            raise ValueError("no black box: pass it to JacobianAdversary(...) or build_transferset(...)")
        rho, model, final = 0, None, None
        while self.call_count < self.budget:
            logger.info("=> substitute round %d (|D| = %d)", rho, len(self.D))
            model, tsum = self.train_substitute(epochs=self.train_epochs, lr=0.1)
            before = self.call_count
            self.D = (self.augment_topk if self.strategy == "jbtop" else self.augment_fgsm)(model, rho)
            self.rounds.append({"round": rho, "queries": before, "size": len(self.D),
                                "unique": self.D.num_unique(),
                                "step_size": step_size_for_round(rho, self.tau, self.step_size),
                                "best_test_acc": tsum["best_test_acc"]})
            rho += 1
            stalled = self.call_count == before
            if self.call_count >= self.budget or (self.rho is not None and rho >= self.rho) or stalled:
                if stalled:
                    logger.warning("round %d made no query; stopping", rho - 1)
                if train_final:
                    logger.info("=> %d queries (budget %d): training the final substitute", self.call_count,
                                self.budget)
                    model, final = self.train_substitute(epochs=self.final_train_epochs, lr=0.01)
                break
        return model, final
