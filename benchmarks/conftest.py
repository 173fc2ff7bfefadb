import os

import pytest
import torch

from ppoison_ext.testing import devices

DEVICES = devices()

# PPOISON_BENCH_ROUNDS=N caps the rounds of every pedantic benchmark (tools/gpu_check.sh's
# reduced repetitions); unset or 0: each benchmark's own count.
MAX_ROUNDS = int(os.environ.get("PPOISON_BENCH_ROUNDS", "0") or 0)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, ids=[d.type for d in DEVICES])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synced(fn, device):
    def target():
        out = fn()
        sync(device)  # CUDA work is asynchronous: the timed call ends when the device is done
        return out

    return target


def _info(benchmark, info):
    benchmark.extra_info.update({k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in info.items()})


@pytest.fixture
def timed(benchmark):
    """benchmark(fn) that synchronizes CUDA inside the timed call and records shapes.

    On CUDA, fn runs once untimed first (module loading, handles, allocator warm-up)."""

    def run(fn, device, **info):
        _info(benchmark, info)
        target = _synced(fn, device)
        try:
            if device.type == "cuda":
                target()
            return benchmark(target)
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            pytest.skip("out of GPU memory")

    return run


@pytest.fixture
def pedantic(benchmark):
    """benchmark.pedantic(fn, rounds, warmup_rounds) with the same CUDA rules as `timed`:
    synchronized inside the timed call, at least one untimed warm-up round on CUDA; rounds
    capped by PPOISON_BENCH_ROUNDS."""

    def run(fn, device, *, rounds, warmup_rounds=0, **info):
        _info(benchmark, info)
        if device.type == "cuda":
            warmup_rounds = max(1, warmup_rounds)
        if MAX_ROUNDS > 0:
            rounds = max(1, min(rounds, MAX_ROUNDS))
        try:
            return benchmark.pedantic(_synced(fn, device), rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            pytest.skip("out of GPU memory")

    return run


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Before pytest-benchmark saves: drop a benchmark cut off before its first round (an
    interrupted run, e.g. tools/gpu_check.sh's SIGINT at the step's limit), whose empty stats
    would make the whole --benchmark-json fail to write; the finished ones are kept."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and getattr(bs, "benchmarks", None):
        bs.benchmarks[:] = [b for b in bs.benchmarks if b]
    yield
