import pytest
import torch

from ppoison_ext.testing import devices

DEVICES = devices()


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, ids=[d.type for d in DEVICES])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def timed(benchmark):
    """benchmark(fn) that synchronizes CUDA inside the timed call and records shapes."""

    def run(fn, device, **info):
        benchmark.extra_info.update({k: (str(v) if not isinstance(v, (int, float)) else v) for k, v in info.items()})

        def target():
            out = fn()
            sync(device)
            return out

        try:
            return benchmark(target)
        except torch.cuda.OutOfMemoryError:  # pragma: no cover - GPU only
            pytest.skip("out of GPU memory")

    return run
