"""Bad input raises ValueError / TypeError whose message names the argument."""

import math

import pytest
import torch

from ppoison_ext import ops

B, K = 4, 5


def _y(dtype=torch.float32, device="cpu"):
    return torch.softmax(torch.randn(B, K, dtype=dtype), -1).to(device)


def _nan(t):
    t = t.clone()
    t[1, 2] = math.nan
    return t


def _inf(t):
    t = t.clone()
    t[0, 0] = math.inf
    return t


y, p = _y(), _y()
hsq = torch.rand(B)
G = torch.randn(B, K, 3)
M = torch.eye(K).expand(B, K, K).contiguous()
meta = torch.empty(B, K, device="meta")

CASES = [
    # wrong rank
    ("rank y", lambda: ops.mad_oracle(y[0]), ValueError, r"y must have shape \[B, K\]"),
    ("rank p", lambda: ops.jacobian_gram_fc(p[0], hsq), ValueError, r"p must have shape"),
    ("rank hsq", lambda: ops.jacobian_gram_fc(p, hsq[:, None]), ValueError, r"h_sqnorm must have shape"),
    ("rank G", lambda: ops.jacobian_gram(G[0]), ValueError, r"G must have shape \[B, K, D\]"),
    ("rank step", lambda: ops.mad_step(y[0], y[0], 0.1), ValueError, r"y must have shape"),
    ("rank proj", lambda: ops.project_simplex(y[0]), ValueError, r"v must have shape"),
    # K / B mismatch between arguments
    ("K p", lambda: ops.mad_oracle(y, p=_y()[:, :3]), ValueError, r"p has 3 classes"),
    ("K y_star", lambda: ops.mad_step(y, y[:, :4], 0.1), ValueError, r"y_star has 4 classes"),
    ("K gram", lambda: ops.mad_oracle(y, gram=M[:, :4, :4]), ValueError, r"gram has 4 classes"),
    ("B hsq", lambda: ops.mad_oracle(y, p=p, h_sqnorm=hsq[:2]), ValueError, r"h_sqnorm has 2 samples"),
    ("K tvec", lambda: ops.jacobian_tvec(G, y[:, :2]), ValueError, r"y has 2 classes"),
    ("K y_tilde", lambda: ops.mad_objective(y[:, :3], y), ValueError, r"y_tilde has 3 classes"),
    ("both grams", lambda: ops.mad_oracle(y, p=p, gram=M), ValueError, r"either gram or \(p, h_sqnorm\)"),
    ("K=1", lambda: ops.mad_oracle(y[:, :1]), ValueError, r"y must have at least 2 classes"),
    # NaN / Inf
    ("nan y oracle", lambda: ops.mad_oracle(_nan(y)), ValueError, r"y contains NaN"),
    ("nan p oracle", lambda: ops.mad_oracle(y, p=_nan(p)), ValueError, r"p contains NaN"),
    ("inf gram", lambda: ops.mad_oracle(y, gram=_inf(M.view(B, -1)).view(B, K, K)), ValueError, r"gram contains"),
    ("nan hsq", lambda: ops.mad_oracle(y, p=p, h_sqnorm=torch.full((B,), math.nan)), ValueError, r"h_sqnorm"),
    ("negative hsq", lambda: ops.jacobian_gram_fc(p, -hsq), ValueError, r"h_sqnorm must be finite and >= 0"),
    ("nan step y", lambda: ops.mad_step(_nan(y), y, 0.1), ValueError, r"y contains NaN"),
    ("nan step y_star", lambda: ops.mad_step(y, _inf(y), 0.1, "kl"), ValueError, r"y_star contains NaN"),
    ("nan objective", lambda: ops.mad_objective(_nan(y), y), ValueError, r"y_tilde contains NaN"),
    ("nan proj", lambda: ops.project_l1_ball(_nan(y), 1.0), ValueError, r"v contains NaN"),
    ("nan G", lambda: ops.jacobian_gram(_nan(G.view(B, -1)).view(B, K, 3)), ValueError, r"G contains NaN"),
    ("nan tvec_fc h", lambda: ops.jacobian_tvec_fc(p, _nan(torch.rand(B, 3)), y), ValueError, r"h contains NaN"),
    # scalars
    ("negative epsilon", lambda: ops.mad_step(y, y, -0.1), ValueError, r"epsilon must be finite and >= 0"),
    ("nan epsilon", lambda: ops.mad_step(y, y, math.nan), ValueError, r"epsilon must be finite"),
    ("epsilon type", lambda: ops.mad_step(y, y, "0.1"), TypeError, r"epsilon must be a real number"),
    ("radius 0", lambda: ops.project_simplex(y, 0.0), ValueError, r"radius must be finite and > 0"),
    ("radius negative", lambda: ops.project_l1_ball(y, -1.0), ValueError, r"radius must be finite and > 0"),
    ("kl_steps", lambda: ops.mad_step(y, y, 0.1, "kl", kl_steps=-1), ValueError, r"kl_steps must be in"),
    ("exact_max_k", lambda: ops.mad_oracle(y, oracle="argmax", exact_max_k=40), ValueError, r"exact_max_k"),
    ("max_candidates", lambda: ops.mad_oracle(y, oracle="argmax", max_candidates=0), ValueError,
     r"max_candidates must be >= 1"),
    # names
    ("unknown oracle", lambda: ops.mad_oracle(y, oracle="best"), ValueError, r"oracle must be one of"),
    ("unknown oracle raw", lambda: torch.ops.ppoison.mad_oracle(y, None, None, None, "best", False, 16, 1024, None),
     ValueError, r"oracle must be one of"),
    ("unknown ydist", lambda: ops.mad_step(y, y, 0.1, "linf"), ValueError, r"ydist must be one of"),
    ("unknown ydist raw", lambda: torch.ops.ppoison.mad_step(y, y, 0.1, "linf", 15), ValueError,
     r"ydist must be one of"),
    ("oracle type", lambda: ops.mad_oracle(y, oracle=1), TypeError, r"oracle must be a str"),
    ("random without index", lambda: torch.ops.ppoison.mad_oracle(y, None, None, None, "random", False, 16, 1024,
                                                                  None), ValueError, r"needs index"),
    ("index range", lambda: ops.mad_oracle(y, oracle="random", index=torch.full((B,), K)), ValueError,
     r"index values must be in"),
    ("index dtype", lambda: ops.mad_oracle(y, oracle="random", index=torch.zeros(B)), TypeError,
     r"index must be an int64"),
    # dtypes
    ("int y", lambda: ops.mad_oracle(torch.ones(B, K, dtype=torch.long)), TypeError,
     r"y must be a float32 or float64 tensor"),
    ("int G", lambda: ops.jacobian_gram(torch.ones(B, K, 2, dtype=torch.int32)), TypeError, r"G must be a float32"),
    ("int v", lambda: ops.project_simplex(torch.ones(B, K, dtype=torch.long)), TypeError, r"v must be a float32"),
    ("half y", lambda: ops.mad_step(y.half(), y.half(), 0.1), TypeError, r"y must be a float32 or float64"),
    ("mixed dtypes", lambda: ops.mad_oracle(y, p=p.double()), TypeError, r"p has dtype .* but y has dtype"),
    ("not a tensor", lambda: ops.mad_oracle(y.tolist()), TypeError, r"y must be a torch.Tensor"),
    # a raw call: the kernel's own check, a ValueError (no TypeError crosses the stable ABI)
    ("dtype raw", lambda: torch.ops.ppoison.mad_step(y.long(), y.long(), 0.1, "l1", 15), ValueError,
     r"y must be a float32 or float64 tensor, got Long"),
    ("dtype mix raw", lambda: torch.ops.ppoison.project_simplex(y.half(), 1.0), ValueError,
     r"v must be a float32 or float64 tensor, got Half"),
    # devices
    ("devices oracle", lambda: ops.mad_oracle(y, p=meta), ValueError, r"p is on meta but y is on cpu"),
    ("devices step", lambda: ops.mad_step(y, meta, 0.1), ValueError, r"y_star is on meta but y is on cpu"),
    ("devices tvec", lambda: ops.jacobian_tvec_fc(p, torch.rand(B, 2), meta), ValueError, r"y is on meta"),
]


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_named_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_cpu_mix_raises():
    yc = y.cuda()
    with pytest.raises(ValueError, match=r"p is on cpu but y is on cuda"):
        ops.mad_oracle(yc, p=p)
    with pytest.raises(ValueError, match=r"is on"):
        torch.ops.ppoison.mad_step(yc, y, 0.1, "l1", 15)
