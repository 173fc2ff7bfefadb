"""Knockoff Nets (Orekondy, Schiele, Fritz. "Knockoff Nets: Stealing Functionality of
Black-Box Models", CVPR 2019, arXiv:1812.02766): building a transfer set by querying a
(defended) black box with images of the attacker's query set.

Two policies:

``random`` — the original ``RandomAdversaryIters`` (``PP:defenses/adversary/transfer.py``),
reproduced query for query. The images are the first ``budget`` entries of a seed-42
``np.random.shuffle`` of ``arange(N)``; each step draws ``np.random.choice(list(idx_set),
size, replace=False)`` from the remaining pool (a Python ``set``), removes the draw, and
refills the pool when it empties. :func:`random_query_order` computes the same sequence
of batches up front: the RNG calls are the original's (legacy ``choice`` without
replacement is ``permutation(len(pool))[:size]``), and the pool's ``list(set)`` order is
reproduced with a sorted array while CPython's set table would iterate in sorted order
(all keys below its table size) and with real ``set`` objects afterwards. The order is the
one the running CPython's set iteration gives (checked against a literal port of the loop
on CPython 3.11; the original ran on 3.7, whose set implementation is believed to behave
the same here, not verified).

``adaptive`` — never released by the authors (both original CLIs raise
``NotImplementedError``; ``KO:knockoff/adversary/adaptive.py`` is a random-sampling stub).
Implemented here from the paper (§4.1.2 and the supplementary):

* **Actions** are the query set's labels. With a hierarchy (``{coarse: [fine, ...]}``,
  e.g. from a JSON file for folder datasets) the policy first picks a coarse node, then a
  fine label below it; without one it is a flat bandit over the labels. An action yields
  one image of that label drawn uniformly *without replacement*; exhausted labels (and
  groups) drop out of the softmax.
* **Policy**: gradient bandit. π = softmax(H) at every node; after reward r_t for the
  path's choice a at each node on the path:
  H(a) += α (r_t − r̄_t)(1 − π(a)),  H(a′) −= α (r_t − r̄_t) π(a′) for the node's other
  (still available) children.
* **Rewards** (on the released posterior y′_t):
  ``cert``: top-1 minus top-2 of y′_t;
  ``div``: Σ_k max(0, y′_{t,k} − ȳ_k), ȳ = mean of the last Δ posteriors before t (0 for
  the very first query);
  ``loss``: −Σ_k y′_{t,k} log ŷ_{t,k}, the soft cross-entropy between y′_t and the online
  knockoff's prediction ŷ_t *before* it is trained on the batch; the knockoff then takes
  one SGD step (soft CE, mean over the batch) per batch;
  ``all``: the sum of the three, each z-normalized by its running mean and std over all
  rewards so far (Welford, including the current one; 0 while the std is 0), as the paper
  normalizes each reward before combining them.

Constants the paper does not pin down (so chosen here, all constructor arguments):
α = 0.1 (constant step size, as Sutton & Barto's gradient bandit), Δ = 25, baseline r̄_t =
running mean of all earlier rewards (0 before the first), online knockoff trained by SGD
with lr 0.01 and momentum 0.5 (the original attacker-training defaults, §4.2).

Batching: each batch samples B actions from the policy as it stands (availability updated
as images are consumed), queries the B images in one call, then applies the B reward /
preference updates in order, one per sample.

Determinism and resuming (both policies): before batch t, torch's and numpy's global RNGs
are seeded with a seed derived from ``(seed, t)`` (the original seeded once with 42 at the
start), so stochastic defenses (``rand_noise``, MAD's ``oracle:random``, dropout in a
train-mode proxy) give the same answers for a batch whether or not the run was
interrupted, and a batch computed on another shard. Defenses with their own ``seed``
argument are reseeded per batch too. Objects whose state evolves with the queries (the
adaptive policy; white-box defenses exposing ``resume_state()``/``load_resume_state()``)
are snapshotted after every batch into two alternating files, ``resume_state.{0,1}.pt``,
before the batch is committed, so the snapshot matching the committed transfer set always
exists. Per-call wall times are appended to ``run_times.f64`` (float64).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import time
from collections import deque
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..defenses import Defense, QueryLogger
from ..fileio import atomic_write
from .transferset import (INDEX_FILE, META, Y_FILE, TransferSet, TransferSetError, TransferSetWriter,
                          load_transferset)

__all__ = ["KnockoffNets", "AdaptivePolicy", "random_query_order", "batch_seed", "reseed_blackbox",
           "load_hierarchy", "RUN_TIMES_FILE", "STATE_FILES"]

logger = logging.getLogger(__name__)

DEFAULT_SEED = 42
RUN_TIMES_FILE = "run_times.f64"
STATE_FILES = ("resume_state.0.pt", "resume_state.1.pt")
REWARDS = ("cert", "div", "loss", "all")
STRATEGIES = ("random", "adaptive")


# ---------------------------------------------------------------------------------------------
# The original query order
# ---------------------------------------------------------------------------------------------


def _copy_table_size(used: int) -> int:
    """Table size of ``set_copy`` of a set with ``used`` keys (CPython ``set_merge`` into an
    empty set: one resize to the smallest power of two > 2·used, unless used < 5)."""
    m = 8
    if used * 5 >= 21:
        while m <= 2 * used:
            m <<= 1
    return m


def _sorted_layout_set(keys: np.ndarray) -> set:
    """A real set holding ``keys`` (sorted ints) each in slot ``key`` of its table, so it
    iterates in sorted order, as the original's set does while all keys are below its size."""
    top = int(keys[-1]) + 1 if len(keys) else 0
    s = set(range(top))  # table larger than every key: slot == key
    keep = np.zeros(top, dtype=bool)
    keep[keys] = True
    deque(map(s.discard, np.flatnonzero(~keep).tolist()), maxlen=0)  # discards never resize
    return s


