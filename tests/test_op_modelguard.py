"""modelguard_w_solve: native vs twin vs an independent LP (scipy HiGHS, tests/original_modelguard.py)."""

import numpy as np
import pytest
import torch
from original_modelguard import mld_lp

from ppoison_ext import ops, reference
from ppoison_ext.testing import PROB_KINDS, float_dtypes, make_probs

DT_IDS = ["f32", "f64"]
MARGIN, OFFSET = 1e-4, 1e-6

# §6.1.3 golden values (HiGHS optimum), y′ to the 4 decimals given there.
GOLDEN = [
    ((0.5, 0.3, 0.2), 0.4, (0.3334, 0.3333, 0.3333), 0.3332),
    ((0.5, 0.3, 0.2), 0.1, (0.45, 0.3, 0.25), 0.1),
    ((0.7, 0.2, 0.06, 0.04), 1.0, (0.3001, 0.0999, 0.3, 0.3), 1.0),
    ((0.7, 0.2, 0.06, 0.04), 0.1, (0.65, 0.2, 0.06, 0.09), 0.1),
    ((0.6, 0.25, 0.1, 0.05), 2.0, (0.3334, 0.0, 0.3333, 0.3333), 1.0332),
    ((0.4, 0.3, 0.2, 0.1), 0.0, (0.4, 0.3, 0.2, 0.1), 0.0),
]


def _objective(y, x):
    return (torch.log(y.double() + OFFSET) * x.double()).sum(-1)


def _check_feasible(y, x, eps, feasible, atol):
    """Rows on the simplex, inside the L1 budget, with the top-1 margin (where feasible)."""
    yd, xd = y.double(), x.double()
    assert (xd >= 0).all()
    torch.testing.assert_close(xd.sum(-1), torch.ones(len(xd), dtype=torch.float64, device=x.device),
                               rtol=0, atol=atol)
    assert ((xd - yd).abs().sum(-1) <= eps + atol).all()
    m = yd.argmax(-1)
    top = xd.gather(1, m[:, None])
    others = xd.scatter(1, m[:, None], -1.0)
    assert ((top - others)[feasible].amin(-1) >= MARGIN - atol).all()
    assert torch.equal(x.argmax(-1)[feasible], m[feasible])


def _dirichlet(B, K, seed, alpha=None):
    rng = np.random.default_rng(seed)
    a = alpha if alpha is not None else rng.choice([0.1, 0.5, 1.0, 5.0])
    return torch.from_numpy(rng.dirichlet(np.full(K, a), size=B))


