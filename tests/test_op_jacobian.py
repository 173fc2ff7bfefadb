import pytest
import torch

from ppoison_ext import ops, reference
from ppoison_ext.testing import float_dtypes, make_features, make_jacobian, make_probs, tol

DT_IDS = ["f32", "f64"]


def _fc_inputs(B, K, H, dtype, device):
    g = torch.Generator().manual_seed(B * 1000 + K)
    p = make_probs(B, K, dtype=dtype, device=device, generator=g)
    y = make_probs(B, K, dtype=dtype, device=device, generator=g)
    h = make_features(B, H, dtype=dtype, device=device, generator=g)
    return p, h, (h.double() ** 2).sum(-1).to(dtype), y


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("B,K,H", [(0, 10, 5), (1, 2, 3), (17, 10, 50), (5, 100, 8), (2, 1000, 4)])
def test_fc_ops_match_twin(device, dtype, B, K, H):
    p, h, hsq, y = _fc_inputs(B, K, H, dtype, device)
    torch.testing.assert_close(ops.jacobian_gram_fc(p, hsq), reference.jacobian_gram_fc(p, hsq), **tol(dtype, 10))
    torch.testing.assert_close(ops.jacobian_tvec_fc(p, h, y), reference.jacobian_tvec_fc(p, h, y), **tol(dtype))


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("B,K,D", [(0, 3, 4), (1, 2, 1), (9, 10, 64), (3, 100, 17)])
def test_explicit_ops_match_twin(device, dtype, B, K, D):
    G = make_jacobian(B, K, D, dtype=dtype, device=device)
    y = make_probs(B, K, dtype=dtype, device=device)
    # float32 sums over D terms: loosen with D
    torch.testing.assert_close(ops.jacobian_gram(G), reference.jacobian_gram(G), **tol(dtype, max(1, D)))
    torch.testing.assert_close(ops.jacobian_tvec(G, y), reference.jacobian_tvec(G, y), **tol(dtype, K))


@pytest.mark.parametrize("K,H", [(2, 3), (10, 7), (33, 5)])
def test_closed_form_equals_autograd_jacobian(device, K, H):
    """Row k of G = d(-log softmax(W h + b)_k)/dW equals (p - e_k) ⊗ h, checked on a real nn.Linear."""
    torch.manual_seed(K)
    B = 4
    head = torch.nn.Linear(H, K).double().to(device)
    h = torch.randn(B, H, dtype=torch.float64, device=device)
    y = make_probs(B, K, dtype=torch.float64, device=device)
    G = torch.empty(B, K, K * H, dtype=torch.float64, device=device)
    for b in range(B):
        nll = -torch.log_softmax(head(h[b:b + 1]), dim=1)[0]
        for k in range(K):
            (gw,) = torch.autograd.grad(nll[k], head.weight, retain_graph=True)
            G[b, k] = gw.flatten()
    with torch.no_grad():
        p = torch.softmax(head(h), dim=1)
    hsq = (h * h).sum(-1)
    torch.testing.assert_close(ops.jacobian_gram_fc(p, hsq), G @ G.transpose(1, 2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.jacobian_tvec_fc(p, h, y), torch.einsum("bk,bkd->bd", y, G), rtol=1e-10,
                               atol=1e-12)
    # and the explicit-G ops agree with the closed form
    torch.testing.assert_close(ops.jacobian_gram(G), ops.jacobian_gram_fc(p, hsq), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ops.jacobian_tvec(G, y), ops.jacobian_tvec_fc(p, h, y), rtol=1e-10, atol=1e-12)


def test_non_contiguous_inputs(device):
    p, h, hsq, y = _fc_inputs(8, 12, 6, torch.float64, device)
    pt = p.t().contiguous().t()  # same values, column-major
    yt = torch.stack([y, y], dim=2)[:, :, 0]  # same values, strided
    assert not pt.is_contiguous() and not yt.is_contiguous()
    torch.testing.assert_close(ops.jacobian_gram_fc(pt, hsq), reference.jacobian_gram_fc(p, hsq))
    torch.testing.assert_close(ops.jacobian_tvec_fc(pt, h, yt), reference.jacobian_tvec_fc(p, h, y))
    G = make_jacobian(4, 5, 9, dtype=torch.float64, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    assert not G.is_contiguous()
    torch.testing.assert_close(ops.jacobian_gram(G), reference.jacobian_gram(G.contiguous()))
    torch.testing.assert_close(ops.jacobian_tvec(G, yt[:4, :5]), reference.jacobian_tvec(G.contiguous(), y[:4, :5]))


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
def test_opcheck(device, dtype):
    p, h, hsq, y = _fc_inputs(3, 6, 4, dtype, device)
    G = make_jacobian(3, 6, 5, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.ppoison.jacobian_gram_fc.default, (p, hsq))
    torch.library.opcheck(torch.ops.ppoison.jacobian_tvec_fc.default, (p, h, y))
    torch.library.opcheck(torch.ops.ppoison.jacobian_gram.default, (G,))
    torch.library.opcheck(torch.ops.ppoison.jacobian_tvec.default, (G, y))
