"""Data-parallel training under ``torchrun``.

Launch any training step with ``torchrun`` instead of ``python`` and
:func:`ppoison_ext.training.train_model` trains with
:class:`~torch.nn.parallel.DistributedDataParallel`::

    torchrun --standalone --nproc_per_node 4 -m ppoison_ext.cli train-victim CIFAR10 vgg16_bn -o out

Under ``torchrun`` (``WORLD_SIZE > 1``) :func:`init_distributed` starts the process group
(``nccl`` on ``cuda:LOCAL_RANK``, else ``gloo``); each process trains on its own shard with
``ceil(batch_size / world_size)`` samples per step (the global batch of a single-process run);
test sums are all-reduced, so every rank logs the same numbers and makes the same "best"
decisions; only rank 0 (:func:`is_main_process`) writes files. Without ``torchrun`` everything
here is a no-op and :func:`get_context` describes a single process.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .devices import as_device

logger = logging.getLogger(__name__)

__all__ = ["DistContext", "env_world", "launched_with_torchrun", "init_distributed", "get_context",
           "is_main_process", "barrier", "all_reduce_sum", "wrap_ddp", "unwrap", "shard_indices", "cleanup",
           "setup_logging"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on
    its node, the ``device`` it trains on and the process-group ``backend`` (None when not
    distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_CONTEXT: Optional[DistContext] = None
_STARTED_HERE = False
_DDP_CACHE: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def env_world() -> Optional[tuple]:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or None outside it."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world is None:
        return None
    return rank, world, (local if local is not None else rank)


def launched_with_torchrun() -> bool:
    """True when running as one of several processes started by ``torchrun``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    env = env_world()
    return env is not None and env[1] > 1


def init_distributed(device: Union[str, torch.device, None] = None) -> DistContext:
    """Starts the process group if launched by ``torchrun`` (idempotent) and returns the
    :class:`DistContext` (a single-process one outside ``torchrun``).

    Under ``torchrun`` a CUDA ``device`` becomes ``cuda:LOCAL_RANK`` with the ``nccl`` backend;
    anything else trains on the CPU with ``gloo``.
    """
    global _CONTEXT, _STARTED_HERE
    want = as_device(device, default=-1)
    if _CONTEXT is not None and _CONTEXT.distributed:
        return _CONTEXT
    if not launched_with_torchrun():
        return DistContext(device=want)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK")
        local = rank if local is None else local
        backend = dist.get_backend()
    else:
        rank, world, local = env_world()
        backend = "nccl" if want.type == "cuda" and torch.cuda.is_available() else "gloo"
    if want.type == "cuda" and torch.cuda.is_available():
        dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        _STARTED_HERE = True
        atexit.register(cleanup)
        logger.info("distributed: rank %d/%d (local %d) on %s, backend %s", rank, world, local, dev, backend)
    _CONTEXT = DistContext(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)
    return _CONTEXT


def get_context() -> DistContext:
    """The current context without starting anything (rank 0 of 1 unless initialised)."""
    if _CONTEXT is not None:
        return _CONTEXT
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        local = _env_int("LOCAL_RANK")
        return DistContext(rank=rank, world_size=dist.get_world_size(),
                           local_rank=rank if local is None else local, backend=dist.get_backend())
    return DistContext()


def is_main_process() -> bool:
    """True on rank 0, and outside distributed runs. Also True before the process group is
    started if torchrun's ``RANK`` is 0, so pipeline code can decide early who writes."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    env = env_world()
    return env is None or env[0] == 0


def barrier() -> None:
    """Waits for all ranks (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_sum(values: List[float], device: Union[str, torch.device, None] = None) -> List[float]:
    """Sums a list of numbers over all ranks (returned unchanged when not distributed)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    dev = as_device(device, default=-1)
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (one wrapper per model, reused across
    calls so a model trained through several budgets keeps a single reducer); the model
    itself when not distributed."""
    if not ctx.distributed:
        return model
    wrapped = _DDP_CACHE.get(model)
    if wrapped is None:
        kwargs = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
        wrapped = nn.parallel.DistributedDataParallel(model, **kwargs)
        _DDP_CACHE[model] = wrapped
    return wrapped


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DataParallel / DistributedDataParallel wrapper."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """Disjoint, unpadded shard ``rank::world_size`` of ``range(n)`` (used for test sets)."""
    return list(range(rank, n, world_size))


def cleanup() -> None:
    """Destroys the process group if this module started it."""
    global _CONTEXT, _STARTED_HERE
    _DDP_CACHE.clear()
    if _STARTED_HERE and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as err:  # noqa: BLE001 - shutting down anyway
            logger.debug("destroy_process_group failed: %s", err)
    _STARTED_HERE = False
    _CONTEXT = None


def setup_logging(level: int = logging.INFO) -> None:
    """Logs to stderr; non-zero ranks of a distributed run log warnings only, with a
    ``[rank N]`` prefix. Does nothing if the root logger already has handlers."""
    root = logging.getLogger()
    if root.handlers:
        return
    env = env_world()
    if env is not None and env[1] > 1:
        fmt = f"%(asctime)s [rank {env[0]}] %(levelname)s %(name)s: %(message)s"
        level = level if env[0] == 0 else max(level, logging.WARNING)
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt)
