"""Knockoff Nets (Orekondy, Schiele, Fritz, CVPR 2019, arXiv:1812.02766): building a transfer
set by querying a (defended) black box with images of the attacker's query set, in the
``random`` order (:mod:`~ppoison_ext.attacks.query_order`) or by the ``adaptive`` policy
(:mod:`~ppoison_ext.attacks.adaptive`); resumable (:mod:`~ppoison_ext.attacks.runstate`).
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

from ..checks import check_choices, int_arg, type_arg
from ..defenses import Defense, QueryLogger
from ..devices import as_device
from ..fileio import truncate_file
from ..losses import soft_cross_entropy
from ..models.heads import num_classes_of
from ..training import Steps, device_of, fit
from .adaptive import REWARDS, AdaptivePolicy, load_hierarchy
from .base import Attack
from .query_order import DEFAULT_SEED, random_query_order, resolve_budget, shuffled_pool
from .queryset import load_images, raw_items, storage_kind
from .runstate import RUN_TIMES_FILE, STATE_FILES, RunTimes, StateSlots, batch_seed, reseed_blackbox
from .transferset import (INDEX_FILE, META, Y_FILE, TransferSet, TransferSetError, TransferSetWriter,
                          load_transferset)

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


def _stateful(blackbox) -> bool:
    return isinstance(blackbox, Defense) and blackbox.stateful


class KnockoffNets(Attack):
    """Knockoff Nets transfer-set construction, random or adaptive: ``budget`` distinct query
    images, the first of a seed-``seed`` shuffle of the query set (default: all), ``nqueries``
    queries (default ``budget``), ``qpi`` queries per image (the stored posterior is their mean).
    ``seed`` also fixes the per-batch seeds; ``reward`` … ``online_lr`` are :class:`AdaptivePolicy`'s;
    ``num_workers`` DataLoader workers load the random policy's images (0: loaded after the
    batch's reseed, so random transforms are reproducible). E.g.
    ``KnockoffNets(budget=60000).extract(defense, queryset, "out/", surrogate=net)``.
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
        check_choices(strategy=(strategy, STRATEGIES), reward=(reward, REWARDS))
        for name in ("budget", "nqueries"):
            if getattr(self, name) is not None:
                int_arg(getattr(self, name), name)
        int_arg(self.batch_size, "batch_size")
        int_arg(self.qpi, "qpi")
        int_arg(self.num_workers, "num_workers", low=0)
        int_arg(self.seed, "seed", low=None)
        if self.online_model is not None and not isinstance(self.online_model, nn.Module):
            raise TypeError(f"online_model must be an nn.Module, got {type(self.online_model).__name__}")
        self.run_times: List[float] = []
        self.policy: Optional[AdaptivePolicy] = None
        self._order: Optional[Tuple[tuple, List[np.ndarray]]] = None

    def run_params(self, n: int, num_shards: int = 1, shard_id: int = 0) -> Dict[str, Any]:
        """The settings that fix a run's queries (recorded in ``transferset.json``; resuming
        needs them equal), for a query set of ``n`` images."""
        num_shards = int_arg(num_shards, "num_shards")
        shard_id = int_arg(shard_id, "shard_id", low=0)
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
        if not (out / META).exists():
            return 0
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
        if not (out / Y_FILE).exists():
            return 0
        try:
            ts = load_transferset(out)
        except TransferSetError as err:
            raise ValueError(f"{out}: cannot resume from the transfer set there ({err}); start over "
                             "(resume=False / --no-resume)") from err
        done = len(ts)
        if done == 0:
            return 0
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

    def build_transferset(self, blackbox, queryset, out_dir=None, *, resume: bool = True,
                          device: Union[str, torch.device, None] = None, num_classes: Optional[int] = None,
                          meta: Optional[Mapping[str, Any]] = None, num_shards: int = 1,
                          shard_id: int = 0) -> TransferSet:
        """Queries ``blackbox`` (x → y′ [B, K]) and writes the transfer set into ``out_dir``;
        returns it (this shard's part when sharded: batches t with t % num_shards == shard_id).
        ``queryset`` is a Dataset of (tensor, label) with ``.data`` (uint8 images, stored raw) or
        ``.samples`` (stored as paths), and ``.targets`` for the adaptive policy. ``resume``
        continues the queries committed there (same settings required). ``meta`` is stored in
        ``transferset.json``."""
        out = self.output_folder(out_dir)
        if self.strategy == "adaptive" and self.reward in ("loss", "all") and self.online_model is None:
            raise ValueError(f"strategy 'adaptive' with reward {self.reward!r} needs online_model")
        if num_shards > 1 and self.strategy != "random":
            raise ValueError("sharding needs the random strategy (the adaptive policy is sequential)")
        if num_shards > 1 and _stateful(blackbox):
            raise ValueError("sharding cannot be used with a stateful defense (a white-box one's online "
                             "attacker, a quantizer's centroids: its answers depend on earlier queries)")
        kind, image_shape = storage_kind(queryset)
        N = len(queryset)
        run = self.run_params(N, num_shards, shard_id)
        budget, nqueries = run["budget"], run["nqueries"]
        K = num_classes if num_classes is not None else _infer_num_classes(blackbox)
        if K is None:
            raise ValueError("num_classes: cannot infer K from the blackbox; pass num_classes=")
        device = as_device(device, default=device_of(blackbox))
        desc = {**(meta or {}), "knockoff": run}
        slots = StateSlots(out)
        if resume:
            self.prepare_resume(out, N, num_shards, shard_id)
        else:
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
        """Restores the black box's and the policy's state for ``done`` committed queries."""
        stateful = _stateful(blackbox)
        if done > 0 and (stateful or policy is not None):
            states = slots.load(done)
            if states is None:
                raise RuntimeError(f"{writer.folder}: no state snapshot for the {done} committed queries "
                                   f"({', '.join(STATE_FILES)}); cannot resume exactly, start over with "
                                   "resume=False")
            if stateful:
                blackbox.set_state(states["blackbox"] or {})
            if policy is not None:
                policy.load_state_dict(states["policy"])
        elif stateful:
            blackbox.set_state({})
        qlog = getattr(blackbox, "logger", None)
        if isinstance(qlog, QueryLogger) and qlog.count != done * self.qpi:
            qlog.truncate(done * self.qpi)  # answered, never committed: a crash between the two
        times = RunTimes(writer.folder / RUN_TIMES_FILE, n_batches_done * self.qpi)
        self.run_times = times.times
        return times

    #: load the batch's images anew for every one of the qpi calls (Smoothing: independent augmentations)
    reload_per_query = False

    def _query(self, blackbox, x: Tensor, times: RunTimes, reload=None) -> Tensor:
        ys = []
        for q in range(self.qpi):
            xq = reload().to(x.device) if q > 0 and reload is not None and self.reload_per_query else x
            t0 = time.perf_counter()
            ys.append(blackbox(xq).detach().float().cpu())
            times.append(time.perf_counter() - t0)
        return torch.stack(ys).mean(dim=0) if len(ys) > 1 else ys[0]

    def _commit_batches(self, blackbox, queryset, writer, slots, kind, device, times: RunTimes, batches,
                        total: int, desc: str, policy: Optional[AdaptivePolicy] = None) -> None:
        """Queries each ``(t, idxs, x, paths)`` of ``batches`` (the black box already reseeded),
        updates the policy, snapshots the state and commits the batch."""
        done = writer.done
        try:
            with tqdm(total=total, initial=done, disable=not self.progress, desc=desc, unit="query") as pbar:
                for t, idxs, x, paths in batches:
                    y = self._query(blackbox, x.to(device), times, lambda: load_images(queryset, idxs))
                    if policy is not None:
                        policy.update(x, y, paths)
                    done += len(idxs)
                    states = {"policy": policy.state_dict()} if policy is not None else {}
                    if _stateful(blackbox):
                        states = {"blackbox": blackbox.get_state(), **states}
                    if states:
                        slots.save(t, done, states)
                    writer.append(idxs, raw_items(queryset, idxs, kind), y)
                    pbar.update(len(idxs))
        finally:
            times.close()

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

        def reseeded_batches():
            for t, idxs in todo:
                reseed_blackbox(blackbox, batch_seed(self.seed, t))
                yield t, idxs, next(loader)[0] if loader is not None else load_images(queryset, idxs), None

        self._commit_batches(blackbox, queryset, writer, slots, kind, device, times, reseeded_batches(),
                             total, "transfer set")

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
        first = -(-done // B)
        times = self._prepare(blackbox, writer, slots, done, first, policy)

        def sampled_batches():
            t, sampled = first, done
            while sampled < nqueries and not policy.exhausted:
                seed_t = batch_seed(self.seed, t)
                reseed_blackbox(blackbox, seed_t)
                idxs, paths = policy.sample(min(B, nqueries - sampled), np.random.default_rng(seed_t))
                yield t, idxs, load_images(queryset, idxs), paths
                t, sampled = t + 1, sampled + len(idxs)

        self._commit_batches(blackbox, queryset, writer, slots, kind, device, times, sampled_batches(),
                             nqueries, "transfer set (adaptive)", policy)

    def extract(self, blackbox, queryset, out_dir, surrogate: nn.Module, *, epochs: int = 10,
                lr: float = 0.01, momentum: float = 0.5, train_batch_size: int = 64, transform=None,
                device: Union[str, torch.device, None] = None, **build_kwargs) -> nn.Module:
        """Builds (or resumes) the transfer set, then trains ``surrogate`` (returned in eval mode)
        on it with soft cross-entropy and SGD; ``transform`` turns the stored images into model
        inputs (default: the query set's ``transform``)."""
        type_arg(surrogate, "surrogate", nn.Module, "an nn.Module")
        int_arg(epochs, "epochs")
        transform = transform if transform is not None else getattr(queryset, "transform", None)
        if transform is None:
            raise ValueError("transform: the query set has no .transform; pass the one that turns a stored "
                             "PIL image into a model input")
        ts = self.build_transferset(blackbox, queryset, out_dir, device=device, **build_kwargs)
        dev = as_device(device, default=device_of(surrogate))
        opt = torch.optim.SGD(surrogate.parameters(), lr=lr, momentum=momentum)
        fit(surrogate.to(dev), ts.dataset(transform), Steps(soft_cross_entropy), optimizer=opt, device=dev,
            epochs=epochs, batch_size=train_batch_size, progress=self.progress, desc="knockoff training")
        return surrogate.eval()
