"""``ppoison prove-eval`` at a reduced size (two budgets, one seed, two innocents per group): the
sanity checks of spec §II.5.5 and the shape of what it reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _serve_models import models
from ppoison_ext.pipeline import prove_eval
from ppoison_ext.pipeline.prove_eval import dawn_simulation, one_ulp


def test_one_ulp_and_simulation():
    x = torch.randn(5, 1, 3, 3)
    y = one_ulp(x)
    assert torch.equal(y.view(5, -1)[:, 1:], x.view(5, -1)[:, 1:])
    x0, y0 = x.view(5, -1)[:, 0], y.view(5, -1)[:, 0]
    up, down = torch.nextafter(x0, torch.tensor(math.inf)), torch.nextafter(x0, torch.tensor(-math.inf))
    assert ((y0 == up) | (y0 == down)).all()
    p = torch.softmax(torch.randn(20_000, 10, generator=torch.Generator().manual_seed(0)), 1)
    q = dawn_simulation(0.1, seed=1)(None, p)
    moved = q.argmax(1) != p.argmax(1)
    assert abs(moved.double().mean() - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20_000)
    assert torch.equal(q.sort(1).values, p.sort(1).values)  # swaps only


def test_prove_eval_reduced(tmp_path_factory):
    victim_dir, _ = models(tmp_path_factory)
    out = tmp_path_factory.mktemp("prove-eval")
    assert prove_eval.main([str(victim_dir), "--out", str(out), "--rates", "0.05", "--budgets", "200,400",
                            "--seeds", "1", "--innocents", "2", "--innocent-subset", "1000",
                            "--long-epochs", "3", "-d", "-1", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    row = res["rates"]["0.05"]
    se = math.sqrt(0.05 * 0.95 / 10_000)
    # §II.5.5: the marked fraction of all answers is the effective rate (each mark moves the top-1)
    assert abs(row["cost"]["changed_argmax"] - row["effective_rate"]) < 4 * se
    assert row["cost"]["accuracy"] < row["cost"]["undefended_accuracy"]
    longer = {f"{t}, 3 epochs" for t in prove_eval.LONG_THIEVES}
    assert set(row["thieves"]) == set(prove_eval.THIEVES) | longer
    assert all(list(row["thieves"][t]) == ["400"] for t in longer)
    naive, both = row["thieves"]["naive"]["400"][0], row["thieves"]["consistency"]["400"][0]
    assert naive["n"] == row["marked_of_queries"] and 1.5 * naive["n"] < both["n"] < 2.5 * naive["n"]
    assert both["kept"] < 400 and all(0.0 <= c["p_chance"] <= 1.0 for c in (naive, both))
    assert row["thieves"]["naive"]["200"][0]["n"] <= naive["n"]
    sybil = row["sybil"]
    assert sybil["1"]["one_key"]["n"] == naive["n"] and sybil["20"]["one_key"]["n"] < naive["n"]
    assert sybil["5"]["union"]["n"] > naive["n"]  # the benign keys' marks join the union
    assert row["innocents"]["of"] == 4 and 0 <= row["innocents"]["claims"] <= 4
    assert "| naive | 400 |" in (out / "prove_eval.md").read_text()


def test_bad_settings(tmp_path_factory, tmp_path):
    victim_dir, _ = models(tmp_path_factory)
    assert prove_eval.main([str(victim_dir), "--out", str(tmp_path), "--budgets", "20000", "-d", "-1"]) == 2
    with pytest.raises(SystemExit):
        prove_eval.main([str(victim_dir)])
