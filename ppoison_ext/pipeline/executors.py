"""Where the grid's cells run: :func:`run_jobs` runs them in this process, in spawned worker
processes (one torch thread each, exiting when the grid is gone), or on a Ray cluster
(:class:`RayExecutor`). Each step keeps its own books on disk, so an executor only has to run
every job to its end, however often a run of it is cut short.

Ray (``pip install ppoison_ext[ray]``): a cell is a task asking for one CPU (and one GPU for a GPU
grid on a cluster that has one), retried when its worker dies. Without an address a local cluster
listening on the loopback address only is started; with one, the cluster's workers must import
this package and see the grid's output folder at the same path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

logger = logging.getLogger(__name__)

__all__ = ["EXECUTORS", "RAY_LOCAL_ENV", "RayExecutor", "is_gpu", "open_executor", "run_jobs"]

EXECUTORS = ("local", "ray")

#: the environment a local Ray cluster starts with: no usage reports, and its servers listening on
#: 127.0.0.1 only
RAY_LOCAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

#: the Ray task's name, also the title of a worker process while it runs a cell (``ray::<name>``)
TASK_NAME = "ppoison_cell"

# the jobs and results are small dicts: a small object store for a local cluster
_LOCAL_OBJECT_STORE = 256 * 1024 ** 2


def is_gpu(device: Any) -> bool:
    """Whether a grid device (``-d``: a GPU index, -1, or a torch device string) is a GPU."""
    if device is None:
        return False
    if isinstance(device, str) and not device.lstrip("-").isdigit():
        return device.startswith("cuda")
    return int(device) >= 0


def _loopback(address: Optional[str]) -> bool:
    """Whether a Ray address is on this machine's loopback interface (None: a local cluster)."""
    if address is None:
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _token_available() -> bool:
    """Whether this machine has a Ray authentication token (where Ray looks for one)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)


def _target(fn: Callable) -> str:
    """``module:name`` of a step function, to import it in the worker."""
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ValueError(f"cannot run {fn.__qualname__} on Ray: its module is a script, not importable")
        module = spec.name
    return f"{module}:{fn.__qualname__}"


def _on_assigned_gpu(job: Dict[str, Any]) -> Dict[str, Any]:
    """The job with its steps on GPU 0, the only one Ray shows a task."""
    out = dict(job)
    for k, v in job.items():
        if dataclasses.is_dataclass(v) and any(f.name == "device_id" for f in dataclasses.fields(v)):
            out[k] = dataclasses.replace(v, device_id=0)
    return out


def _run_cell(target: str, job: Dict[str, Any], gpu: bool) -> Any:
    """The Ray task: one cell, one torch thread (as the local workers)."""
    import torch

    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.WARNING)
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    return fn(_on_assigned_gpu(job) if gpu else job)


class RayExecutor:
    """Runs cells as Ray tasks. A context manager: entering connects to ``address`` or starts a
    local cluster of ``num_cpus`` CPUs; leaving shuts down what it started."""

    def __init__(self, address: Optional[str] = None, num_cpus: Optional[int] = None, max_retries: int = 3):
        self.address = address
        self.num_cpus = num_cpus
        self.max_retries = max_retries
        self._started = False

    def __enter__(self) -> "RayExecutor":
        address = self.address or os.environ.get("RAY_ADDRESS") or None  # ray.init's own default
        if _loopback(address):
            # before ray is imported: whether ray may use an address other than 127.0.0.1 is read then
            for k, v in RAY_LOCAL_ENV.items():
                os.environ.setdefault(k, v)
        if address is not None and "RAY_AUTH_MODE" not in os.environ and _token_available():
            # what ray.init does for "auto" only: clusters use token authentication by default
            os.environ["RAY_AUTH_MODE"] = "token"
        try:
            import ray
        except ImportError as err:
            raise RuntimeError("the ray executor needs Ray: pip install 'ppoison_ext[ray]'") from err
        if ray.is_initialized():
            return self
        kwargs: Dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if _loopback(address):
            from ray._private import ray_constants

            # in case ray was imported before the variable was set: the constant it was read into
            ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"
        if address is not None:
            ray.init(address=address, **kwargs)
        else:  # "local": a new cluster, never the one the last `ray start` left running
            ray.init(address="local", num_cpus=self.num_cpus, object_store_memory=_LOCAL_OBJECT_STORE,
                     **kwargs)
        self._started = True
        logger.info("ray: %s", ray.cluster_resources())
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def run(self, fn: Callable, jobs: List[Dict[str, Any]], gpu: bool = False) -> Iterator[Tuple[int, Any]]:
        """Yields ``(index, result)`` as cells finish; a failure raises once the others are done."""
        import ray

        if gpu and not ray.cluster_resources().get("GPU"):
            logger.warning("ray: the cluster has no GPU; the cells run on its CPUs")
            gpu = False
        task = ray.remote(_run_cell).options(name=TASK_NAME, num_cpus=1, num_gpus=1 if gpu else 0,
                                             max_retries=self.max_retries, retry_exceptions=False)
        target = _target(fn)
        index = {task.remote(target, job, gpu): i for i, job in enumerate(jobs)}
        pending = list(index)
        error: Optional[BaseException] = None
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - raised once the others are done
                        logger.error("ray: cell %d failed: %s", index[ref], err)
                        error = error or err
                        continue
                    yield index[ref], result
        finally:
            for ref in pending:  # the caller stopped early: no cell keeps running without it
                ray.cancel(ref)
        if error is not None:
            raise error


def open_executor(name: str, *, address: Optional[str] = None, workers: int = 1):
    """A context manager giving the executor: None for the local process pool, or Ray's."""
    if name == "local":
        if address is not None:
            raise ValueError("--address needs --executor ray")
        return contextlib.nullcontext(None)
    if name == "ray":
        return RayExecutor(address=address, num_cpus=max(1, workers))
    raise ValueError(f"executor must be one of {EXECUTORS}, got {name!r}")


def _orphan_watchdog(parent: int, interval: float = 0.5) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def _worker_init(parent: int) -> None:
    import torch

    threading.Thread(target=_orphan_watchdog, args=(parent,), daemon=True, name="orphan-watchdog").start()
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.WARNING)


def run_jobs(fn: Callable, jobs: List[Dict[str, Any]], workers: int, desc: str, progress: bool,
             after: Optional[Callable[[], Any]] = None, executor: Optional[RayExecutor] = None,
             gpu: bool = False) -> List[Any]:
    """Runs ``fn(job)`` for every job (on ``executor``, or in ``workers`` processes), calling
    ``after()`` as each finishes; returns the results in the order of ``jobs``."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    results: List[Any] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=desc, disable=not progress, unit="cell") as bar, \
            contextlib.ExitStack() as stack:
        if executor is not None:
            finished: Iterator[Tuple[int, Any]] = executor.run(fn, jobs, gpu=gpu)
        elif workers <= 1 or len(jobs) <= 1:
            finished = ((i, fn(job)) for i, job in enumerate(jobs))
        else:
            pool = stack.enter_context(ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                initargs=(os.getpid(),)))
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            finished = ((futures[fut], fut.result()) for fut in as_completed(futures))
        for i, result in finished:
            results[i] = result
            bar.update(1)
            if after:
                after()
    return results
