"""grad2_allocate: golden values (field-defenses.md §1.10), the twin, GR's sequential loop
(tests/original_grad2.py), simplex and budget, ties, the walk bit for bit on tie-heavy rows and
the batch sort the CUDA path takes its donor order from, errors, opcheck; every device."""

import math

import pytest
import torch

import original_grad2 as orig
from ppoison_ext import ops, reference
from ppoison_ext.testing import PROB_KINDS, float_dtypes, make_probs, tol

DT_IDS = ["f32", "f64"]
EPS_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
FLOOR = 1e-15


def _coeffs(B, K, dtype, device, generator, gap=1e-6):
    """Random coefficients with pairwise gaps > gap within each row (no ties)."""
    while True:
        c = torch.randn(B, K, generator=generator, dtype=torch.float64)
        s = c.sort(1).values
        if bool(((s[:, 1:] - s[:, :-1]) > gap).all()):
            return c.to(dtype=dtype, device=device)


def _dirichlet(B, K, dtype, device, generator):
    e = -torch.log(torch.rand(B, K, generator=generator, dtype=torch.float64))  # Exp(1) → Dirichlet(1)
    return (e / e.sum(1, keepdim=True)).to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
def test_golden_values(device, dtype):
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=dtype, device=device)
    c = torch.tensor([[0.2, -0.1, 0.4, 0.0]], dtype=dtype, device=device)
    out = ops.grad2_allocate(p, c, [0.0, 0.4, 1.0, 2.0])[0].cpu().double()
    pre = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.45, 0.5, 0.0, 0.05], [0.15, 0.8, 0.0, 0.05],
                        [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    zeros = (pre == 0).sum(1, keepdim=True)
    want = torch.where(pre == 0, FLOOR / (1 + zeros * FLOOR), pre / (1 + zeros * FLOOR))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-7)
    assert (out[1:, 2] > 0).all() and (out[1:, 2] < 1e-14).all()  # the floor, not an exact zero


@pytest.mark.parametrize("K", [10, 100])
def test_matches_the_sequential_loop(K):
    g = torch.Generator().manual_seed(K)
    B = 64
    p = _dirichlet(B, K, torch.float32, "cpu", g)
    c = _coeffs(B, K, torch.float32, "cpu", g)
    out = ops.grad2_allocate(p, c, EPS_GRID)
    for n in range(B):
        r = int(c[n].argmin())
        for e, eps in enumerate(EPS_GRID):
            want = orig.allocate_loop(p[n], c[n], eps)
            torch.testing.assert_close(out[n, e], want, rtol=0, atol=2e-5)
            # receivers and donors agree: the one class that gained, the classes that lost
            # more than the loop's early-stop slack (1e-8 + 1e-5·G)
            G = min(1 - float(p[n, r]), eps / 2)
            slack = 1e-8 + 1e-5 * G + 1e-6
            for got in (out[n, e], want):
                assert int((got - p[n]).argmax()) == r or eps == 0.0
            assert torch.equal((p[n] - out[n, e]) > slack, (p[n] - want) > slack)


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("K", [2, 3, 10, 100, 257])
@pytest.mark.parametrize("kind", PROB_KINDS)
def test_matches_twin_on_simplex_inside_budget(device, kind, K, dtype):
    g = torch.Generator().manual_seed(K)
    B = 33
    p = make_probs(B, K, kind, dtype=dtype, device=device, generator=g)
    c = torch.randn(B, K, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    eps = [0.0, 0.05, 0.5, 1.0, 1.7, 2.0, 3.0]
    out = ops.grad2_allocate(p, c, eps)
    assert out.shape == (B, len(eps), K) and out.dtype == dtype
    torch.testing.assert_close(out, reference.grad2_allocate(p, c, eps), **tol(dtype))
    od = out.double()
    assert (od > 0).all()  # the floor: no exact zeros
    torch.testing.assert_close(od.sum(2), torch.ones(B, len(eps), dtype=torch.float64, device=device),
                               rtol=0, atol=1e-6)
    l1 = (od - p.double()[:, None, :]).abs().sum(2)
    budget = torch.tensor(eps, dtype=torch.float64, device=device)[None, :]
    assert (l1 <= budget + K * 2e-15 + 1e-6).all()
    # the single-budget call is the matching slice
    torch.testing.assert_close(ops.grad2_allocate(p, c, 0.5)[:, 0], out[:, 2], rtol=0, atol=0)


def test_one_hot_once_the_budget_covers_everything(device):
    g = torch.Generator().manual_seed(3)
    p = make_probs(16, 10, dtype=torch.float64, device=device, generator=g)
    c = torch.randn(16, 10, generator=g, dtype=torch.float64).to(device)
    out = ops.grad2_allocate(p, c, 2.0)[:, 0]
    r = c.argmin(1)
    torch.testing.assert_close(out[torch.arange(16), r], torch.ones(16, dtype=torch.float64, device=device),
                               rtol=0, atol=1e-13)


def test_ties_go_to_the_lowest_index(device):
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64, device=device)
    # receiver: first of the tied minima (index 1); donors in c-descending order, equal c
    # lowest index first: 0 before 3 (both c = 1), then 2
    c = torch.tensor([[1.0, -1.0, 0.5, 1.0]], dtype=torch.float64, device=device)
    c[0, 2] = -1.0  # now 1 and 2 tie for the minimum
    out = ops.grad2_allocate(p, c, 0.2)[0, 0].cpu()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.3, 0.3, 0.4], dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(reference.grad2_allocate(p, c, 0.2)[0, 0].cpu(), out, rtol=0, atol=1e-15)


