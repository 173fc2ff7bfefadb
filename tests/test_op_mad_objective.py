import pytest
import torch

import original_mad as orig
from ppoison_ext import ops, reference
from ppoison_ext.testing import PROB_KINDS, float_dtypes, make_features, make_probs, tol

DT_IDS = ["f32", "f64"]


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
@pytest.mark.parametrize("gram", ["fc", "dense", "identity"])
@pytest.mark.parametrize("K", [2, 10, 100])
@pytest.mark.parametrize("kind", PROB_KINDS)
def test_matches_twin(device, kind, K, gram, dtype):
    g = torch.Generator().manual_seed(K)
    y = make_probs(20, K, kind, dtype=dtype, device=device, generator=g)
    yt = make_probs(20, K, "random", dtype=dtype, device=device, generator=g)
    p = make_probs(20, K, dtype=dtype, device=device, generator=g)
    hsq = (make_features(20, 5, dtype=torch.float64, generator=g) ** 2).sum(-1).to(device=device, dtype=dtype)
    args = {"fc": {"p": p, "h_sqnorm": hsq}, "identity": {},
            "dense": {"gram": reference.jacobian_gram_fc(p.double(), hsq.double()).to(dtype)}}[gram]
    a = ops.mad_objective(yt, y, **args)
    b = reference.mad_objective(yt, y, **args)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol(dtype, 100))
    assert (a[0] >= 0).all() and (a[0] <= 4).all() and (a[1] >= 0).all()


@pytest.mark.parametrize("K", [3, 10, 40])
def test_matches_original_explicit_jacobian(K):
    torch.manual_seed(K)
    head = torch.nn.Linear(9, K).double()
    h = torch.relu(torch.randn(6, 9, dtype=torch.float64)) + 0.1
    y = make_probs(6, K, dtype=torch.float64)
    yt = make_probs(6, K, dtype=torch.float64)
    with torch.no_grad():
        p = torch.softmax(head(h), 1)
    obj, sobj = ops.mad_objective(yt, y, p=p, h_sqnorm=(h * h).sum(-1))
    for b in range(6):
        G = orig.compute_jacobian_nll(h[b:b + 1], head, head.weight)
        torch.testing.assert_close(obj[b], orig.calc_objective(yt[b], y[b], G), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sobj[b], orig.calc_surrogate_objective(yt[b], y[b], G), rtol=1e-9, atol=1e-12)
        # explicit identity Gram = the original's G = I
        o, s = ops.mad_objective(yt[b:b + 1], y[b:b + 1])
        eye = torch.eye(K, dtype=torch.float64)
        torch.testing.assert_close(o[0], orig.calc_objective(yt[b], y[b], eye), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s[0], orig.calc_surrogate_objective(yt[b], y[b], eye), rtol=1e-9, atol=1e-12)


def test_zero_gradient_normalizes_to_zero():
    # h = 0 → G = 0 → both objectives are 0 (the original divides by zero: NaN)
    y = make_probs(3, 5, dtype=torch.float64)
    o, s = ops.mad_objective(y.flip(-1), y, p=make_probs(3, 5, dtype=torch.float64), h_sqnorm=torch.zeros(3,
                                                                                                   dtype=torch.float64))
    assert torch.equal(o, torch.zeros(3, dtype=torch.float64)) and torch.equal(s, torch.zeros_like(s))
    # y = p → Gᵀy = 0: the unit vector of Gᵀy is 0, so obj = ‖u‖² = 1
    o, _ = ops.mad_objective(y.flip(-1), y, p=y, h_sqnorm=torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(o, torch.ones_like(o))


@pytest.mark.parametrize("dtype", float_dtypes, ids=DT_IDS)
def test_opcheck(device, dtype):
    y = make_probs(4, 6, dtype=dtype, device=device)
    yt = make_probs(4, 6, dtype=dtype, device=device)
    hsq = torch.rand(4, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.ppoison.mad_objective.default, (yt, y, y.flip(-1), hsq, None))
    M = reference.jacobian_gram_fc(y, hsq)
    torch.library.opcheck(torch.ops.ppoison.mad_objective.default, (yt, y, None, None, M))
