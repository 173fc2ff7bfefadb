import pytest
import torch

from ppoison_ext.testing import devices

DEVICES = devices()
DEVICE_IDS = [d.type for d in DEVICES]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_generate_tests(metafunc):
    # Any test taking `device` runs on every device present; ids carry the device name
    # so `pytest -k cuda` selects the GPU cases.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, ids=DEVICE_IDS)
