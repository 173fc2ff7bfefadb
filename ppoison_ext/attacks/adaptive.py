"""The Knockoff adaptive policy, a gradient bandit over the query set's labels, written from the
paper (§4.1.2 and the supplementary; differences.md: Knockoff adaptive).

* **Actions** are the query set's labels; with a hierarchy ``{coarse: [fine, ...]}`` the policy
  picks a coarse node, then a label below it. An action yields an image of that label drawn
  uniformly *without replacement*; exhausted labels (and groups) drop out of the softmax.
* **Policy**: π = softmax(H) at every node; after reward r_t, at each node of the path, for the
  chosen a: H(a) += α (r_t − r̄_t)(1 − π(a)), for the node's other available children a′:
  H(a′) −= α (r_t − r̄_t) π(a′).
* **Rewards** on the released posterior y′_t: ``cert`` top-1 minus top-2; ``div``
  Σ_k max(0, y′_{t,k} − ȳ_k), ȳ the mean of the last Δ posteriors (0 for the first query);
  ``loss`` the soft cross-entropy between y′_t and the online knockoff's prediction *before*
  it takes its one SGD step (soft CE, batch mean) on the batch; ``all`` the sum of the three,
  each z-normalised by its running mean and std (Welford, current reward included; 0 while
  the std is 0).

Constants the paper leaves open: α = 0.1, Δ = 25, baseline r̄_t = the running mean of the
earlier rewards (0 at first), online knockoff SGD lr 0.01, momentum 0.5. Each batch samples B
actions from the policy as it stands, queries them in one call, then applies the B updates.
"""

from __future__ import annotations

import copy
import json
import math
from collections import deque
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_choices, int_arg
from ..losses import soft_cross_entropy
from ..training import device_of, optimizer_step

__all__ = ["AdaptivePolicy", "load_hierarchy", "REWARDS"]

REWARDS = ("cert", "div", "loss", "all")


def load_hierarchy(spec: Union[str, Path, Mapping[str, Sequence[Union[int, str]]]],
                   classes: Optional[Sequence[str]] = None) -> Dict[str, List[int]]:
    """A coarse → fine label hierarchy as ``{coarse: [label index, ...]}`` from ``spec``, a
    mapping or the path of a JSON file holding one, whose fine labels are indices or names from
    ``classes`` (the query set's ``.classes``)."""
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


class AdaptivePolicy:
    """The gradient-bandit sampling policy of Knockoff Nets' adaptive strategy (module docs),
    over the query-set indices ``pool`` (each used at most once) labelled by ``labels`` [N];
    ``hierarchy`` holds label indices (None: a flat bandit); ``online_model`` is the knockoff
    trained while querying (needed by the ``loss`` and ``all`` rewards)."""

    def __init__(self, labels: Sequence[int], pool: Sequence[int], *, reward: str = "all", alpha: float = 0.1,
                 delta: int = 25, hierarchy: Optional[Mapping[str, Sequence[int]]] = None,
                 online_model: Optional[nn.Module] = None, online_lr: float = 0.01,
                 online_momentum: float = 0.5):
        check_choices(reward=(reward, REWARDS))
        if reward in ("loss", "all") and online_model is None:
            raise ValueError(f"reward {reward!r} needs online_model (the knockoff trained while querying)")
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        self.delta = int_arg(delta, "delta")
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
            self.groups, self.group_names, self.flat = [np.arange(len(self.actions))], ["all"], True
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
            dev = device_of(model)
            xb = x.to(dev)
            tgt = y_prime.detach().float().to(dev)
            model.train()
            with torch.enable_grad():
                per_sample = soft_cross_entropy(model(xb), tgt, reduction="none")
                parts["loss"] = per_sample.detach().double().cpu().numpy()  # before this batch's step
                optimizer_step(self.online_opt, per_sample.mean())
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
            top = a if self.flat else g  # the root's choice; the chosen one counts as available
            avail_root = self._avail_root()
            avail_root[top] = True
            self._bandit(self.H_root, avail_root, top, adv)
            if not self.flat:
                members = self.groups[g]
                avail = self.counts[members] > 0
                pos = int(np.flatnonzero(members == a)[0])
                avail[pos] = True
                self._bandit(self.H_groups[g], avail, pos, adv)
            self.n_rewards += 1
            self.baseline += (r - self.baseline) / self.n_rewards
        return rewards

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
