"""A per-sample port of Adaptive Misinformation's serving, written from the behavioural spec
(field-defenses.md §5.3 for the original, §2.4 for GRAD²'s baseline, §6.3 for ModelGuard's),
not from the GPL-3.0 code: the fidelity oracle of tests/test_admis.py and the per-sample
baseline of benchmarks/test_bench_admis.py.

One query at a time, as the formulas are written: y = softmax(f(x)/T), s = max y (or the max
softmax of the OE model, GRAD²), ŷ = softmax(f̂(x)), h = 1/(1 + exp(−ν(τ − s))), ỹ = (1 − h)y + hŷ.
"""

import torch
import torch.nn.functional as F

NU = {"admis": 10000.0, "grad2": 1000.0, "modelguard": 1000.0}


def am_per_sample(x, victim, misinfo, *, tau, variant="admis", nu=None, oe_model=None, T=1.0, adaptive=True):
    """Released posteriors [B, K], computed query by query."""
    nu = NU[variant] if nu is None else nu
    rows = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i:i + 1]
            y = F.softmax(victim(xi) / T, dim=1)[0]
            if variant == "grad2" and oe_model is not None:
                s = F.softmax(oe_model(xi), dim=1)[0].max()
            else:
                s = y.max()
            y_mis = F.softmax(misinfo(xi), dim=1)[0]
            if adaptive:
                h = 1.0 / (1.0 + torch.exp(-nu * (tau - s)))
            else:
                h = torch.tensor(tau, dtype=y.dtype)
            rows.append((1.0 - h) * y + h * y_mis)
    return torch.stack(rows)