@pytest.mark.parametrize("row", range(len(GOLDEN)))
def test_golden(device, row):
    y, eps, want, l1 = GOLDEN[row]
    yt = torch.tensor([y], dtype=torch.float64, device=device)
    for impl in (ops, reference):
        x, obj, feas = impl.modelguard_w_solve(yt, eps)
        assert bool(feas[0])
        torch.testing.assert_close(x[0].cpu(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-4)
        assert abs(float((x - yt).abs().sum()) - l1) <= 2e-4
        _, ol, status = mld_lp(np.array(y), eps)
        assert status == 0
        assert abs(float(obj[0]) - ol) <= 1e-9 * max(1.0, abs(ol))
    if eps == 0.0:
        torch.testing.assert_close(ops.modelguard_w_solve(yt, eps)[0], yt, rtol=0, atol=1e-11)


def test_golden_first_row_formula():
    # t = (1 + 2δ)/3 and the others t − δ (§6.1.3)
    x, _, _ = ops.modelguard_w_solve(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64), 0.4)
    t = (1 + 2 * MARGIN) / 3
    torch.testing.assert_close(x[0], torch.tensor([t, t - MARGIN, t - MARGIN], dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("K", [3, 10, 100])
def test_matches_highs(eps, K):
    """§6.1.5: objective equal to HiGHS's, constraints met, x elementwise where the costs are
    distinct (the spec says "where y is distinct"; entries far below the 1e-6 offset give costs
    equal to ~1e-10, near-ties where the vertex is not unique to the LP's tolerance)."""
    B = 25 if K == 100 else 40
    y = _dirichlet(B, K, 1000 * K + int(eps * 100))
    x, obj, feas = ops.modelguard_w_solve(y, eps)
    assert feas.all()
    _check_feasible(y, x, eps, feas, 1e-9)
    torch.testing.assert_close(obj, _objective(y, x), rtol=1e-12, atol=1e-12)
    for b in range(B):
        xl, ol, status = mld_lp(y[b].numpy(), eps)
        assert status == 0
        assert abs(float(obj[b]) - ol) <= 1e-8 * max(1.0, abs(ol)), (b, float(obj[b]), ol)
        # our optimum is never worse than HiGHS's beyond its own tolerance
        assert float(obj[b]) <= ol + 1e-8 * max(1.0, abs(ol))
        # unique optimum: distinct costs c (entries below ~1e-6 are near-ties after the offset)
        c = np.sort(np.log(y[b].numpy() + OFFSET))
        if np.diff(c).min() > 1e-4:
            np.testing.assert_allclose(x[b].numpy(), xl, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("K", [2, 3, 10, 64])
@pytest.mark.parametrize("kind", PROB_KINDS)
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.5, 1.0, 2.0])
def test_matches_twin_and_stays_feasible(device, eps, kind, K, dtype):
    g = torch.Generator().manual_seed(K + 7)
    y = make_probs(16, K, kind, dtype=dtype, device=device, generator=g)
    x, obj, feas = ops.modelguard_w_solve(y, eps)
    xr, objr, feasr = reference.modelguard_w_solve(y, eps)
    assert torch.equal(feas, feasr)
    atol = 1e-9 if dtype == torch.float64 else 2e-6
    # same optimum value; the vertex may differ where y has ties
    torch.testing.assert_close(obj.double(), objr.double(), rtol=1e-9 if dtype == torch.float64 else 1e-6,
                               atol=1e-9 if dtype == torch.float64 else 1e-6)
    _check_feasible(y, x, eps, feas, atol)
    assert torch.equal(x[~feas], y[~feas])
    if kind == "random":
        torch.testing.assert_close(x, xr, rtol=0, atol=1e-6)


def test_infeasible_rows_are_returned_unchanged():
    # a tie at the top needs ~1e-4 of budget to open the margin
    y = torch.tensor([[0.45, 0.45, 0.1], [0.5, 0.3, 0.2]], dtype=torch.float64)
    x, _, feas = ops.modelguard_w_solve(y, 1e-6)
    assert feas.tolist() == [False, True]
    assert torch.equal(x[0], y[0])
    x, _, feas = ops.modelguard_w_solve(y, 0.01)
    assert feas.all() and x[0, 0] - x[0, 1] >= MARGIN - 1e-12
    assert ((x - y).abs().sum(-1) <= 0.01 + 1e-12).all()
    for impl in (ops, reference):
        assert impl.modelguard_w_solve(y, 1e-6)[2].tolist() == [False, True]


def test_ties_reach_the_lp_optimum():
    """Tied y: the optimal vertex is not unique (§6.1.3), the value is."""
    y = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25, 0.0]], dtype=torch.float64)
    for eps in (0.1, 0.5, 1.5):
        _, obj, _ = ops.modelguard_w_solve(y, eps)
        for b in range(2):
            _, ol, _ = mld_lp(y[b].numpy(), eps)
            assert abs(float(obj[b]) - ol) <= 1e-8 * max(1.0, abs(ol))


def test_empty_non_contiguous_and_margin(device):
    y = make_probs(6, 9, "random", device=device)
    x, obj, feas = ops.modelguard_w_solve(y[:0], 0.5)
    assert x.shape == (0, 9) and obj.shape == (0,) and feas.dtype == torch.bool
    yt = torch.stack([y, y], 2)[:, :, 1]
    assert not yt.is_contiguous()
    assert torch.equal(ops.modelguard_w_solve(yt, 0.3)[0], ops.modelguard_w_solve(y, 0.3)[0])
    x0, _, _ = ops.modelguard_w_solve(y.double(), 0.3, margin=0.0)
    _, ol, _ = mld_lp(y[0].double().cpu().numpy(), 0.3, margin=0.0)
    assert abs(float(_objective(y[:1], x0[:1])) - ol) <= 1e-8 * abs(ol)


@pytest.mark.parametrize("bad, err", [
    (lambda y: y.clone().fill_(float("nan")), ValueError),
    (lambda y: y - 1.0, ValueError),
    (lambda y: y[0], ValueError),
    (lambda y: y[:, :1], ValueError),
    (lambda y: y.long(), TypeError),
])
def test_bad_input(device, bad, err):
    y = make_probs(4, 5, "random", device=device)
    with pytest.raises(err):
        ops.modelguard_w_solve(bad(y), 0.5)


@pytest.mark.parametrize("kw, err", [
    ({"epsilon": -0.1}, ValueError), ({"epsilon": float("nan")}, ValueError), ({"epsilon": "1"}, TypeError),
    ({"epsilon": 0.5, "margin": 1.0}, ValueError), ({"epsilon": 0.5, "log_offset": 0.0}, ValueError),
])
def test_bad_arguments(kw, err):
    with pytest.raises(err):
        ops.modelguard_w_solve(make_probs(4, 5, "random"), **kw)
    with pytest.raises(TypeError):
        ops.modelguard_w_solve([[0.5, 0.5]], 0.5)


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
def test_opcheck(device, dtype):
    y = make_probs(5, 7, "random", dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.ppoison.modelguard_w_solve.default, (y, 0.5, 1e-4, 1e-6))