class _Pool:
    """The original's ``idx_set``: sorted numpy keys while ``list(set)`` is sorted, else a set."""

    def __init__(self, pool_list: List[int]):
        s = set(pool_list)
        lst = list(s)
        arr = np.asarray(lst, dtype=np.int64)
        if arr.size < 2 or bool((arr[1:] > arr[:-1]).all()):
            self.keys: Optional[np.ndarray] = arr
            self.set: Optional[set] = None
            self.list: Optional[list] = None
        else:
            self.keys, self.set, self.list = None, s, lst

    @property
    def size(self) -> int:
        return len(self.keys) if self.set is None else len(self.set)

    def take_remove(self, pos: np.ndarray) -> np.ndarray:
        """``list(set)[pos]``, then ``set - set(taken)`` exactly as CPython does it."""
        if self.set is None:
            keys = self.keys
            taken = keys[pos]
            pop = len(keys)
            # set_difference copies the set (table size _copy_table_size) when len/4 > len(other);
            # with every key below that size the copy still iterates sorted.
            if (pop >> 2) > len(pos) and int(keys[-1]) < _copy_table_size(pop):
                keep = np.ones(pop, dtype=bool)
                keep[pos] = False
                self.keys = keys[keep]
                return taken
            self.set = _sorted_layout_set(keys) - set(taken.tolist())
            self.list = list(self.set)
            self.keys = None
            return taken
        lst = self.list
        taken = np.asarray([lst[p] for p in pos.tolist()], dtype=np.int64)
        self.set = self.set - set(taken.tolist())
        self.list = list(self.set)
        return taken


