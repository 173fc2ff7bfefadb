"""A detector's cost per served request of 64 images, against the victim's forward of the same
64 images (the served path's own compute), same run.

``records`` (a detector's per-query records, SEAT's encoder forward included) and ``observe`` (the
key's state update, run in the server's detector process off the request path) are timed apart,
after a key history of H queries of MNIST test images (the embedded data) through an untrained
LeNet victim. The history grows by 64 queries per round, as a served key's does.
"""

import os

import pytest
import torch

from ppoison_ext.datasets import get_dataset, get_transform
from ppoison_ext.detectors import DADD, PRADA, SEAT, victim_forward
from ppoison_ext.detectors.seat import encoder_of
from ppoison_ext.models import get_net

QUICK = os.environ.get("PPOISON_BENCH_QUICK") == "1"
HISTORIES = [128] if QUICK else [1000, 5000]
ROUNDS = 3 if QUICK else 20


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = get_net("lenet", "mnist", num_classes=10).eval()
    ds = get_dataset("MNIST", train=False, transform=get_transform("mnist", "test"))
    n = max(HISTORIES) + 64 * (ROUNDS + 2)
    x = torch.stack([ds[i % len(ds)][0] for i in range(n)])
    y = torch.tensor([ds[i % len(ds)][1] for i in range(n)])
    means, covs = DADD.reference(model, x[:2000], y[:2000])
    dets = {"prada": PRADA([1, 28, 28], delta=0.9), "dadd": DADD(means, covs, tau=1e9),
            "seat": SEAT(encoder_of(model), thresh=-1.0)}
    return model, x, dets


@pytest.mark.benchmark(group="detector per 64 images")
@pytest.mark.parametrize("H", HISTORIES)
@pytest.mark.parametrize("part", ["victim_forward", "prada.records", "prada.observe", "dadd.records",
                                  "dadd.observe", "seat.records", "seat.observe"])
def test_detector(pedantic, setting, part, H):
    model, x, dets = setting
    batch = x[H:H + 64]
    if part == "victim_forward":
        pedantic(lambda: victim_forward(model, batch), torch.device("cpu"), rounds=ROUNDS, part=part, H=H)
        return
    det = dets[part.split(".")[0]]
    logits, h = victim_forward(model, x[:H + 64 * (ROUNDS + 2)])
    records = det.records(x[:H + 64 * (ROUNDS + 2)], logits, h)
    if part.endswith("records"):
        pedantic(lambda: det.records(batch, logits[H:H + 64], h[H:H + 64]), torch.device("cpu"),
                 rounds=ROUNDS, part=part, H=H)
        return
    state, pieces = det.new_state(), iter(records[H:].split(64))
    det.observe(state, records[:H])
    pedantic(lambda: det.observe(state, next(pieces)), torch.device("cpu"), rounds=ROUNDS, part=part, H=H)
