"""tools/fuzz.py's comparison with the per-sample port: a degenerate row (the angular objective
taken on a direction below the Gram form's rounding) is counted apart, a worse vertex is flagged."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import fuzz  # noqa: E402

from ppoison_ext import ops  # noqa: E402


def _check(y, p, hsq, ystar):
    counts = collections.Counter()
    out = fuzz.port_checks([0], y, ystar, None, ystar, "extreme", True, "l2", 0.01,
                           {"p": p, "h_sqnorm": hsq}, torch.float32, counts)
    return [e for e in out if e.startswith("port oracle")], counts


def test_degenerate_direction_is_counted_apart_and_a_worse_vertex_flagged():
    # the fuzz run's row: p = e4 + 1e-26·e2 in float32; the port scores e4 by Gᵀe4 = √h·1e-26·e2
    y = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    p = torch.tensor([[0.0, 0.0, 1.0401413762e-26, 0.0, 1.0]])
    hsq = torch.tensor([2.9448072382365353e-05])
    ystar, _ = ops.mad_oracle(y, oracle="extreme", objmax=True, p=p, h_sqnorm=hsq)
    problems, counts = _check(y, p, hsq, ystar)
    assert problems == [] and counts["port_oracle_degenerate"] == 1
    # a generic row: the op's vertex agrees with the port's; another, worse vertex is flagged
    y = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]])
    p = torch.tensor([[0.3, 0.1, 0.2, 0.3, 0.1]])
    hsq = torch.tensor([2.0])
    ystar, _ = ops.mad_oracle(y, oracle="extreme", objmax=True, p=p, h_sqnorm=hsq)
    assert _check(y, p, hsq, ystar)[0] == []
    worst = torch.zeros_like(ystar)
    worst[0, int((ystar[0] == 0).nonzero()[0])] = 1.0
    flagged = _check(y, p, hsq, worst)[0]
    assert flagged and "vertex value" in flagged[0]
