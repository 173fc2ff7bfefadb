"""Knockoff Nets (Orekondy, Schiele, Fritz. "Knockoff Nets: Stealing Functionality of
Black-Box Models", CVPR 2019, arXiv:1812.02766): building a transfer set by querying a
(defended) black box with images of the attacker's query set.

Two policies: ``random`` (the reference's ``RandomAdversaryIters``, reproduced query for
query: :mod:`ppoison_ext.attacks.query_order`) and ``adaptive`` (never released by the
authors; implemented from the paper: :mod:`ppoison_ext.attacks.adaptive`). Per-batch
seeding, call times and state snapshots: :mod:`ppoison_ext.attacks.runstate`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..defenses import QueryLogger
from ..fileio import truncate_file
from ..losses import soft_cross_entropy
from ..models.heads import num_classes_of
from .adaptive import REWARDS, AdaptivePolicy, load_hierarchy
from .base import Attack
from .query_order import DEFAULT_SEED, check_count, random_query_order, resolve_budget, shuffled_pool
from .queryset import load_images, raw_items, storage_kind
from .runstate import RUN_TIMES_FILE, STATE_FILES, RunTimes, StateSlots, batch_seed, reseed_blackbox
from .transferset import INDEX_FILE, META, Y_FILE, TransferSet, TransferSetError, TransferSetWriter, load_transferset

__all__ = ["KnockoffNets", "AdaptivePolicy", "random_query_order", "batch_seed", "reseed_blackbox",
           "load_hierarchy", "RUN_TIMES_FILE", "STATE_FILES", "DEFAULT_SEED", "REWARDS"]

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "adaptive")


def _infer_num_classes(blackbox) -> Optional[int]:
    for attr in ("num_classes", "K"):
        v = getattr(blackbox, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    model = getattr(blackbox, "model", blackbox)
    return num_classes_of(model) if isinstance(model, nn.Module) else None


def _device_of(blackbox) -> torch.device:
    if isinstance(blackbox, nn.Module):
        for p in blackbox.parameters():
            return p.device
    return torch.device("cpu")


def _query_logger(blackbox):
    lg = getattr(blackbox, "logger", None)
    return lg if isinstance(lg, QueryLogger) else None


class KnockoffNets(Attack):
    """Knockoff Nets transfer-set construction (arXiv:1812.02766), random or adaptive.

    Hyperparameters are keyword arguments; see the module docs for the exact algorithms.

    Args:
        strategy: ``random`` (the reference's query order) or ``adaptive`` (gradient bandit).
        budget: number of distinct query images, the first ``budget`` of a seed-``seed``
            shuffle of the query set (default: all).
        nqueries: number of queries (default ``budget``).
        batch_size: images per black-box call (the reference's default was 1).
        qpi: queries per image; the stored posterior is the mean over ``qpi`` calls.
        seed: 42 reproduces the reference's order; also derives the per-batch seeds.
        reward, alpha, delta, hierarchy, online_model, online_lr: the adaptive policy's
            settings (:class:`AdaptivePolicy`).
        num_workers: DataLoader workers loading the random policy's images (0: in the
            main process after the batch's reseed, needed for random training transforms to
            be reproducible).
        progress: show a tqdm progress bar.

    Example:
        >>> attack = KnockoffNets(strategy="random", budget=60000, batch_size=256)
        >>> ts = attack.build_transferset(defense, queryset, "out/")
        >>> knockoff = attack.extract(defense, queryset, "out/", surrogate=get_net("lenet", "mnist"))
    """

    attack_params = ("strategy", "budget", "nqueries", "batch_size", "qpi", "seed", "reward", "alpha",
                     "delta", "online_lr")

    def __init__(self, *, strategy: str = "random", budget: Optional[int] = None,
                 nqueries: Optional[int] = None, batch_size: int = 256, qpi: int = 1,
                 seed: int = DEFAULT_SEED, reward: str = "all", alpha: float = 0.1, delta: int = 25,
                 hierarchy: Optional[Union[str, Path, Mapping[str, Sequence[Union[int, str]]]]] = None,
                 online_model: Optional[nn.Module] = None, online_lr: float = 0.01, num_workers: int = 0,
                 progress: bool = True):
        self.strategy = strategy
        self.budget, self.nqueries = budget, nqueries
        self.batch_size, self.qpi, self.seed = batch_size, qpi, seed
        self.reward, self.alpha, self.delta = reward, alpha, delta
        self.hierarchy = hierarchy
        self.online_model, self.online_lr = online_model, online_lr
        self.num_workers, self.progress = num_workers, progress
        self._check_params()
        self.run_times: List[float] = []
        self.policy: Optional[AdaptivePolicy] = None
        self._order: Optional[Tuple[tuple, List[np.ndarray]]] = None

    def _check_params(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        for name in ("budget", "nqueries"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name))
        check_count("batch_size", self.batch_size)
        check_count("qpi", self.qpi)
        check_count("num_workers", self.num_workers, 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {list(REWARDS)}, got {self.reward!r}")
        if self.online_model is not None and not isinstance(self.online_model, nn.Module):
            raise TypeError(f"online_model must be an nn.Module, got {type(self.online_model).__name__}")

    def run_params(self, n: int, num_shards: int = 1, shard_id: int = 0) -> Dict[str, Any]:
        """The settings that fix a run's queries (recorded in ``transferset.json``; resuming
        needs them equal), for a query set of ``n`` images."""
        num_shards = check_count("num_shards", num_shards)
        shard_id = check_count("shard_id", shard_id, 0)
        if shard_id >= num_shards:
            raise ValueError(f"shard_id must be < num_shards ({num_shards}), got {shard_id}")
        budget, nqueries = resolve_budget(n, self.budget, self.nqueries, self.batch_size, self.strategy)
        run = {"strategy": self.strategy, "budget": budget, "nqueries": nqueries,
               "batch_size": self.batch_size, "qpi": self.qpi, "seed": int(self.seed),
               "num_shards": num_shards, "shard_id": shard_id}
        if self.strategy == "adaptive":
            run.update(reward=self.reward, alpha=float(self.alpha), delta=self.delta,
                       online_lr=float(self.online_lr), hierarchy=bool(self.hierarchy))
        return run

    def check_resume(self, out_dir, n: int, num_shards: int = 1, shard_id: int = 0) -> None:
        """Raises ValueError if ``out_dir`` holds a transfer set built with other settings."""
        out = Path(out_dir)
        if not (out / META).exists():
            return
        run = self.run_params(n, num_shards, shard_id)
        try:
            old = json.loads((out / META).read_text()).get("knockoff")
        except ValueError:
            old = None
        if old is not None and old != run:
            diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
            what = ", ".join(f"{k}: {old.get(k)!r} there, {run.get(k)!r} now" for k in diff)
            raise ValueError(f"{out}: cannot resume, the transfer set there was built with other settings "
                             f"({what}); pass resume=False (--no-resume) to start over")

    def query_order(self, n: int) -> List[np.ndarray]:
        """The random strategy's batches for a query set of ``n`` images (cached)."""
        key = (n, self.budget, self.nqueries, self.batch_size, int(self.seed))
        if self._order is None or self._order[0] != key:
            self._order = (key, random_query_order(n, self.budget, self.nqueries, self.batch_size, self.seed))
        return self._order[1]

    def _batch_ends(self, n: int, run: Dict[str, Any]) -> np.ndarray:
        """Query counts at which this shard's batches end."""
        if self.strategy == "random":
            S, I = run["num_shards"], run["shard_id"]
            sizes = [len(b) for t, b in enumerate(self.query_order(n)) if t % S == I]
        else:
            B, nq = self.batch_size, run["nqueries"]
            sizes = [min(B, nq - lo) for lo in range(0, nq, B)]
        return np.cumsum(sizes)

    def prepare_resume(self, out_dir, n: int, num_shards: int = 1, shard_id: int = 0) -> int:
        """Checks that ``out_dir`` may be resumed with these settings (ValueError if its
        transfer set was built with others), cuts it back to its last complete batch (a
        batch torn by a crash), and returns the number of committed queries (0 if none)."""
        out = Path(out_dir)
        self.check_resume(out, n, num_shards, shard_id)
        if not (out / META).exists() or not (out / Y_FILE).exists():
            return 0
        try:
            ts = load_transferset(out)
        except TransferSetError as err:
            raise ValueError(f"{out}: cannot resume from the transfer set there ({err}); start over "
                             "(resume=False / --no-resume)") from err
        done = len(ts)
        if done == 0:
            return 0
        run = self.run_params(n, num_shards, shard_id)
        ends = self._batch_ends(n, run)
        if done > int(ends[-1]):
            raise ValueError(f"{out}: holds {done} queries, more than this run makes ({int(ends[-1])})")
        j = int(np.searchsorted(ends, done, side="right"))
        keep = int(ends[j - 1]) if j > 0 else 0
        if keep != done:
            logger.warning("%s: dropping %d queries of a batch cut short by a crash", out, done - keep)
            for name, row in ((Y_FILE, 4 * ts.num_classes), (INDEX_FILE, 8)):
                truncate_file(out / name, keep * row)
        return keep

    # -- the main loop ----------------------------------------------------------------------
    def build_transferset(self, blackbox, queryset, out_dir=None, *, resume: bool = True,
                          device: Union[str, torch.device, None] = None, num_classes: Optional[int] = None,
                          meta: Optional[Mapping[str, Any]] = None, num_shards: int = 1,
                          shard_id: int = 0) -> TransferSet:
        """Queries ``blackbox`` and writes the transfer set into ``out_dir``.

        Args:
            blackbox: a callable x → y′ [B, K] (a :class:`~ppoison_ext.defenses.Defense`).
            queryset: the attacker's images: a Dataset of (tensor, label) with ``.data`` (uint8
                images, stored raw) or ``.samples`` (paths, stored as paths); ``.targets`` for
                the adaptive policy.
            out_dir: the transfer-set folder (None: a new temporary folder).
            resume: continue the queries already committed there (their parameters must match);
                False starts over.
            device: where x goes (default: the blackbox's parameters' device).
            num_classes: K (default: inferred from the blackbox's victim).
            meta: extra description stored in ``transferset.json``.
            num_shards, shard_id: build only the batches t with t % num_shards == shard_id
                (random strategy only).

        Returns:
            The transfer set (this shard's part when sharded).
        """
        out = self.output_folder(out_dir)
        if self.strategy == "adaptive" and self.reward in ("loss", "all") and self.online_model is None:
            raise ValueError(f"strategy 'adaptive' with reward {self.reward!r} needs online_model")
        if num_shards > 1 and self.strategy != "random":
            raise ValueError("sharding needs the random strategy (the adaptive policy is sequential)")
        if num_shards > 1 and hasattr(blackbox, "resume_state"):
            raise ValueError("sharding cannot be used with a white-box defense (its online attacker is "
                             "sequential)")
        kind, image_shape = storage_kind(queryset)
        N = len(queryset)
        run = self.run_params(N, num_shards, shard_id)
        budget, nqueries = run["budget"], run["nqueries"]
        K = num_classes if num_classes is not None else _infer_num_classes(blackbox)
        if K is None:
            raise ValueError("num_classes: cannot infer K from the blackbox; pass num_classes=")
        device = torch.device(device) if device is not None else _device_of(blackbox)
        desc = dict(meta or {})
        desc["knockoff"] = run
        if resume:
            self.prepare_resume(out, N, num_shards, shard_id)
        slots = StateSlots(out)
        if not resume:
            slots.clear()
            (out / RUN_TIMES_FILE).unlink(missing_ok=True)
        writer = TransferSetWriter(out, num_classes=K, kind=kind, image_shape=image_shape, meta=desc,
                                   resume=resume)
        try:
            if self.strategy == "random":
                self._random(blackbox, queryset, writer, slots, kind, device, num_shards, shard_id)
            else:
                self._adaptive(blackbox, queryset, writer, slots, kind, device, budget, nqueries)
        finally:
            writer.close()
        return load_transferset(out)

    def _prepare(self, blackbox, writer: TransferSetWriter, slots: StateSlots, done: int,
                 n_batches_done: int, policy: Optional[AdaptivePolicy]) -> RunTimes:
        stateful = hasattr(blackbox, "resume_state") and hasattr(blackbox, "load_resume_state")
        if done > 0 and (stateful or policy is not None):
            states = slots.load(done)
            if states is None:
                raise RuntimeError(f"{writer.folder}: no state snapshot for the {done} committed queries "
                                   f"({', '.join(STATE_FILES)}); cannot resume exactly, start over with "
                                   "resume=False")
            if stateful:
                blackbox.load_resume_state(states["blackbox"])
            if policy is not None:
                policy.load_state_dict(states["policy"])
        elif stateful:
            blackbox.load_resume_state(None)
        qlog = _query_logger(blackbox)
        if qlog is not None and qlog.count != done * self.qpi:
            qlog.truncate(done * self.qpi)  # answered, never committed: a crash between the two
        times = RunTimes(writer.folder / RUN_TIMES_FILE, n_batches_done * self.qpi)
        self.run_times = times.times
        return times

    def _query(self, blackbox, x: Tensor, times: RunTimes) -> Tensor:
        ys = []
        for _ in range(self.qpi):
            t0 = time.perf_counter()
            y = blackbox(x)
            y = y.detach().float().cpu()
            times.append(time.perf_counter() - t0)
            ys.append(y)
        return torch.stack(ys).mean(dim=0) if len(ys) > 1 else ys[0]

    def _snapshot(self, slots: StateSlots, t: int, done: int, blackbox, policy) -> None:
        states = {}
        if hasattr(blackbox, "resume_state") and hasattr(blackbox, "load_resume_state"):
            states["blackbox"] = blackbox.resume_state()
        if policy is not None:
            states["policy"] = policy.state_dict()
        if states:
            slots.save(t, done, states)

    def _random(self, blackbox, queryset, writer, slots, kind, device, S, I) -> None:
        batches = self.query_order(len(queryset))
        if S > len(batches):
            raise ValueError(f"num_shards ({S}) exceeds the number of batches ({len(batches)})")
        mine = [(t, b) for t, b in enumerate(batches) if t % S == I]
        ends = np.cumsum([len(b) for _, b in mine])
        done = writer.done
        total = int(ends[-1])
        j0 = 0 if done == 0 else int(np.searchsorted(ends, done)) + 1
        if done > total or (done > 0 and ends[j0 - 1] != done):
            raise RuntimeError(f"{writer.folder}: holds {done} queries, not a batch boundary of this run")
        times = self._prepare(blackbox, writer, slots, done, j0, None)
        todo = mine[j0:]
        loader = None
        if self.num_workers > 0 and todo:
            loader = iter(torch.utils.data.DataLoader(queryset, batch_sampler=[b.tolist() for _, b in todo],
                                                      num_workers=self.num_workers))
        try:
            with tqdm(total=total, initial=done, disable=not self.progress, desc="transfer set",
                      unit="query") as pbar:
                for t, idxs in todo:
                    reseed_blackbox(blackbox, batch_seed(self.seed, t))
                    x = next(loader)[0] if loader is not None else load_images(queryset, idxs)
                    y = self._query(blackbox, x.to(device), times)
                    done += len(idxs)
                    self._snapshot(slots, t, done, blackbox, None)
                    writer.append(idxs, raw_items(queryset, idxs, kind), y)
                    pbar.update(len(idxs))
        finally:
            times.close()

    def _adaptive(self, blackbox, queryset, writer, slots, kind, device, budget, nqueries) -> None:
        labels = getattr(queryset, "targets", None)
        if labels is None:
            raise TypeError(f"the adaptive strategy needs the query set's labels (.targets); "
                            f"{type(queryset).__name__} has none")
        labels = np.asarray(labels, dtype=np.int64)
        hierarchy = None
        if self.hierarchy is not None:
            hierarchy = load_hierarchy(self.hierarchy, getattr(queryset, "classes", None))
        pool = shuffled_pool(len(queryset), budget, self.seed)
        policy = AdaptivePolicy(labels, pool, reward=self.reward, alpha=self.alpha, delta=self.delta,
                                hierarchy=hierarchy, online_model=self.online_model, online_lr=self.online_lr)
        self.policy = policy
        done = writer.done
        B = self.batch_size
        if done > nqueries or (done % B and done != nqueries):
            raise RuntimeError(f"{writer.folder}: holds {done} queries, not a batch boundary of this run")
        t = -(-done // B)
        times = self._prepare(blackbox, writer, slots, done, t, policy)
        try:
            with tqdm(total=nqueries, initial=done, disable=not self.progress, desc="transfer set (adaptive)",
                      unit="query") as pbar:
                while done < nqueries and not policy.exhausted:
                    seed_t = batch_seed(self.seed, t)
                    reseed_blackbox(blackbox, seed_t)
                    rng = np.random.default_rng(seed_t)
                    idxs, paths = policy.sample(min(B, nqueries - done), rng)
                    x = load_images(queryset, idxs)
                    y = self._query(blackbox, x.to(device), times)
                    policy.update(x, y, paths)
                    done += len(idxs)
                    self._snapshot(slots, t, done, blackbox, policy)
                    writer.append(idxs, raw_items(queryset, idxs, kind), y)
                    pbar.update(len(idxs))
                    t += 1
        finally:
            times.close()

    # -- ART-style entry point -------------------------------------------------------------------
    def extract(self, blackbox, queryset, out_dir, surrogate: nn.Module, *, epochs: int = 10,
                lr: float = 0.01, momentum: float = 0.5, train_batch_size: int = 64, transform=None,
                device: Union[str, torch.device, None] = None, **build_kwargs) -> nn.Module:
        """Builds (or resumes) the transfer set, then trains ``surrogate`` on it with soft
        cross-entropy (SGD, the attacker-training defaults lr 0.01, momentum 0.5, batch 64).

        ``transform`` turns the stored images into model inputs (default: the query set's
        ``transform``). Returns the trained surrogate (in eval mode).
        """
        if not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be an nn.Module, got {type(surrogate).__name__}")
        check_count("epochs", epochs)
        transform = transform if transform is not None else getattr(queryset, "transform", None)
        if transform is None:
            raise ValueError("transform: the query set has no .transform; pass the one that turns a stored "
                             "PIL image into a model input")
        ts = self.build_transferset(blackbox, queryset, out_dir, device=device, **build_kwargs)
        dev = torch.device(device) if device is not None else _device_of(surrogate)
        data = ts.dataset(transform)
        loader = torch.utils.data.DataLoader(data, batch_size=train_batch_size, shuffle=True)
        opt = torch.optim.SGD(surrogate.parameters(), lr=lr, momentum=momentum)
        surrogate.to(dev).train()
        for epoch in tqdm(range(epochs), disable=not self.progress, desc="knockoff training", unit="epoch"):
            for xb, yb in loader:
                loss = soft_cross_entropy(surrogate(xb.to(dev)), yb.to(dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
            logger.debug("knockoff training: epoch %d loss %.4f", epoch + 1, loss.item())
        return surrogate.eval()
