"""Defended queries per second: batched Adaptive Misinformation vs the bare victim +
misinformation-model forward and vs a per-sample port of the spec (tests/original_admis.py),
same inputs, same run.

Models: LeNet (K = 10), CIFAR VGG16-BN (K = 10), and a last layer alone (512 → 10, where the
models cost least and AM's own work shows most); victim and misinformation model of the same
architecture, both in eval mode. Batch 1 and 256. The per-sample port runs on at most
`PORT_QUERIES[model]` queries of the batch; throughput is queries / second either way
(`extra_info["queries"]`). Every cell runs on each device present. After timing, the batched
defense is checked against the port.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from ppoison_ext.defenses import AdaptiveMisinformation
from ppoison_ext.models import get_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import original_admis as orig  # noqa: E402

QUICK = os.environ.get("PPOISON_BENCH_QUICK") == "1"
BATCHES = [1, 8] if QUICK else [1, 256]
PORT_QUERIES = {"lenet": 256, "vgg16_bn": 16, "head_512_10": 256}
if QUICK:
    PORT_QUERIES = {k: 1 for k in PORT_QUERIES}
MODELS = ["lenet", "vgg16_bn", "head_512_10"]
IMPLS = ["bare", "am", "port"]


def _models(name, device):
    torch.manual_seed(0)
    if name.startswith("head"):
        H, K = (int(n) for n in name.split("_")[1:])
        v, m = (torch.nn.Linear(H, K).to(device).eval() for _ in range(2))
        return v, m, (H,)
    family, shape = ("mnist", (1, 28, 28)) if name == "lenet" else ("cifar", (3, 32, 32))
    v, m = (get_net(name, family, num_classes=10).to(device).eval() for _ in range(2))
    return v, m, shape


@pytest.mark.benchmark(group="admis")
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", MODELS)
def test_admis(pedantic, model, impl, B, device):
    if QUICK and model == "vgg16_bn":
        pytest.skip("quick mode: no VGG16-BN")
    victim, misinfo, shape = _models(model, device)
    x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    # τ at the batch's median score: both sides of the threshold occur
    am = AdaptiveMisinformation(victim, misinformation_model=misinfo, tau=0.5, nu=1000.0)
    tau = float(am.components(x).score.median())
    am = AdaptiveMisinformation(victim, misinformation_model=misinfo, tau=tau, nu=1000.0)
    n = B
    if impl == "bare":
        def run():
            with torch.no_grad():
                return victim(x), misinfo(x)
    elif impl == "am":
        run = lambda: am.perturb(x)  # noqa: E731
    else:
        n = min(B, PORT_QUERIES[model])
        xs = x[:n]
        run = lambda: orig.am_per_sample(xs, victim, misinfo, tau=tau, nu=1000.0)  # noqa: E731
    slow = model == "vgg16_bn" and (B > 1 or impl == "port") and device.type == "cpu"
    out = pedantic(run, device, rounds=3 if slow else 20, warmup_rounds=0 if slow else 2,
                   model=model, impl=impl, B=B, queries=n, dev=device.type)
    if impl == "am":
        k = min(B, 4)
        ref = orig.am_per_sample(x[:k], victim, misinfo, tau=tau, nu=1000.0)
        torch.testing.assert_close(out.y_prime[:k], ref, rtol=0, atol=1e-4)
