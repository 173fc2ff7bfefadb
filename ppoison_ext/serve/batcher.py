"""Server-side micro-batching: concurrent requests gathered into one defense call.

The :class:`MicroBatcher`'s loop takes the first waiting request, then gathers more — those
already waiting at once, later ones for up to ``max_wait_s`` after the first — while the batch
stays within ``max_batch`` images (a larger request runs alone). The batch runs in one worker
thread (one defense call, then the ledger commit) while the event loop keeps accepting
requests; each request's future gets its own rows back, in order.

Batch independence: a ``batch_independent`` defense computes each row from that row alone, but
CPU matrix products pick their kernels by the number of rows, so the server pads every batch
with copies of its first row to a multiple of ``pad_multiple`` rows (never logged or charged):
a request's answer is then the same bits alone or with others. Any other defense answers
depending on which requests shared its batch: serve it with ``--max-batch 1`` when that
matters. ``/v1/info`` reports ``batch_independent``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor

__all__ = ["MicroBatcher", "Pending", "pad_rows"]

logger = logging.getLogger(__name__)


def pad_rows(x: Tensor, multiple: int) -> Tensor:
    """``x`` with copies of its first row appended up to a multiple of ``multiple`` rows."""
    n = x.shape[0]
    target = -(-n // multiple) * multiple if multiple > 1 else n
    if target == n or n == 0:
        return x
    return torch.cat([x, x[:1].expand(target - n, *x.shape[1:])])


@dataclass
class Pending:
    """One request waiting for its batch: inputs [n, ...], its key, its id, and its future."""

    x: Tensor
    key_id: str
    request_id: str
    client_request_id: Optional[str] = None
    future: asyncio.Future = field(default=None)  # type: ignore[assignment]
    committed: bool = False

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


class MicroBatcher:
    """Gathers :class:`Pending` requests into batches for ``run_batch`` (see the module docs).

    Args:
        run_batch: called in the worker thread with the batch's requests; returns one result
            per request (in order) or raises (every request of the batch gets the exception).
        on_batch: called with (images, requests) of each batch (metrics).
        on_drop: called with each request that was not answered: its client went away before
            its batch ran, or its batch failed (returns the budget it held).
    """

    def __init__(self, run_batch: Callable[[List[Pending]], list], *, max_batch: int, max_wait_s: float,
                 on_batch: Callable[[int, int], None], on_drop: Callable[[Pending], None]):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = float(max_wait_s)
        self.on_batch = on_batch
        self.on_drop = on_drop
        self._queue: Optional[asyncio.Queue] = None
        self._carry: Optional[Pending] = None
        self._task: Optional[asyncio.Task] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppoison-batch")

    def start(self, torch_threads: Optional[int] = None) -> None:
        """Starts the loop on the running event loop (call from the app's startup)."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())
        if torch_threads:
            self._executor.submit(torch.set_num_threads, int(torch_threads)).result()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True)

    async def submit(self, item: Pending):
        """Queues ``item`` and waits for its result."""
        assert self._queue is not None, "MicroBatcher.start() was not called"
        item.future = asyncio.get_running_loop().create_future()
        await self._queue.put(item)
        return await item.future

    async def _next(self, timeout: Optional[float]) -> Optional[Pending]:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        q = self._queue
        if not q.empty():
            return q.get_nowait()
        if timeout is None:
            return await q.get()
        if timeout <= 0:
            return None
        try:
            return await asyncio.wait_for(q.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _gather(self) -> List[Pending]:
        loop = asyncio.get_running_loop()
        first = await self._next(None)
        batch, n = [first], first.n
        deadline = loop.time() + self.max_wait_s
        while n < self.max_batch:
            item = await self._next(deadline - loop.time())
            if item is None:
                break
            if n + item.n > self.max_batch:
                self._carry = item
                break
            batch.append(item)
            n += item.n
        for p in batch:
            if p.future.done():  # its client went away while it waited
                self._drop(p)
        return [p for p in batch if not p.future.done()]

    def _drop(self, p: Pending) -> None:
        if not p.committed:
            self.on_drop(p)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            self.on_batch(sum(p.n for p in batch), len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception as err:  # every request of the batch gets the error; the loop goes on
                logger.exception("batch of %d requests failed", len(batch))
                for p in batch:
                    self._drop(p)
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            for p, r in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(r)