def _tie_heavy(B, K, dtype, generator):
    """p with exact zeros, c from four values, −0.0 and +0.0 among them (equal for ==)."""
    p = make_probs(B, K, "zeros", dtype=torch.float64, generator=generator)
    vals = torch.tensor([-0.0, 0.0, 0.25, -1.5], dtype=torch.float64)
    c = vals[torch.randint(4, (B, K), generator=generator)]
    return p.to(dtype), c.to(dtype)


def _walk(p, c, eps):
    """grad2_math.h's walk for one row and one budget, in Python floats (IEEE doubles, the same
    operations in the same order, written as the C++ ternaries): the exact value the kernels must
    return, before the cast."""
    def floor(v):
        return FLOOR if v < FLOOR else (1.0 if v > 1.0 else v)

    K = len(p)
    r = min(range(K), key=lambda k: (c[k], k))  # first minimum (−0.0 == +0.0)
    pr, half = p[r], 0.5 * eps
    G = (1.0 - pr) if (1.0 - pr) < half else half
    total = moved = S = 0.0
    takes = []
    for d in sorted((k for k in range(K) if k != r), key=lambda k: (-c[k], k)):
        take = G - S
        take = 0.0 if take < 0.0 else (p[d] if take > p[d] else take)
        S += p[d]
        moved += take
        total += floor(p[d] - take)
        takes.append((d, take))
    total += floor(pr + moved)
    out = [0.0] * K
    for d, take in takes:
        out[d] = floor(p[d] - take) / total
    out[r] = floor(pr + moved) / total
    return out


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("K", [2, 3, 64, 5000])
def test_bitwise_the_sequential_walk_with_ties(device, K, dtype):
    """Bit for bit the walk of the formula, on tie-heavy rows (equal c, −0.0 next to +0.0, exact
    zeros in p), on every device: the CUDA kernel takes its donor order from one batch sort, the
    CPU from a sort per row, and both walk in grad2_math.h's code. K = 5000 > 4096: torch's CUDA
    sort takes its segmented radix sort there."""
    g = torch.Generator().manual_seed(K + 11)
    B = 3 if K >= 1000 else 17
    p, c = _tie_heavy(B, K, dtype, g)
    eps = [0.0, 0.3, 1.0, 2.0]
    out = ops.grad2_allocate(p.to(device), c.to(device), eps).cpu()
    pl, cl = p.double().tolist(), c.double().tolist()
    want = torch.tensor([[_walk(pl[b], cl[b], e) for e in eps] for b in range(B)], dtype=torch.float64)
    assert torch.equal(out, want.to(dtype))


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("K", [2, 33, 5000])
def test_the_batch_sort_is_the_donor_order(device, K, dtype):
    """What grad2_cuda.cu sorts: a stable descending sort of c − (−0.0), which, the receiver left
    out, is the donor order (c descending, equal c lowest index first, −0.0 equal to +0.0)."""
    g = torch.Generator().manual_seed(K)
    B = 3 if K >= 1000 else 17
    _, c = _tie_heavy(B, K, dtype, g)
    c = c.to(device)
    order = torch.sort(c - torch.tensor(-0.0, dtype=dtype, device=device), dim=1, descending=True,
                       stable=True).indices.cpu()
    r = c.argmin(1).cpu()
    for b, row in enumerate(c.double().cpu().tolist()):
        want = sorted((k for k in range(K) if k != int(r[b])), key=lambda k: (-row[k], k))
        got = [k for k in order[b].tolist() if k != int(r[b])]
        assert got == want, f"row {b}"


