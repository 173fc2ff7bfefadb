"""The Knockoff random policy's query order, reproduced query for query.

The images are the first ``budget`` entries of a seed-42 ``np.random.shuffle`` of
``arange(N)``; each step draws ``np.random.choice(list(idx_set), size, replace=False)`` from the
remaining pool (a Python ``set``), removes the draw, and refills the pool when it empties.
:func:`random_query_order` computes the same batches up front with the same RNG calls (legacy
``choice`` without replacement is ``permutation(len(pool))[:size]``); the pool's ``list(set)``
order is a sorted array while CPython's set table iterates in sorted order (all keys below its
table size), real ``set`` objects afterwards (checked against a literal port of the loop on
CPython 3.11).
"""

from __future__ import annotations

from collections import deque
from typing import List, Optional, Tuple

import numpy as np

from ..checks import int_arg

__all__ = ["random_query_order", "shuffled_pool", "resolve_budget", "DEFAULT_SEED"]

DEFAULT_SEED = 42


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
    iterates in sorted order."""
    top = int(keys[-1]) + 1 if len(keys) else 0
    s = set(range(top))  # table larger than every key: slot == key
    keep = np.zeros(top, dtype=bool)
    keep[keys] = True
    deque(map(s.discard, np.flatnonzero(~keep).tolist()), maxlen=0)  # discards never resize
    return s


class _Pool:
    """The pool ``idx_set``: sorted numpy keys while ``list(set)`` is sorted, else a set."""

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


def resolve_budget(n: int, budget: Optional[int], nqueries: Optional[int], batch_size: int,
                    strategy: str = "random") -> Tuple[int, int]:
    n = int_arg(n, "n (the query-set size)")
    budget = n if budget is None else int_arg(budget, "budget")
    if budget > n:
        raise ValueError(f"budget ({budget}) exceeds the query set's {n} images")
    nqueries = budget if nqueries is None else int_arg(nqueries, "nqueries")
    if nqueries > budget:
        if strategy == "adaptive":
            raise ValueError(f"nqueries ({nqueries}) > budget ({budget}): the adaptive policy never repeats "
                             "an image")
        if budget % batch_size:
            raise ValueError(f"nqueries ({nqueries}) > budget ({budget}) repeats images only when batch_size "
                             f"divides budget; got batch_size {batch_size}")
    return budget, nqueries


def random_query_order(n: int, budget: Optional[int] = None, nqueries: Optional[int] = None,
                       batch_size: int = 1, seed: int = DEFAULT_SEED) -> List[np.ndarray]:
    """The Knockoff "random" query order (module docs) for a query set of ``n`` images, as
    ``ceil(nqueries / batch_size)`` int64 arrays of query-set indices (all full but the last).

    ``budget`` distinct images (default n), ``nqueries`` queries (default ``budget``; above it
    images repeat, which needs ``budget % batch_size == 0``). The legacy ``permutation`` per
    step takes about 40 s at n = 60000, batch_size = 1.
    """
    batch_size = int_arg(batch_size, "batch_size")
    budget, nqueries = resolve_budget(n, budget, nqueries, batch_size)
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


def shuffled_pool(n: int, budget: int, seed: int) -> np.ndarray:
    rs = np.random.RandomState(seed)
    all_idxs = np.arange(n)
    rs.shuffle(all_idxs)
    return all_idxs[:budget]
