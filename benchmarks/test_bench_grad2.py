"""GRAD²: the native allocation op vs its twin, and the GRAD2 defense vs its floor and vs the
per-sample port of GR's code (tests/original_grad2.py: double backward, then GR's Python loop
per sample and budget), same inputs, same run.

Defense cells: LeNet (K = 10) at batch 1 and 256, CIFAR VGG16-BN (K = 10) at batch 1 and 8;
victim and surrogate of the same architecture, both in eval mode (as GR). Impls:

* ``floor``: victim forward + surrogate forward + ``torch.func.jvp`` of the surrogate along
  the target (which runs the surrogate forward again as its primal);
* ``floor_jvp``: victim forward + the JVP alone — the least any JVP-based GRAD² can do;
* ``grad2``: :class:`ppoison_ext.defenses.GRAD2` (``perturb``: victim, JVP, allocation);
* ``port``: GR's algorithm.

``min_ip`` adds one backward pass (``vjp``) to both floors. ε = 0.5 (one budget).
``PPOISON_BENCH_QUICK=1`` shrinks the op batches and runs VGG16-BN at batch 1 only.
"""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ppoison_ext import ops, reference
from ppoison_ext.defenses import GRAD2
from ppoison_ext.models import get_net
from ppoison_ext.testing import make_probs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import original_grad2 as orig  # noqa: E402

QUICK = os.environ.get("PPOISON_BENCH_QUICK") == "1"
EPS_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


@pytest.mark.benchmark(group="grad2_allocate")
@pytest.mark.parametrize("E", [1, 11])
@pytest.mark.parametrize("K", [10, 100])
@pytest.mark.parametrize("B", [1, 256, 1024] if QUICK else [1, 256, 8192])
@pytest.mark.parametrize("impl", ["native", "twin"])
def test_grad2_allocate(pedantic, impl, B, K, E, device):
    g = torch.Generator().manual_seed(B + K)
    p = make_probs(B, K, dtype=torch.float32, device=device, generator=g)
    c = torch.randn(B, K, generator=g).to(device)
    eps = EPS_GRID if E == 11 else [0.5]
    fn = ops.grad2_allocate if impl == "native" else reference.grad2_allocate
    out = pedantic(lambda: fn(p, c, eps), device, rounds=20 if B <= 256 else 5, warmup_rounds=2,
                   op="grad2_allocate", impl=impl, B=B, K=K, E=E, dev=device.type)
    other = reference.grad2_allocate(p, c, eps) if impl == "native" else ops.grad2_allocate(p, c, eps)
    torch.testing.assert_close(out, other, rtol=2e-5, atol=2e-6)


def _models(name, device):
    torch.manual_seed(0)
    if name == "lenet":
        v, s = get_net("lenet", "mnist", num_classes=10), get_net("lenet", "mnist", num_classes=10)
        shape = (1, 28, 28)
    else:
        v, s = get_net("vgg16_bn", "cifar", num_classes=10), get_net("vgg16_bn", "cifar", num_classes=10)
        shape = (3, 32, 32)
    return v.to(device).eval(), s.to(device).eval(), shape


def _floor(victim, surrogate, x, target, with_forward):
    from torch.func import functional_call, jvp, vjp

    params = {n: p.detach() for n, p in surrogate.named_parameters()}
    f = lambda prm: functional_call(surrogate, prm, (x,))  # noqa: E731

    def run():
        with torch.no_grad():
            y = F.softmax(victim(x), 1)
            if with_forward:
                surrogate(x)
        with torch.enable_grad():
            if target == "min_ip":
                z, pull = vjp(f, params)
                t = pull((y - F.softmax(z, 1)) / x.shape[0])[0]
            else:
                t = {n: -torch.ones_like(p) for n, p in params.items()}
            return jvp(f, (params,), (t,))

    return run


CELLS = [("lenet", 1), ("lenet", 256), ("vgg16_bn", 1), ("vgg16_bn", 8)]


@pytest.mark.benchmark(group="grad2_defense")
@pytest.mark.parametrize("target", ["all_ones", "min_ip"])
@pytest.mark.parametrize("impl", ["floor", "floor_jvp", "grad2", "port"])
@pytest.mark.parametrize("model,B", CELLS, ids=[f"{m}-B{b}" for m, b in CELLS])
def test_grad2_defense(pedantic, model, B, impl, target, device):
    if QUICK and model == "vgg16_bn" and B > 1:
        pytest.skip("quick mode: VGG16-BN at batch 1 only")
    if model == "vgg16_bn" and target == "min_ip":
        pytest.skip("min_ip is measured on LeNet only")
    victim, surrogate, shape = _models(model, device)
    x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    if impl.startswith("floor"):
        run = _floor(victim, surrogate, x, target, impl == "floor")
    elif impl == "grad2":
        d = GRAD2(victim, epsilon=0.5, surrogate=surrogate, target=target)
        run = lambda: d.perturb(x).y_prime  # noqa: E731
    else:
        t = None if target == "min_ip" else -torch.ones(sum(p.numel() for p in surrogate.parameters()),
                                                        device=device)
        run = lambda: orig.grad2_per_sample(x, victim, surrogate, [0.5], t)[:, 0]  # noqa: E731
    slow = impl == "port" or model == "vgg16_bn"
    out = pedantic(run, device, rounds=3 if slow else 10, warmup_rounds=1,
                   model=model, impl=impl, target=target, B=B, queries=B, dev=device.type)
    if impl in ("grad2", "port"):
        y = F.softmax(victim(x), 1).detach().to(out.device)
        assert (out > 0).all()
        torch.testing.assert_close(out.double().sum(1), torch.ones(B, dtype=torch.float64, device=out.device),
                                   rtol=0, atol=1e-5)
        assert ((out.double() - y.double()).abs().sum(1) <= 0.5 + 1e-5).all()
