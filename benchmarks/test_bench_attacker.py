"""One attacker training budget (``train-attacker``): the transformed transfer and test sets held
in memory (what ``train_attacker`` does) vs decoded and normalised again every epoch (the
streaming datasets), same transfer set, same run.

Transfer set: N MNIST training images with random soft labels; LeNet, 2 epochs, batch 64,
tested on 2000 MNIST test images per epoch; one torch thread (as a grid worker). The ratio of
the two is the saving per grid cell on this machine.
"""

import os

import numpy as np
import pytest
import torch

from ppoison_ext.attacks import TransferSetWriter
from ppoison_ext.datasets import get_dataset
from ppoison_ext.pipeline import attacker

QUICK = os.environ.get("PPOISON_BENCH_QUICK") == "1"
N = 256 if QUICK else 5000


@pytest.fixture(scope="module")
def transfer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_transfer")
    ds = get_dataset("MNIST", train=True)
    idx = np.arange(N)
    y = torch.softmax(torch.randn(N, 10, generator=torch.Generator().manual_seed(0)) * 3, 1)
    with TransferSetWriter(out, num_classes=10, kind="images", image_shape=[28, 28], resume=False) as w:
        w.append(torch.from_numpy(idx), ds.data[idx], y)
    return out


@pytest.mark.benchmark(group="attacker-training")
@pytest.mark.parametrize("datasets", ["in_memory", "streaming"])
def test_train_attacker_budget(pedantic, transfer_dir, datasets, device, monkeypatch, tmp_path):
    if datasets == "streaming":
        monkeypatch.setattr(attacker, "in_memory", lambda d: d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = iter(range(100))

    def train():
        folder = tmp_path / f"run{next(runs)}"
        folder.mkdir()
        for f in transfer_dir.glob("transferset*"):
            (folder / f.name).symlink_to(f)
        attacker.train_attacker(folder, "lenet", "MNIST", str(N), device=device, epochs=2, lr=0.02, momentum=0.9,
                                test_subset=2000, progress=False, resume=None)

    try:
        pedantic(train, device, rounds=1 if QUICK else 3, queries=N, datasets=datasets)
    finally:
        torch.set_num_threads(threads)
