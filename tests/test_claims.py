"""The paper's claims, checked on real data with the fast demo configuration
(``ppoison_ext/configs/mnist_fast.toml``: LeNet victim on 30k MNIST images, 2000 notMNIST
Knockoff queries, attacker 4 epochs), run with two seeds (42 and 43: victim, proxy, queries and
attacker all change). Each claim must hold on both seeds with a margin of ``MARGIN`` points of
attacker accuracy; the failure message reports both seeds' numbers (they are in README.md too).
Nothing here is tuned to pass: where our data disagrees with the paper the test is an
``xfail(strict=True, raises=AssertionError)`` saying so, so that a change in the outcome, or a
crash, is seen.
"""

from __future__ import annotations

import pytest

from ppoison_ext.pipeline.demo import config_path, run_demo

DROP = 1.0  # "equal defender accuracy": settings losing at most this many points of top-1 accuracy
MARGIN = 2.0  # a claim "A beats B" holds when A's attacker accuracy is lower by more than this
SEEDS = (42, 43)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{seed: results} of the fast demo."""
    text = config_path(True).read_text()
    assert "\nseed = 42\n" in text
    out = {}
    for seed in SEEDS:
        folder = tmp_path_factory.mktemp(f"demo_fast_{seed}")
        cfg = folder / "config.toml"
        cfg.write_text(text.replace("\nseed = 42\n", f"\nseed = {seed}\n", 1))
        out[seed] = run_demo(folder / "run", config=cfg, progress=False)
    return out


def _largest_budget(rows):
    b = max(r["budget"] for r in rows)
    return [r for r in rows if r["budget"] == b]


def _best_attacker_acc(rows, label, drop=DROP):
    """Lowest attacker accuracy among the defense's settings that keep the defender within ``drop``."""
    ok = [r for r in rows if r["label"] == label and r["defender_acc_drop"] <= drop]
    assert ok, f"no {label} setting keeps the defender within {drop} points: {_table(rows)}"
    best = min(ok, key=lambda r: r["attacker_acc"])
    return best["attacker_acc"], best["value"]


def _table(rows):
    return "; ".join(f"{r['label']}({r['value']}): defender {r['defender_acc']:.2f}, attacker {r['attacker_acc']:.2f}"
                     for r in rows)


def _beats(runs, a, b):
    """Asserts on every seed that ``a``'s best attacker accuracy (within DROP) is lower than ``b``'s
    by more than MARGIN; the message lists both seeds."""
    report, ok = [], True
    for seed, res in runs.items():
        rows = _largest_budget(_naive(res))
        va, pa = _best_attacker_acc(rows, a)
        vb, pb = _best_attacker_acc(rows, b)
        ok &= va + MARGIN < vb
        report.append(f"seed {seed}: {a}({pa}) {va:.2f} vs {b}({pb}) {vb:.2f}")
    assert ok, " | ".join(report)


def _naive(res):
    return [r for r in res["rows"] if not r.get("thief_of")]


def test_fast_demo_is_complete_and_victim_is_good(runs):
    for seed, res in runs.items():
        rows = _naive(res)
        labels = {r["label"] for r in rows}
        assert labels == {"none", "reverse sigmoid", "random noise", "MAD", "MAD-argmax", "GRAD² all-ones",
                          "ModelGuard-W", "ModelGuard-S"}
        assert len(rows) == 12  # every setting of the config at its one budget
        assert all(r["defender_acc"] is not None and r["attacker_acc"] is not None for r in rows)
        victim = rows[0]["victim_acc"]
        assert victim >= 95.0, (seed, victim)  # 1 epoch on 30k images (measured 96.95 with seed 42)
        undefended = [r for r in rows if r["label"] == "none"][0]["attacker_acc"]
        assert undefended > 50.0, (seed, undefended)  # the attack works against the undefended API


def test_random_noise_spans_the_defender_accuracy_range(runs):
    """The random-noise grid reaches the defender losses the comparisons are made at: one
    setting within DROP points, and one beyond it (so "within DROP" picks its strongest setting)."""
    for seed, res in runs.items():
        rows = [r for r in _naive(res) if r["label"] == "random noise"]
        drops = sorted(r["defender_acc_drop"] for r in rows)
        assert drops[0] <= DROP < drops[-1], (seed, _table(rows))


def test_mad_argmax_loses_no_defender_accuracy(runs):
    for res in runs.values():
        rows = [r for r in _naive(res) if r["label"] == "MAD-argmax"]
        assert rows
        for r in rows:
            assert r["defender_acc"] == r["victim_acc"], _table(rows)
            assert r["defender_acc_drop"] == 0.0


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="measured on this configuration (2000 queries, 4 attacker epochs): MAD-argmax eps=1 "
                   "45.15 vs reverse sigmoid beta=1 46.75 (seed 42), 42.10 vs 40.30 (seed 43) -- within the "
                   "2-point margin or reversed; the full demo (5k queries) separates them (README)")
def test_mad_argmax_beats_reverse_sigmoid_at_equal_defender_accuracy(runs):
    _beats(runs, "MAD-argmax", "reverse sigmoid")


def test_mad_argmax_beats_random_noise_at_equal_defender_accuracy(runs):
    _beats(runs, "MAD-argmax", "random noise")


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="measured on this configuration: reverse sigmoid (beta=1, no defender loss) leaves "
                   "the attacker lower than MAD-extreme at eps<=0.5; MAD-extreme beyond 0.5 costs defender "
                   "accuracy (see README, 'Comparison with the paper')")
def test_mad_beats_reverse_sigmoid_at_equal_defender_accuracy(runs):
    _beats(runs, "MAD", "reverse sigmoid")