def test_empty_and_non_contiguous(device):
    g = torch.Generator().manual_seed(5)
    p = make_probs(6, 9, dtype=torch.float32, device=device, generator=g)
    c = torch.randn(6, 9, generator=g).to(device)
    assert ops.grad2_allocate(p[:0], c[:0], [0.1, 0.2]).shape == (0, 2, 9)
    pt = torch.stack([p, p], 2)[:, :, 1]
    ct = torch.stack([c, c], 2)[:, :, 0]
    torch.testing.assert_close(ops.grad2_allocate(pt, ct, 0.3), ops.grad2_allocate(p, c, 0.3))


def _nan(t):
    t = t.clone()
    t[1, 2] = math.nan
    return t


_P = make_probs(4, 5, generator=torch.Generator().manual_seed(0))
_C = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
ERRORS = [
    ("nan p", lambda: ops.grad2_allocate(_nan(_P), _C, 0.1), ValueError, r"p contains NaN"),
    ("nan c", lambda: ops.grad2_allocate(_P, _nan(_C), 0.1), ValueError, r"c contains NaN"),
    ("rank p", lambda: ops.grad2_allocate(_P[0], _C, 0.1), ValueError, r"p must have shape \[B, K\]"),
    ("K c", lambda: ops.grad2_allocate(_P, _C[:, :4], 0.1), ValueError, r"c has 4 classes"),
    ("B c", lambda: ops.grad2_allocate(_P, _C[:3], 0.1), ValueError, r"c has 3 samples"),
    ("K=1", lambda: ops.grad2_allocate(_P[:, :1], _C[:, :1], 0.1), ValueError, r"at least 2 classes"),
    ("negative epsilon", lambda: ops.grad2_allocate(_P, _C, [0.1, -0.1]), ValueError,
     r"every epsilon must be finite and >= 0"),
    ("nan epsilon", lambda: ops.grad2_allocate(_P, _C, math.nan), ValueError, r"epsilon must be finite"),
    ("no epsilon", lambda: ops.grad2_allocate(_P, _C, []), ValueError, r"at least one budget"),
    ("epsilon type", lambda: ops.grad2_allocate(_P, _C, "0.1"), TypeError, r"epsilons must be a number"),
    ("epsilon item type", lambda: ops.grad2_allocate(_P, _C, [0.1, "x"]), TypeError, r"epsilons must be a real"),
    ("dtype mix", lambda: ops.grad2_allocate(_P, _C.double(), 0.1), TypeError, r"c has dtype"),
    ("int p", lambda: ops.grad2_allocate(_P.long(), _C.long(), 0.1), TypeError, r"p must be a float32 or float64"),
    ("p type", lambda: ops.grad2_allocate(_P.tolist(), _C, 0.1), TypeError, r"p must be a torch.Tensor"),
    ("devices", lambda: ops.grad2_allocate(_P, _C.to("meta"), 0.1), ValueError, r"c is on meta but p is on cpu"),
]


@pytest.mark.parametrize("call,exc,message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_input_raises_a_named_error(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
def test_opcheck(device, dtype):
    g = torch.Generator().manual_seed(7)
    p = make_probs(5, 7, dtype=dtype, device=device, generator=g)
    c = torch.randn(5, 7, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.ppoison.grad2_allocate.default, (p, c, [0.0, 0.3, 1.0]))