def _check_count(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def _resolve_budget(n: int, budget: Optional[int], nqueries: Optional[int], batch_size: int,
                    strategy: str = "random") -> Tuple[int, int]:
    n = _check_count("n (the query-set size)", n)
    budget = n if budget is None else _check_count("budget", budget)
    if budget > n:
        raise ValueError(f"budget ({budget}) exceeds the query set's {n} images")
    nqueries = budget if nqueries is None else _check_count("nqueries", nqueries)
    if nqueries > budget:
        if strategy == "adaptive":
            raise ValueError(f"nqueries ({nqueries}) > budget ({budget}): the adaptive policy never repeats "
                             "an image")
        if budget % batch_size:
            # The original draws min(B, remaining) from a pool of budget % B images and crashes
            # (np.random.choice: "Cannot take a larger sample than population").
            raise ValueError(f"nqueries ({nqueries}) > budget ({budget}) repeats images only when batch_size "
                             f"divides budget (the original crashes otherwise); got batch_size {batch_size}")
    return budget, nqueries


def random_query_order(n: int, budget: Optional[int] = None, nqueries: Optional[int] = None,
                       batch_size: int = 1, seed: int = DEFAULT_SEED) -> List[np.ndarray]:
    """The original Knockoff "random" query order, as a list of index batches.

    Identical to running ``PP:defenses/adversary/transfer.py``'s loop (``np.random.seed(42)``,
    ``np.random.shuffle(arange(n))``, per step ``np.random.choice(list(idx_set), size,
    replace=False)`` and the refill of the pool), without its O(N²/B) ``list``/``set``
    rebuilding while the pool's set order is sorted. The legacy ``permutation`` per step
    (the RNG work itself) remains: about 40 s at n = 60000, batch_size = 1.

    Args:
        n: query-set size N.
        budget: number of distinct images (the first ``budget`` of the shuffle); default N.
        nqueries: number of queries; default ``budget``. Above ``budget`` images repeat, which
            needs ``budget % batch_size == 0`` (the original crashes otherwise).
        batch_size: images per step B.
        seed: 42 in the original.

    Returns:
        ``ceil(nqueries / B)`` int64 arrays of query-set indices (all of size B but the last).
    """
    batch_size = _check_count("batch_size", batch_size)
    budget, nqueries = _resolve_budget(n, budget, nqueries, batch_size)
    rs = np.random.RandomState(seed)
    all_idxs = np.arange(n)
    rs.shuffle(all_idxs)
    pool_list = all_idxs[:budget].tolist()
    pool = _Pool(pool_list)
    out: List[np.ndarray] = []
    done = 0
    while done < nqueries:
        size = min(batch_size, nqueries - done)
        pos = rs.permutation(pool.size)[:size]  # legacy choice(a, size, replace=False)
        out.append(pool.take_remove(pos))
        if pool.size == 0:
            pool = _Pool(pool_list)
        done += size
    return out


def _shuffled_pool(n: int, budget: int, seed: int) -> np.ndarray:
    rs = np.random.RandomState(seed)
    all_idxs = np.arange(n)
    rs.shuffle(all_idxs)
    return all_idxs[:budget]


# ---------------------------------------------------------------------------------------------
# Per-batch seeding
# ---------------------------------------------------------------------------------------------


def batch_seed(seed: int, batch_index: int) -> int:
    """The 32-bit seed used before batch ``batch_index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(batch_index)]).generate_state(1)[0])


def reseed_blackbox(blackbox: Any, seed: int) -> None:
    """Seeds torch's and numpy's global RNGs with ``seed``, and every defense inside
    ``blackbox`` that has its own ``seed`` (with a seed derived from both): via its
    ``reseed(seed)`` method when it has one, else by resetting its generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    if not isinstance(blackbox, nn.Module):
        return
    for m in blackbox.modules():
        if isinstance(m, Defense):
            m.reseed(seed)


# ---------------------------------------------------------------------------------------------
# Files: run times, state snapshots
# ---------------------------------------------------------------------------------------------


class _RunTimes:
    """Append-only float64 seconds per black-box call; cut to ``keep`` entries on open (missing
    ones, e.g. a deleted file, become NaN)."""

    def __init__(self, path: Path, keep: int):
        self.path = path
        old = np.fromfile(path, dtype="<f8") if path.exists() else np.zeros(0)
        if old.size < keep:
            logger.warning("%s: holds %d call times, the committed queries made %d; the missing ones are NaN",
                           path, old.size, keep)
        with open(path, "ab") as f:
            f.truncate(min(old.size, keep) * 8)
            if old.size < keep:
                f.write(np.full(keep - old.size, np.nan, dtype="<f8").tobytes())
                old = np.concatenate([old, np.full(keep - old.size, np.nan)])
        self.times = old[:keep].tolist()
        self._f = open(path, "ab")

    def append(self, dt: float) -> None:
        self.times.append(dt)
        self._f.write(np.asarray([dt], dtype="<f8").tobytes())
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class _StateSlots:
    """Two alternating snapshot files; a snapshot is tagged with the query count it matches."""

    def __init__(self, folder: Path):
        self.paths = [folder / name for name in STATE_FILES]

    def save(self, batch_index: int, done: int, states: Dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({"batch_index": int(batch_index), "done": int(done), "states": states}, buf)
        data = buf.getvalue()
        atomic_write(self.paths[batch_index % 2], lambda f: f.write(data))

    def load(self, done: int) -> Optional[Dict[str, Any]]:
        for p in self.paths:
            if not p.exists():
                continue
            try:
                snap = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - a corrupt slot is as good as none
                logger.warning("ignoring unreadable state snapshot %s (%s)", p, err)
                continue
            if int(snap.get("done", -1)) == done:
                return snap["states"]
        return None

    def clear(self) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Query sets
# ---------------------------------------------------------------------------------------------


def _storage(queryset) -> Tuple[str, Optional[List[int]]]:
    if hasattr(queryset, "samples"):
        return "paths", None
    data = getattr(queryset, "data", None)
    if data is None:
        raise TypeError(f"queryset {type(queryset).__name__} has neither .samples (image paths) nor .data "
                        "(a uint8 image array): the transfer set cannot store its images")
    return "images", [int(s) for s in np.asarray(data[:1]).shape[1:]]


def _raw(queryset, idxs: np.ndarray, kind: str):
    if kind == "paths":
        return [queryset.samples[int(i)][0] for i in idxs]
    data = queryset.data
    if isinstance(data, Tensor):
        return data[torch.as_tensor(idxs)].numpy()
    return np.asarray(data)[idxs]


def _load_x(queryset, idxs: Iterable[int]) -> Tensor:
    return torch.stack([queryset[int(i)][0] for i in idxs])


def load_hierarchy(spec: Union[str, Path, Mapping[str, Sequence[Union[int, str]]]],
                   classes: Optional[Sequence[str]] = None) -> Dict[str, List[int]]:
    """A coarse → fine label hierarchy as ``{coarse: [label index, ...]}``.

    ``spec`` is a mapping or the path of a JSON file holding one; fine labels are indices or
    names from ``classes`` (the query set's ``.classes``).
    """
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            spec = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"hierarchy: cannot read JSON from {path} ({err})") from err
    if not isinstance(spec, Mapping) or not spec:
        raise TypeError("hierarchy must be a non-empty mapping {coarse: [fine label, ...]}")
    lookup = {str(c): i for i, c in enumerate(classes)} if classes is not None else {}
    out: Dict[str, List[int]] = {}
    seen: Dict[int, str] = {}
    for coarse, fines in spec.items():
        if isinstance(fines, (str, bytes)) or not isinstance(fines, Sequence):
            raise TypeError(f"hierarchy[{coarse!r}] must be a list of labels, got {type(fines).__name__}")
        ids = []
        for f in fines:
            if isinstance(f, (int, np.integer)) and not isinstance(f, bool):
                i = int(f)
            elif isinstance(f, str) and f in lookup:
                i = lookup[f]
            else:
                known = "" if classes is None else f"; the query set's classes are {list(classes)[:20]}..."
                raise ValueError(f"hierarchy[{coarse!r}]: unknown label {f!r}{known}")
            if i in seen:
                raise ValueError(f"hierarchy: label {f!r} is under both {seen[i]!r} and {coarse!r}")
            seen[i] = str(coarse)
            ids.append(i)
        out[str(coarse)] = ids
    return out


# ---------------------------------------------------------------------------------------------
# The adaptive policy
# ---------------------------------------------------------------------------------------------


def _soft_ce(logits: Tensor, targets: Tensor) -> Tensor:
    return torch.mean(torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1))


