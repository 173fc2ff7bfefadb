"""ModelGuard: the ModelGuard-W solver and both defenses, against their per-sample originals.

* group ``modelguard_w_solve``: the native op vs its pure-PyTorch twin vs the LP per row
  (scipy's HiGHS, ``linprog(method="highs")``; the original solves one PuLP/CBC LP per batch,
  which with ``batch_constraint`` = 0 separates into these rows; PuLP is not installed here),
  K = 10 and 100, B = 1 and 256, ε = 1.0 (the reference scripts' value).
* group ``modelguard_defense``: defended queries on LeNet (K = 10) and CIFAR VGG16-BN (K = 10;
  B = 1 and 256; ``bare`` is the victim forward alone, ``mgw``/``mgs`` the batched defenses,
  ``orig_mgw`` the victim forward plus the LP per row, ``orig_mgs`` the victim forward plus the
  sequential per-query quantiser of tests/original_modelguard.py. ModelGuard-S runs with a
  bank warmed on 2048 (VGG: 512) queries of the same distribution (its steady state: most queries hit an
  existing centroid). The per-row LP runs on at most ``LP_ROWS`` rows of the batch; throughput is
  queries / second either way (``extra_info["queries"]``).

Every cell checks its result after timing. ``PPOISON_BENCH_QUICK=1`` keeps batches of 1 and 8,
LeNet only.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppoison_ext import ops, reference
from ppoison_ext.defenses import ModelGuardS, ModelGuardW
from ppoison_ext.models import get_net

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import original_modelguard as orig  # noqa: E402

QUICK = os.environ.get("PPOISON_BENCH_QUICK") == "1"
BATCHES = [1, 8] if QUICK else [1, 256]
LP_ROWS = 4 if QUICK else 32
EPS = 1.0


def _probs(B, K, device):
    g = torch.Generator().manual_seed(K + B)
    return torch.softmax(torch.randn(B, K, generator=g) * 3, 1).to(device)


@pytest.mark.benchmark(group="modelguard_w_solve")
@pytest.mark.parametrize("K", [10, 100])
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", ["native", "reference", "lp_highs"])
def test_solver(pedantic, impl, B, K, device):
    if impl == "lp_highs" and device.type != "cpu":
        pytest.skip("the LP baseline runs on the CPU")
    y = _probs(B, K, device)
    n = B
    if impl == "native":
        fn = lambda: ops.modelguard_w_solve(y, EPS)  # noqa: E731
    elif impl == "reference":
        fn = lambda: reference.modelguard_w_solve(y, EPS)  # noqa: E731
    else:
        n = min(B, LP_ROWS)
        yn = y[:n].double().cpu().numpy()
        fn = lambda: [orig.mld_lp(r, EPS) for r in yn]  # noqa: E731
    slow = impl != "native"
    out = pedantic(fn, device, rounds=2 if slow else 20, warmup_rounds=0 if slow else 2, impl=impl, B=B, K=K,
                   queries=n, dev=device.type)
    want = ops.modelguard_w_solve(y[:n].double(), EPS)[1].cpu().numpy()
    got = out[1].double().cpu().numpy()[:n] if impl != "lp_highs" else np.array([r[1] for r in out])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def _victim(name, device):
    torch.manual_seed(0)
    if name == "lenet":
        return get_net("lenet", "mnist", num_classes=10).to(device).eval(), (1, 28, 28)
    return get_net("vgg16_bn", "cifar", num_classes=10).to(device).eval(), (3, 32, 32)


@pytest.mark.benchmark(group="modelguard_defense")
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", ["bare", "mgw", "mgs", "orig_mgw", "orig_mgs"])
@pytest.mark.parametrize("model", ["lenet", "vgg16_bn"])
def test_defense(pedantic, model, impl, B, device):
    if QUICK and model != "lenet":
        pytest.skip("quick mode: LeNet only")
    victim, shape = _victim(model, device)
    x = torch.randn(B, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    n = B
    n_warm = 64 if QUICK else (2048 if model == "lenet" else 512)
    warm = torch.randn(n_warm, *shape, generator=torch.Generator().manual_seed(2)).to(device)
    if impl == "bare":
        def run():
            with torch.no_grad():
                return torch.softmax(victim(x), 1)
    elif impl == "mgw":
        d = ModelGuardW(victim, epsilon=EPS)
        run = lambda: d(x)  # noqa: E731
    elif impl == "mgs":
        d = ModelGuardS(victim, epsilon=EPS)
        for chunk in warm.split(256):
            d(chunk)
        run = lambda: d(x)  # noqa: E731
    elif impl == "orig_mgw":
        n = min(B, LP_ROWS)
        xs = x[:n]

        def run():
            with torch.no_grad():
                y = torch.softmax(victim(xs), 1)
            return orig.mld_per_sample(y.double().cpu().numpy(), EPS)
    else:
        q = orig.SequentialQuantizer(EPS)
        with torch.no_grad():
            for chunk in warm.split(256):
                for r in torch.softmax(victim(chunk), 1).cpu().numpy():
                    q(r)

        def run():
            with torch.no_grad():
                y = torch.softmax(victim(x), 1).cpu().numpy()
            return np.stack([q(r) for r in y])
    slow = impl.startswith("orig") or (model == "vgg16_bn" and B > 1 and device.type == "cpu")
    out = pedantic(run, device, rounds=2 if slow else 20, warmup_rounds=0 if slow else 2, model=model, impl=impl,
                   B=B, queries=n, dev=device.type)
    out = torch.as_tensor(np.asarray(out.cpu() if isinstance(out, torch.Tensor) else out)).double()
    assert out.shape == (n, 10)
    torch.testing.assert_close(out.sum(-1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-5)
    with torch.no_grad():
        y = torch.softmax(victim(x[:n]), 1).double().cpu()
    assert torch.equal(out.argmax(-1), y.argmax(-1))
    if impl in ("mgw", "orig_mgw"):
        assert ((out - y).abs().sum(-1) <= EPS + 1e-5).all()
