"""DAWN's cost: the watermark wrapper around the undefended black box vs the bare black box, LeNet
(MNIST inputs), batch 1, 64 and 256, same inputs, same run (ratio ``dawn`` / ``bare`` per batch:
``python tools/bench_report.py <json>``). The rate is 0.02, so larger batches hold marked rows."""

import os

import pytest
import torch

from ppoison_ext.defenses import DAWN, Blackbox
from ppoison_ext.models import get_net

QUICK = os.environ.get("PPOISON_BENCH_QUICK") == "1"


@pytest.mark.parametrize("B", [1, 8] if QUICK else [1, 64, 256])
@pytest.mark.parametrize("impl", ["bare", "dawn"])
def test_dawn(pedantic, impl, B, device):
    torch.manual_seed(0)
    bare = Blackbox(get_net("lenet", "mnist", num_classes=10).to(device).eval())
    d = bare if impl == "bare" else DAWN(bare, key=b"\x07" * 32, rate=0.02)
    x = torch.randn(B, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    out = pedantic(lambda: d.perturb(x), device, rounds=20 if B == 1 else 10, warmup_rounds=2,
                   impl=impl, B=B, dev=device.type)
    # after timing: the answers differ from the bare ones exactly on the marked rows
    changed = (out.y_prime != bare.perturb(x).y_prime).any(1).cpu()
    assert torch.equal(changed, out.marks >= 0) if impl == "dawn" else not changed.any()
