"""Defended queries per second: batched MAD vs the bare victim + proxy forward and vs a
per-sample port of the original algorithm (tests/original_mad.py), same inputs, same run.

Models: LeNet (K = 10), CIFAR VGG16-BN (K = 10 and 100, proxy in train mode as the
original leaves it), and last layers alone: 512 → 100 (VGG16-BN's CIFAR-100 head) and 4096 → 256. Batch 1 and 256. The per-sample port is
slow (K backward passes and Python loops per query), so it runs on at most
`PORT_QUERIES[model]` queries of the batch; throughput is queries / second either way
(`extra_info["queries"]`). Every cell runs on each device present (`device`: cpu, cuda);
on CUDA the timed call ends with a synchronize and one untimed warm-up round comes first.
Ratios: `python tools/bench_report.py <json>`.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ppoison_ext.defenses import MAD
from ppoison_ext.models import get_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import original_mad as orig  # noqa: E402

QUICK = os.environ.get("PPOISON_BENCH_QUICK") == "1"
BATCHES = [1, 8] if QUICK else [1, 256]
PORT_QUERIES = {"lenet": 64, "vgg16_bn_k10": 16, "vgg16_bn_k100": 4, "head_512_100": 4, "head_4096_256": 1}
if QUICK:
    PORT_QUERIES = {k: 1 for k in PORT_QUERIES}


def _models(name, device):
    torch.manual_seed(0)
    if name == "lenet":
        v, p = get_net("lenet", "mnist", num_classes=10), get_net("lenet", "mnist", num_classes=10)
        shape = (1, 28, 28)
    elif name.startswith("vgg16_bn"):
        K = int(name.split("_k")[1])
        v, p = get_net("vgg16_bn", "cifar", num_classes=K), get_net("vgg16_bn", "cifar", num_classes=K)
        shape = (3, 32, 32)
    else:  # a last layer alone: "head_<features>_<classes>"
        H, K = (int(n) for n in name.split("_")[1:])
        v, p = nn.Linear(H, K), nn.Linear(H, K)
        shape = (H,)
    return v.to(device).eval(), p.to(device).train(), shape


MODELS = ["lenet", "vgg16_bn_k10", "vgg16_bn_k100", "head_512_100", "head_4096_256"]
IMPLS = ["bare", "mad_extreme", "mad_argmax", "port_extreme", "port_argmax"]


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", MODELS)
def test_defense(pedantic, model, impl, B, device):
    if QUICK and (model != "lenet" and (B > 1 or impl.startswith("port"))):
        pytest.skip("quick mode: LeNet only beyond single bare/MAD queries")
    victim, proxy, shape = _models(model, device)
    x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    oracle = "argmax" if impl.endswith("argmax") else "extreme"
    n = B
    if impl == "bare":
        def run():
            with torch.no_grad():
                return victim(x), proxy(x)
    elif impl.startswith("mad"):
        mad = MAD(victim, epsilon=0.5, proxy=proxy, oracle=oracle, objmax=True, exact_max_k=10)
        run = lambda: mad.perturb(x)  # noqa: E731
    else:
        n = min(B, PORT_QUERIES[model])
        xs = x[:n]
        weight = proxy.weight if isinstance(proxy, nn.Linear) else None
        run = lambda: orig.mad_per_sample(xs, victim, proxy, epsilon=0.5, oracle=oracle,  # noqa: E731
                                          objmax=True, exact_max_k=10, weight=weight)
    slow = impl.startswith("port") or (model.startswith("vgg") and B > 1 and device.type == "cpu")
    out = pedantic(run, device, rounds=2 if slow else 5, warmup_rounds=0 if slow else 1,
                   model=model, impl=impl, B=B, queries=n, dev=device.type)
    if impl.startswith("mad") and model == "lenet":
        # correctness after timing: the batched defense equals the per-sample original
        # (tests/test_defense_fidelity.py checks every model and setting in float64)
        ref, *_ = orig.mad_per_sample(x[:4], victim, proxy, epsilon=0.5, oracle=oracle, objmax=True, exact_max_k=10)
        torch.testing.assert_close(out.y_prime[:4], ref, rtol=0, atol=1e-5)