class AdaptivePolicy:
    """The gradient-bandit sampling policy of Knockoff Nets' adaptive strategy (see the
    module docs for the exact rules and constants).

    Args:
        labels: label of every query-set image [N].
        pool: the query-set indices the policy may use (each at most once).
        reward: ``cert``, ``div``, ``loss`` or ``all``.
        alpha: step size α of the preference updates.
        delta: Δ, the number of recent posteriors the ``div`` reward compares with.
        hierarchy: ``{coarse: [label, ...]}`` (label indices); None: a flat bandit.
        online_model: the knockoff trained online (needed by ``loss`` and ``all``).
        online_lr, online_momentum: its SGD settings.
    """

    def __init__(self, labels: Sequence[int], pool: Sequence[int], *, reward: str = "all", alpha: float = 0.1,
                 delta: int = 25, hierarchy: Optional[Mapping[str, Sequence[int]]] = None,
                 online_model: Optional[nn.Module] = None, online_lr: float = 0.01,
                 online_momentum: float = 0.5):
        if reward not in REWARDS:
            raise ValueError(f"reward must be one of {list(REWARDS)}, got {reward!r}")
        if reward in ("loss", "all") and online_model is None:
            raise ValueError(f"reward {reward!r} needs online_model (the knockoff trained while querying)")
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.delta = _check_count("delta", delta)
        labels = np.asarray(labels, dtype=np.int64)
        pool = np.asarray(pool, dtype=np.int64)
        if pool.size == 0:
            raise ValueError("pool is empty")
        self.reward, self.alpha = reward, float(alpha)
        pool_labels = labels[pool]
        self.actions = np.unique(pool_labels)  # action a <-> label self.actions[a]
        act_of_label = {int(lab): a for a, lab in enumerate(self.actions)}
        self.remaining = [pool[pool_labels == lab].copy() for lab in self.actions]
        self.counts = np.array([len(r) for r in self.remaining], dtype=np.int64)
        if hierarchy is None:
            self.groups: List[np.ndarray] = [np.arange(len(self.actions))]
            self.group_names = ["all"]
            self.flat = True
        else:
            covered: Dict[int, str] = {}
            groups, names = [], []
            for coarse, fines in hierarchy.items():
                acts = [act_of_label[int(f)] for f in fines if int(f) in act_of_label]
                for f in fines:
                    covered[int(f)] = coarse
                if acts:
                    groups.append(np.asarray(acts, dtype=np.int64))
                    names.append(str(coarse))
            missing = [int(lab) for lab in self.actions if int(lab) not in covered]
            if missing:
                raise ValueError(f"hierarchy does not place labels {missing[:20]} (present in the query "
                                 "pool) under any coarse node")
            self.groups, self.group_names, self.flat = groups, names, False
        self.H_root = np.zeros(len(self.groups) if not self.flat else len(self.actions))
        self.H_groups = [np.zeros(len(g)) for g in self.groups] if not self.flat else []
        self.baseline, self.n_rewards = 0.0, 0
        self.stats = np.zeros((3, 3))  # per reward: count, mean, M2 (Welford)
        self.window: deque = deque(maxlen=self.delta)
        self.online_model = online_model
        self.online_opt = (torch.optim.SGD(online_model.parameters(), lr=online_lr, momentum=online_momentum)
                           if online_model is not None else None)

    # -- sampling ---------------------------------------------------------------------------
    @staticmethod
    def _softmax(h: np.ndarray, avail: np.ndarray) -> np.ndarray:
        p = np.zeros_like(h)
        if avail.any():
            z = h[avail] - h[avail].max()
            e = np.exp(z)
            p[avail] = e / e.sum()
        return p

    def _avail_root(self) -> np.ndarray:
        if self.flat:
            return self.counts > 0
        return np.array([bool((self.counts[g] > 0).any()) for g in self.groups])

    def action_probs(self) -> np.ndarray:
        """π over the actions (labels ``self.actions``): for a hierarchy, π(coarse)·π(fine | coarse)."""
        root = self._softmax(self.H_root, self._avail_root())
        if self.flat:
            return root
        out = np.zeros(len(self.actions))
        for gi, g in enumerate(self.groups):
            out[g] = root[gi] * self._softmax(self.H_groups[gi], self.counts[g] > 0)
        return out

    @property
    def exhausted(self) -> bool:
        return not bool((self.counts > 0).any())

    def sample(self, n: int, rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
        """Draws ``n`` images: returns their query-set indices and the (group, action) paths."""
        root_probs = self._softmax(self.H_root, self._avail_root())
        group_probs = [self._softmax(h, self.counts[g] > 0) for h, g in zip(self.H_groups, self.groups)]
        idxs, paths = [], []
        for _ in range(n):
            if self.exhausted:
                break
            avail_root = self._avail_root()
            p = root_probs * avail_root
            if p.sum() <= 0:
                p = avail_root.astype(float)
            top = int(rng.choice(len(p), p=p / p.sum()))
            if self.flat:
                g, a = 0, top
            else:
                g = top
                members = self.groups[g]
                q = group_probs[g] * (self.counts[members] > 0)
                if q.sum() <= 0:
                    q = (self.counts[members] > 0).astype(float)
                a = int(members[int(rng.choice(len(q), p=q / q.sum()))])
            j = int(rng.integers(self.counts[a]))
            rem = self.remaining[a]
            last = self.counts[a] - 1
            idx = int(rem[j])
            rem[j], rem[last] = rem[last], rem[j]
            self.counts[a] = last
            idxs.append(idx)
            paths.append((g, a))
        return np.asarray(idxs, dtype=np.int64), paths

    # -- rewards and updates ----------------------------------------------------------------
    def _welford(self, k: int, r: float) -> float:
        c, mean, m2 = self.stats[k]
        c += 1
        d = r - mean
        mean += d / c
        m2 += d * (r - mean)
        self.stats[k] = (c, mean, m2)
        std = math.sqrt(m2 / c) if c > 0 else 0.0
        return (r - mean) / std if std > 0 else 0.0

    def _bandit(self, h: np.ndarray, avail: np.ndarray, chosen: int, adv: float) -> None:
        pi = self._softmax(h, avail)
        step = self.alpha * adv
        upd = -step * pi
        upd[chosen] = step * (1.0 - pi[chosen])
        h[avail] += upd[avail]

    def update(self, x: Tensor, y_prime: Tensor, paths: Sequence[Tuple[int, int]]) -> np.ndarray:
        """Rewards for a queried batch (x [B, ...], released y′ [B, K]) and the policy updates;
        trains the online knockoff one step. Returns the rewards [B]."""
        B = len(paths)
        y = y_prime.detach().double().cpu()
        parts = {}
        if self.reward in ("cert", "all"):
            top = torch.topk(y, min(2, y.shape[1]), dim=1).values
            parts["cert"] = (top[:, 0] - (top[:, 1] if top.shape[1] > 1 else 0)).numpy()
        if self.reward in ("loss", "all"):
            model = self.online_model
            dev = next(model.parameters()).device
            xb = x.to(dev)
            tgt = y_prime.detach().float().to(dev)
            model.train()
            with torch.enable_grad():
                per_sample = -(tgt * F.log_softmax(model(xb), dim=1)).sum(1)
                parts["loss"] = per_sample.detach().double().cpu().numpy()  # before this batch's step
                self.online_opt.zero_grad()
                per_sample.mean().backward()
                self.online_opt.step()
        div = np.zeros(B)
        rewards = np.zeros(B)
        for i, (g, a) in enumerate(paths):
            yi = y[i].numpy()
            if self.reward in ("div", "all"):
                ref = np.mean(np.stack(self.window), axis=0) if self.window else np.zeros_like(yi)
                div[i] = np.maximum(0.0, yi - ref).sum()
                self.window.append(yi.copy())
            if self.reward == "all":
                r = (self._welford(0, float(parts["cert"][i])) + self._welford(1, float(div[i]))
                     + self._welford(2, float(parts["loss"][i])))
            elif self.reward == "div":
                r = float(div[i])
            else:
                r = float(parts[self.reward][i])
            rewards[i] = r
            adv = r - self.baseline
            if self.flat:
                self._bandit(self.H_root, self._avail_root() | (np.arange(len(self.H_root)) == a), a, adv)
            else:
                avail_root = self._avail_root()
                avail_root[g] = True
                self._bandit(self.H_root, avail_root, g, adv)
                members = self.groups[g]
                avail = self.counts[members] > 0
                pos = int(np.flatnonzero(members == a)[0])
                avail[pos] = True
                self._bandit(self.H_groups[g], avail, pos, adv)
            self.n_rewards += 1
            self.baseline += (r - self.baseline) / self.n_rewards
        return rewards

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        st = {
            "H_root": torch.from_numpy(self.H_root.copy()),
            "H_groups": [torch.from_numpy(h.copy()) for h in self.H_groups],
            "baseline": float(self.baseline), "n_rewards": int(self.n_rewards),
            "stats": torch.from_numpy(self.stats.copy()),
            "window": [torch.from_numpy(w.copy()) for w in self.window],
            "remaining": [torch.from_numpy(r.copy()) for r in self.remaining],
            "counts": torch.from_numpy(self.counts.copy()),
        }
        if self.online_model is not None:
            st["online"] = copy.deepcopy(self.online_model.state_dict())
            st["online_opt"] = copy.deepcopy(self.online_opt.state_dict())
        return st

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        self.H_root = st["H_root"].numpy().copy()
        self.H_groups = [h.numpy().copy() for h in st["H_groups"]]
        self.baseline, self.n_rewards = float(st["baseline"]), int(st["n_rewards"])
        self.stats = st["stats"].numpy().copy()
        self.window = deque((w.numpy().copy() for w in st["window"]), maxlen=self.delta)
        self.remaining = [r.numpy().copy() for r in st["remaining"]]
        self.counts = st["counts"].numpy().copy()
        if self.online_model is not None:
            self.online_model.load_state_dict(st["online"])
            self.online_opt.load_state_dict(st["online_opt"])


# ---------------------------------------------------------------------------------------------
# The attack
# ---------------------------------------------------------------------------------------------


def _infer_num_classes(blackbox) -> Optional[int]:
    for attr in ("num_classes", "K"):
        v = getattr(blackbox, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    model = getattr(blackbox, "model", blackbox)
    if isinstance(model, nn.Module):
        lins = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if lins:
            return int(lins[-1].out_features)
    return None


def _device_of(blackbox) -> torch.device:
    if isinstance(blackbox, nn.Module):
        for p in blackbox.parameters():
            return p.device
    return torch.device("cpu")


def _query_logger(blackbox):
    lg = getattr(blackbox, "logger", None)
    return lg if isinstance(lg, QueryLogger) else None


class KnockoffNets:
    """Knockoff Nets transfer-set construction (arXiv:1812.02766), random or adaptive.

    Hyperparameters are keyword arguments; see the module docs for the exact algorithms.

    Args:
        strategy: ``random`` (the original's query order) or ``adaptive`` (gradient bandit).
        budget: number of distinct query images, the first ``budget`` of a seed-``seed``
            shuffle of the query set (default: all).
        nqueries: number of queries (default ``budget``).
        batch_size: images per black-box call (the original's default was 1).
        qpi: queries per image; the stored posterior is the mean over ``qpi`` calls.
        seed: 42 reproduces the original order; also derives the per-batch seeds.
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
                _check_count(name, getattr(self, name))
        _check_count("batch_size", self.batch_size)
        _check_count("qpi", self.qpi)
        _check_count("num_workers", self.num_workers, 0)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {list(REWARDS)}, got {self.reward!r}")
        if self.online_model is not None and not isinstance(self.online_model, nn.Module):
            raise TypeError(f"online_model must be an nn.Module, got {type(self.online_model).__name__}")

    def __repr__(self) -> str:
        return f"KnockoffNets({', '.join(f'{k}={getattr(self, k)!r}' for k in self.attack_params)})"

    def run_params(self, n: int, num_shards: int = 1, shard_id: int = 0) -> Dict[str, Any]:
        """The settings that fix a run's queries (recorded in ``transferset.json``; resuming
        needs them equal), for a query set of ``n`` images."""
        num_shards = _check_count("num_shards", num_shards)
        shard_id = _check_count("shard_id", shard_id, 0)
        if shard_id >= num_shards:
            raise ValueError(f"shard_id must be < num_shards ({num_shards}), got {shard_id}")
        budget, nqueries = _resolve_budget(n, self.budget, self.nqueries, self.batch_size, self.strategy)
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
                with open(out / name, "r+b") as f:
                    f.truncate(keep * row)
        return keep

    # -- the main loop ----------------------------------------------------------------------
    def build_transferset(self, blackbox, queryset, out_dir, *, resume: bool = True,
                          device: Union[str, torch.device, None] = None, num_classes: Optional[int] = None,
                          meta: Optional[Mapping[str, Any]] = None, num_shards: int = 1,
                          shard_id: int = 0) -> TransferSet:
        """Queries ``blackbox`` and writes the transfer set into ``out_dir``.

        Args:
            blackbox: a callable x → y′ [B, K] (a :class:`~ppoison_ext.defenses.Defense`).
            queryset: the attacker's images: a Dataset of (tensor, label) with ``.data`` (uint8
                images, stored raw) or ``.samples`` (paths, stored as paths); ``.targets`` for
                the adaptive policy.
            out_dir: the transfer-set folder.
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
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.strategy == "adaptive" and self.reward in ("loss", "all") and self.online_model is None:
            raise ValueError(f"strategy 'adaptive' with reward {self.reward!r} needs online_model")
        if num_shards > 1 and self.strategy != "random":
            raise ValueError("sharding needs the random strategy (the adaptive policy is sequential)")
        if num_shards > 1 and hasattr(blackbox, "resume_state"):
            raise ValueError("sharding cannot be used with a white-box defense (its online attacker is "
                             "sequential)")
        kind, image_shape = _storage(queryset)
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
        slots = _StateSlots(out)
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

    def _prepare(self, blackbox, writer: TransferSetWriter, slots: _StateSlots, done: int,
                 n_batches_done: int, policy: Optional[AdaptivePolicy]) -> _RunTimes:
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
        times = _RunTimes(writer.folder / RUN_TIMES_FILE, n_batches_done * self.qpi)
        self.run_times = times.times
        return times

    def _query(self, blackbox, x: Tensor, times: _RunTimes) -> Tensor:
        ys = []
        for _ in range(self.qpi):
            t0 = time.perf_counter()
            y = blackbox(x)
            y = y.detach().float().cpu()
            times.append(time.perf_counter() - t0)
            ys.append(y)
        return torch.stack(ys).mean(dim=0) if len(ys) > 1 else ys[0]

    def _snapshot(self, slots: _StateSlots, t: int, done: int, blackbox, policy) -> None:
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
                    x = next(loader)[0] if loader is not None else _load_x(queryset, idxs)
                    y = self._query(blackbox, x.to(device), times)
                    done += len(idxs)
                    self._snapshot(slots, t, done, blackbox, None)
                    writer.append(idxs, _raw(queryset, idxs, kind), y)
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
        pool = _shuffled_pool(len(queryset), budget, self.seed)
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
                    x = _load_x(queryset, idxs)
                    y = self._query(blackbox, x.to(device), times)
                    policy.update(x, y, paths)
                    done += len(idxs)
                    self._snapshot(slots, t, done, blackbox, policy)
                    writer.append(idxs, _raw(queryset, idxs, kind), y)
                    pbar.update(len(idxs))
                    t += 1
        finally:
            times.close()

    # -- ART-style entry point -------------------------------------------------------------------
    def extract(self, blackbox, queryset, out_dir, surrogate: nn.Module, *, epochs: int = 10,
                lr: float = 0.01, momentum: float = 0.5, train_batch_size: int = 64, transform=None,
                device: Union[str, torch.device, None] = None, **build_kwargs) -> nn.Module:
        """Builds (or resumes) the transfer set, then trains ``surrogate`` on it with soft
        cross-entropy (SGD, the original attacker defaults lr 0.01, momentum 0.5, batch 64).

        ``transform`` turns the stored images into model inputs (default: the query set's
        ``transform``). Returns the trained surrogate (in eval mode).
        """
        if not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be an nn.Module, got {type(surrogate).__name__}")
        _check_count("epochs", epochs)
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
                loss = _soft_ce(surrogate(xb.to(dev)), yb.to(dev))
                opt.zero_grad()
                loss.backward()
                opt.step()
            logger.debug("knockoff training: epoch %d loss %.4f", epoch + 1, loss.item())
        return surrogate.eval()