def test_mad_beats_random_noise_at_equal_defender_accuracy(runs):
    _beats(runs, "MAD", "random noise")


def test_results_files_and_plots(runs):
    for res in runs.values():
        meta = res["meta"]
        assert len(meta["plots"]) == 2
        for p in meta["plots"]:
            with open(p, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_mad_argmax_is_a_no_op_against_the_top1_thief(runs):
    """MAD-argmax keeps every top-1 label, so a thief training on hard labels learns exactly what
    it learns from the undefended victim, although the naive thief is hurt."""
    report, ok = [], True
    for seed, res in runs.items():
        robust = {e["label"]: e for e in res["robust"] if e["thieves"]}
        thief = {(r["label"], r["value"]): r["attacker_acc"] for r in res["rows"] if r["attack"] == "top-1 thief"}
        e = robust.get("MAD-argmax")
        assert e is not None and "none" in robust, (seed, sorted(robust))
        top1_mad, top1_none = thief[("MAD-argmax", e["value"])], thief[("none", None)]
        ok &= top1_mad == top1_none and e["naive"] + MARGIN < top1_mad
        report.append(f"seed {seed}: MAD-argmax({e['value']}) naive {e['naive']:.2f}, top-1 thief {top1_mad:.2f}; "
                      f"undefended top-1 thief {top1_none:.2f}")
    assert ok, " | ".join(report)


def test_robust_is_never_below_naive(runs):
    for res in runs.values():
        for e in res["robust"]:
            assert e["robust"] >= e["naive"], e


# ---- the field's defenses (GRAD² all-ones, ModelGuard-W, ModelGuard-S: one setting each, ε = 1) ----

L1_BUDGETED = ("MAD", "MAD-argmax", "GRAD² all-ones", "ModelGuard-W", "ModelGuard-S")  # ‖ỹ − y‖₁ ≤ ε


def test_modelguard_loses_no_defender_accuracy(runs):
    """ModelGuard-W and -S keep every query's top-1 class, so the defended victim's accuracy is the
    victim's, exactly."""
    for seed, res in runs.items():
        rows = [r for r in _naive(res) if r["label"] in ("ModelGuard-W", "ModelGuard-S")]
        assert {r["label"] for r in rows} == {"ModelGuard-W", "ModelGuard-S"}, seed
        for r in rows:
            assert r["defender_acc"] == r["victim_acc"], (seed, _table(rows))
            assert r["defender_acc_drop"] == 0.0


def test_l1_budgeted_defenses_stay_within_epsilon(runs):
    """MAD, GRAD² and ModelGuard-W/-S (L1 settings) move the posteriors by at most ε in L1: the mean
    over the evaluation queries and over the thief's queries."""
    for seed, res in runs.items():
        rows = [r for r in _naive(res) if r["label"] in L1_BUDGETED]
        assert {r["label"] for r in rows} == set(L1_BUDGETED), seed
        for r in rows:
            assert r["param"] == "epsilon", r
            for key in ("l1_mean", "l1_transfer"):
                assert r[key] is not None and r[key] <= r["value"] + 1e-4, (seed, r["label"], r["value"], key,
                                                                             r[key])


@pytest.mark.parametrize("label", ["ModelGuard-W", "ModelGuard-S"])
def test_top1_keeping_defense_is_a_no_op_against_the_top1_thief(runs, label):
    """A defense that keeps every top-1 label gives the Top-1 thief the undefended victim's hard
    labels: its accuracy equals the Top-1 thief's against the undefended victim (the grid reuses that
    attacker). The thief runs where the defense lowers the naive thief by ≥ 1 point."""
    report, ok = [], True
    for seed, res in runs.items():
        robust = {e["label"]: e for e in res["robust"] if e["thieves"]}
        thief = {(r["label"], r["value"]): r["attacker_acc"] for r in res["rows"]
                 if r["attack"] == "top-1 thief"}
        e = robust.get(label)
        assert e is not None and "none" in robust, (seed, label, sorted(robust))
        ok &= thief[(label, e["value"])] == thief[("none", None)]
        report.append(f"seed {seed}: {label}({e['value']}) naive {e['naive']:.2f}, top-1 thief "
                      f"{thief[(label, e['value'])]:.2f}; undefended top-1 thief {thief[('none', None)]:.2f}")
    assert ok, " | ".join(report)


def test_modelguard_w_beats_random_noise_at_equal_defender_accuracy(runs):
    _beats(runs, "ModelGuard-W", "random noise")


def test_modelguard_w_beats_mad_argmax_at_equal_defender_accuracy(runs):
    """ModelGuard's claim against MAD, both at ε = 1 and both keeping top-1."""
    _beats(runs, "ModelGuard-W", "MAD-argmax")


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="measured on this configuration: ModelGuard-S at its one fast setting, eps=1, "
                   "moves the posteriors little (mean L1 0.06 / 0.05) and leaves the naive thief at 64.20 "
                   "vs random noise eps_z=30 60.90 (seed 42), 58.70 vs 62.80 (seed 43): "
                   "separated on one seed only")
def test_modelguard_s_beats_random_noise_at_equal_defender_accuracy(runs):
    _beats(runs, "ModelGuard-S", "random noise")


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="measured on this configuration: GRAD² all-ones' one fast setting, eps=1, with "
                   "the demo's randomly initialised surrogate costs 83.05 (seed 42) and 89.00 (seed 43) "
                   "points of defender accuracy, so no setting is within DROP to compare at equal "
                   "defender accuracy")
def test_grad2_beats_mad_at_equal_defender_accuracy(runs):
    """GRAD²'s claim: more attacker error than MAD at equal defender error."""
    _beats(runs, "GRAD² all-ones", "MAD")
