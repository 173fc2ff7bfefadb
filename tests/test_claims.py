"""The paper's claims, checked on real data with the fast demo configuration
(``ppoison_ext/configs/mnist_fast.toml``: LeNet victim on 30k MNIST images, 2000 notMNIST
Knockoff queries, attacker 4 epochs). Each assertion can fail; the measured numbers are in the
failure message and in README.md. Nothing here is tuned to pass: where our data disagrees with
the paper the test is an ``xfail(strict=True)`` saying so, so that a change in the outcome is seen.
"""

from __future__ import annotations

import pytest

from ppoison_ext.pipeline.demo import run_demo

DROP = 1.0  # "equal defender accuracy": settings losing at most this many points of top-1 accuracy


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_fast")
    return run_demo(out, fast=True, progress=False)


def _largest_budget(rows):
    b = max(r["budget"] for r in rows)
    return [r for r in rows if r["budget"] == b]


def _best_attacker_acc(rows, label, drop=DROP):
    """Lowest attacker accuracy among the defense's settings that keep the defender within ``drop``."""
    ok = [r for r in rows if r["label"] == label and r["defender_acc_drop"] <= drop]
    assert ok, f"no {label} setting keeps the defender within {drop} points: {rows}"
    best = min(ok, key=lambda r: r["attacker_acc"])
    return best["attacker_acc"], best["value"]


def _table(rows):
    return "; ".join(f"{r['label']}({r['value']}): defender {r['defender_acc']:.2f}, attacker {r['attacker_acc']:.2f}"
                     for r in rows)


def test_fast_demo_is_complete_and_victim_is_good(results):
    rows = results["rows"]
    labels = {r["label"] for r in rows}
    assert labels == {"none", "reverse sigmoid", "random noise", "MAD", "MAD-argmax"}
    assert len(rows) == 8  # every setting of the config at its one budget
    assert all(r["defender_acc"] is not None and r["attacker_acc"] is not None for r in rows)
    victim = rows[0]["victim_acc"]
    assert victim >= 95.0, victim  # 1 epoch on 30k images (measured 96.95)
    undefended = [r for r in rows if r["label"] == "none"][0]["attacker_acc"]
    assert undefended > 50.0, undefended  # the attack works against the undefended API


def test_mad_argmax_loses_no_defender_accuracy(results):
    rows = [r for r in results["rows"] if r["label"] == "MAD-argmax"]
    assert rows
    for r in rows:
        assert r["defender_acc"] == r["victim_acc"], _table(rows)
        assert r["defender_acc_drop"] == 0.0


def test_mad_argmax_beats_reverse_sigmoid_and_random_noise_at_equal_defender_accuracy(results):
    rows = _largest_budget(results["rows"])
    mad, _ = _best_attacker_acc(rows, "MAD-argmax")
    rs, _ = _best_attacker_acc(rows, "reverse sigmoid")
    rn, _ = _best_attacker_acc(rows, "random noise")
    assert mad < rs and mad < rn, _table(rows)


@pytest.mark.xfail(strict=True, reason="measured on this configuration: reverse sigmoid (beta=1, no defender "
                   "loss) leaves the attacker lower than MAD-extreme at eps<=0.5; MAD-extreme beyond 0.5 "
                   "costs defender accuracy (see README, 'Comparison with the paper')")
def test_mad_beats_reverse_sigmoid_at_equal_defender_accuracy(results):
    rows = _largest_budget(results["rows"])
    mad, _ = _best_attacker_acc(rows, "MAD")
    rs, _ = _best_attacker_acc(rows, "reverse sigmoid")
    assert mad < rs, _table(rows)


def test_mad_beats_random_noise_at_equal_defender_accuracy(results):
    rows = _largest_budget(results["rows"])
    mad, _ = _best_attacker_acc(rows, "MAD")
    rn, _ = _best_attacker_acc(rows, "random noise")
    assert mad < rn, _table(rows)


def test_results_files_and_plots(results):
    meta = results["meta"]
    assert len(meta["plots"]) == 2
    for p in meta["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
