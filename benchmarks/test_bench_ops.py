"""Every native op against its pure-PyTorch twin (the baseline), same inputs, same run.

Grid: B ∈ {1, 256, 65536} × K ∈ {10, 100, 256} × {native, reference} × devices. Cells whose
tensors would not fit in a sensible memory budget are skipped (the dense [B, K, K] Gram at
B = 65536 for K ≥ 100). Each result is checked against the other implementation after
timing. Ratios: `python tools/bench_report.py <json>`.
"""

import os

import pytest
import torch

from ppoison_ext import ops, reference
from ppoison_ext.testing import make_features, make_jacobian, make_probs

# PPOISON_BENCH_QUICK=1 (CI) runs the same cells with B = 65536 replaced by 4096.
QUICK = os.environ.get("PPOISON_BENCH_QUICK") == "1"
BS = [1, 256, 4096 if QUICK else 65536]
KS = [10, 100, 256]
IMPLS = {"native": ops, "reference": reference}
H_FC = 16  # feature size for the Gᵀy closed form
D_EXPLICIT = 16  # columns of the explicit Jacobians
MAX_ELEMENTS = 300_000_000  # largest input/output tensor a cell may create


def _skip_big(*shapes):
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        if n > MAX_ELEMENTS:
            pytest.skip(f"tensor of shape {s} exceeds the benchmark's memory budget")


def _probs(B, K, device, seed):
    g = torch.Generator().manual_seed(seed)
    return make_probs(B, K, generator=g, device=device)


def _check(a, b, rtol=1e-4, atol=1e-5):
    if isinstance(a, tuple):
        for u, v in zip(a, b):
            _check(u, v, rtol, atol)
        return
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _other(impl):
    return IMPLS["reference" if impl == "native" else "native"]


OPS = [
    "jacobian_gram_fc", "jacobian_tvec_fc", "jacobian_gram", "jacobian_tvec",
    "mad_oracle_extreme", "mad_oracle_argmax", "mad_oracle_argmin", "mad_oracle_random",
    "mad_objective", "mad_step_l1", "mad_step_kl", "project_simplex", "project_l1_ball",
]


def _case(op, B, K, device):
    """(callable taking the implementation module, extra check tolerances)."""
    y, p = _probs(B, K, device, 1), _probs(B, K, device, 2)
    h = make_features(B, H_FC, device=device)
    hsq = (h * h).sum(-1)
    if op == "jacobian_gram_fc":
        _skip_big((B, K, K))
        return lambda m: m.jacobian_gram_fc(p, hsq), {"rtol": 1e-4, "atol": 1e-3}
    if op == "jacobian_tvec_fc":
        _skip_big((B, K, H_FC))
        return lambda m: m.jacobian_tvec_fc(p, h, y), {}
    if op in ("jacobian_gram", "jacobian_tvec"):
        _skip_big((B, K, D_EXPLICIT), (B, K, K) if op == "jacobian_gram" else (B, D_EXPLICIT))
        G = make_jacobian(B, K, D_EXPLICIT, device=device)
        if op == "jacobian_gram":
            return lambda m: m.jacobian_gram(G), {"rtol": 1e-4, "atol": 1e-4}
        return lambda m: m.jacobian_tvec(G, y), {}
    if op.startswith("mad_oracle_"):
        oracle = op.split("_")[-1]
        idx = torch.randint(K, (B,), generator=torch.Generator().manual_seed(3)).to(device)
        return (lambda m: m.mad_oracle(y, p=p, h_sqnorm=hsq, oracle=oracle, objmax=True, index=idx)), {}
    if op == "mad_objective":
        return lambda m: m.mad_objective(y.flip(-1), y, p=p, h_sqnorm=hsq), {"rtol": 1e-4, "atol": 1e-4}
    if op.startswith("mad_step_"):
        ydist = op.split("_")[-1]
        ystar, _ = ops.mad_oracle(y, oracle="argmin")
        target = ystar if ydist != "kl" else p  # full support, so KL can reach it
        return lambda m: m.mad_step(y, target, 0.2, ydist), {}
    v = torch.randn(B, K, generator=torch.Generator().manual_seed(4)).to(device)
    if op == "project_simplex":
        return lambda m: m.project_simplex(v, 1.0), {}
    return lambda m: m.project_l1_ball(v, 0.5), {}


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("B", BS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("op", OPS)
def test_op(timed, op, impl, B, K, device):
    fn, tolerances = _case(op, B, K, device)
    out = timed(lambda: fn(IMPLS[impl]), device, op=op, impl=impl, B=B, K=K, dev=device.type)
    # fast but wrong is worthless: compare with the other implementation after timing
    _check(out, fn(_other(impl)), **tolerances)
