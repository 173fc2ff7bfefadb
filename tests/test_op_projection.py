import numpy as np
import pytest
import torch

import original_mad as orig
from ppoison_ext import ops, reference
from ppoison_ext.testing import float_dtypes, make_probs, tol

DT_IDS = ["f32", "f64"]


def _vectors(B, K, kind, dtype, device):
    g = torch.Generator().manual_seed(K * 13 + B)
    if kind == "gauss":
        v = torch.randn(B, K, generator=g, dtype=torch.float64) * 2
    elif kind == "simplex":
        v = make_probs(B, K, dtype=torch.float64, generator=g)
    elif kind == "ties":
        v = torch.randint(-3, 4, (B, K), generator=g).double() / 2
    elif kind == "large":
        v = torch.randn(B, K, generator=g, dtype=torch.float64) * 1e4
    elif kind == "tiny":
        v = torch.randn(B, K, generator=g, dtype=torch.float64) * 1e-20
    else:  # onehot-ish and negative
        v = -torch.rand(B, K, generator=g, dtype=torch.float64)
    return v.to(device=device, dtype=dtype)


KINDS = ["gauss", "simplex", "ties", "large", "tiny", "negative"]


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("K", [1, 2, 10, 100, 1000])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("radius", [1.0, 0.3, 7.0])
def test_simplex_matches_twin_and_is_projection(device, radius, kind, K, dtype):
    v = _vectors(32, K, kind, dtype, device)
    x = ops.project_simplex(v, radius)
    scale = max(1.0, float(v.abs().max()))
    torch.testing.assert_close(x, reference.project_simplex(v, radius), **tol(dtype, 10 * scale))
    assert (x >= 0).all()
    torch.testing.assert_close(x.double().sum(-1), torch.full((32,), radius, dtype=torch.float64, device=device),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12,
                               atol=(1e-6 if dtype == torch.float32 else 1e-14) * scale * K)
    # KKT: x = max(v − τ, 0) for one τ per row
    xd, vd = x.double(), v.double()
    pos = xd > 0
    tau = torch.where(pos, vd - xd, torch.zeros_like(vd)).sum(-1) / pos.sum(-1).clamp(min=1)
    torch.testing.assert_close(torch.where(pos, vd - xd, tau[:, None]), tau[:, None].expand_as(vd),
                               **tol(dtype, 10 * scale))
    assert (vd[~pos] <= tau[:, None].expand_as(vd)[~pos] + 1e-5 * scale).all()
    # idempotent
    torch.testing.assert_close(ops.project_simplex(x, radius), x, **tol(dtype, 10))


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("K", [1, 2, 10, 256])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("radius", [1.0, 0.05, 4.0])
def test_l1_ball_matches_twin(device, radius, kind, K, dtype):
    v = _vectors(32, K, kind, dtype, device)
    x = ops.project_l1_ball(v, radius)
    scale = max(1.0, float(v.abs().max()))
    torch.testing.assert_close(x, reference.project_l1_ball(v, radius), **tol(dtype, 10 * scale))
    assert (x.double().abs().sum(-1) <= radius * (1 + 1e-5) + 1e-12).all()
    inside = v.double().abs().sum(-1) <= radius * (1 - 1e-9)  # clear of rounding at the boundary
    assert torch.equal(x[inside], v[inside])
    assert ((x * v) >= 0).all()  # signs kept


def test_matches_original_numpy_projection():
    v = _vectors(50, 17, "gauss", torch.float64, "cpu")
    x = ops.project_simplex(v, 1.0)
    y = ops.project_l1_ball(v, 0.7)
    for b in range(50):
        np.testing.assert_allclose(x[b].numpy(), orig._proj_simplex_np(v[b].numpy()), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(y[b].numpy(), orig._proj_l1_np(v[b].numpy(), 0.7), rtol=1e-12, atol=1e-14)


def test_empty_and_non_contiguous(device):
    v = _vectors(8, 6, "gauss", torch.float32, device)
    assert ops.project_simplex(v[:0]).shape == (0, 6)
    vt = v.t().contiguous().t()
    torch.testing.assert_close(ops.project_simplex(vt), ops.project_simplex(v))
    torch.testing.assert_close(ops.project_l1_ball(vt, 0.5), ops.project_l1_ball(v, 0.5))


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
def test_opcheck(device, dtype):
    v = _vectors(5, 7, "gauss", dtype, device)
    torch.library.opcheck(torch.ops.ppoison.project_simplex.default, (v, 1.0))
    torch.library.opcheck(torch.ops.ppoison.project_l1_ball.default, (v, 0.5))
