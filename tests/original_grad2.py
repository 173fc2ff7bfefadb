"""A port of GR's GRAD² (``method_gradient_redirection``) written from the spec
(field-defenses.md §1.2–1.5), the fidelity oracle for ppoison_ext.defenses.GRAD2.

Coefficients by GR's double backward: Φ(ỹ) = ⟨∇_θ L(ỹ), t⟩ with L the batch-mean
log-likelihood, c = ∂Φ/∂p. The allocation by GR's sequential Python loop, one sample and one
budget at a time, with its device-scalar accumulator and np.isclose early stop.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def get_gty(bx: Tensor, student: nn.Module, y: Tensor, create_graph: bool = False, params=None) -> Tensor:
    """∇_θ mean_n Σ_k y_nk log softmax(student(bx))_nk, flattened in parameters() order."""
    params = list(student.parameters()) if params is None else params
    logits = student(bx)
    ll = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    loss = (y * ll).sum(1).mean(0)
    g = torch.autograd.grad(loss, params, create_graph=create_graph)
    return torch.cat([t.reshape(-1) for t in g])


def coefficients(bx: Tensor, p: Tensor, student: nn.Module, target: Optional[Tensor], params=None) -> Tensor:
    """GR's c = ∂⟨g̃(ỹ), t⟩/∂p at ỹ = p [B, K] by double backward; target=None is MIN-IP
    (t = the batch gradient at p). ``target`` is GR's t (the code minimises, t = −a)."""
    with torch.enable_grad():
        p = p.detach().clone().requires_grad_(True)
        yt = p.clone()
        g = get_gty(bx, student, yt, create_graph=True, params=params)
        t = g.detach() if target is None else target.to(g)
        phi = (g * t).sum()
        (c,) = torch.autograd.grad(phi, p)
    return c.detach()


def allocate_loop(p: Tensor, c: Tensor, eps: float) -> Tensor:
    """GR's per-sample loop (defenses.py:342-377) for one row p [K], c [K] and one budget."""
    order = torch.argsort(c, stable=True)
    K = p.shape[0]
    r = int(order[0])
    x = p.clone()
    G = min(1.0 - float(p[r]), eps / 2)
    acc = torch.zeros((), dtype=p.dtype, device=p.device)
    i = K - 1
    while acc < G:
        d = int(order[i])
        if acc + x[d] <= G:
            acc = acc + x[d]
            x[d] = 0
        else:
            x[d] = x[d] - (G - acc)
            acc = torch.tensor(G, dtype=p.dtype, device=p.device)
        i -= 1
        if np.isclose(float(acc), G) or i <= 0:  # i <= 0: never wrap onto the receiver
            break
    x[r] = x[r] + acc
    return F.softmax(torch.log(x.clamp(1e-15, 1)), dim=0)


def grad2_per_sample(bx: Tensor, teacher: nn.Module, student: nn.Module, epsilons: Sequence[float],
                     target: Optional[Tensor]) -> Tensor:
    """GR's method_gradient_redirection on one batch: [B, E, K]."""
    with torch.no_grad():
        p = F.softmax(teacher(bx), dim=1)
    c = coefficients(bx, p, student, target)
    out = torch.empty(p.shape[0], len(epsilons), p.shape[1], dtype=p.dtype)
    for n in range(p.shape[0]):
        for e, eps in enumerate(epsilons):
            out[n, e] = allocate_loop(p[n], c[n], float(eps))
    return out
