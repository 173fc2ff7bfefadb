"""The GRAD² table metric (ppoison_ext.pipeline.metrics): the first-bracketing-segment interpolation
and the table built from result rows."""

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ppoison_ext.pipeline.metrics import (GRAD2_COLUMNS, GRAD2_DERR_OFFSETS, GRAD2_EPS_TARGETS, grad2_markdown,
                                          grad2_table, interpolate_at)

# ---------------------------------------------------------------------------------------------
# interpolate_at

SPEC_KEYS = (0.05, 0.055, 0.08, 0.07)
SPEC_VALUES = (0.2, 0.3, 0.5, 0.6)


def test_spec_minimum_first_bracketing_segment():
    baseline = 0.05
    assert interpolate_at(SPEC_KEYS, SPEC_VALUES, baseline + 0.01) == pytest.approx(0.34)
    # 0.07 also lies on the decreasing segment [0.08, 0.07]; the first (increasing) one wins
    assert interpolate_at(SPEC_KEYS, SPEC_VALUES, baseline + 0.02) == pytest.approx(0.42)


def test_target_outside_every_segment_is_none():
    assert interpolate_at(SPEC_KEYS, SPEC_VALUES, 0.01) is None
    assert interpolate_at(SPEC_KEYS, SPEC_VALUES, 0.09) is None
    assert interpolate_at([], [], 0.0) is None
    assert interpolate_at([0.1], [0.5], 0.1) is None  # one point is no segment


def test_decreasing_segment_never_brackets():
    assert interpolate_at([0.3, 0.1], [1.0, 2.0], 0.2) is None
    assert interpolate_at([0.3, 0.1, 0.2], [1.0, 2.0, 4.0], 0.15) == pytest.approx(3.0)


def test_segment_end_points():
    assert interpolate_at([0.0, 1.0], [2.0, 4.0], 0.0) == 2.0
    assert interpolate_at([0.0, 1.0], [2.0, 4.0], 1.0) == 4.0


def test_equal_keys_bracketing_give_the_later_value():
    assert interpolate_at([0.1, 0.2, 0.2, 0.4], [1.0, 2.0, 3.0, 5.0], 0.2) == 2.0  # [0.1, 0.2] comes first
    assert interpolate_at([0.2, 0.2, 0.4], [2.0, 3.0, 5.0], 0.2) == 3.0
    assert interpolate_at([0.2, 0.2], [2.0, 3.0], 0.2) == 3.0
    assert interpolate_at([0.2, 0.2], [2.0, 3.0], 0.3) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=12, unique=True),
       st.data())
def test_matches_numpy_interp_on_increasing_keys(raw, data):
    keys = sorted(raw)
    # keys a subnormal apart make np.interp's slope overflow (inf/nan): no reference to compare with
    assume(float(np.diff(keys).min()) > 1e-6)
    values = data.draw(st.lists(st.floats(-100, 100, allow_nan=False), min_size=len(keys), max_size=len(keys)))
    target = data.draw(st.floats(keys[0], keys[-1], allow_nan=False))
    got = interpolate_at(keys, values, target)
    assert got is not None
    assert got == pytest.approx(float(np.interp(target, keys, values)), rel=1e-9, abs=1e-7)


def test_matches_numpy_interp_seeded():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 15))
        keys = np.cumsum(rng.uniform(1e-3, 1.0, n)) + rng.normal()
        values = rng.normal(size=n)
        for target in rng.uniform(keys[0], keys[-1], 5):
            assert interpolate_at(keys, values, target) == pytest.approx(np.interp(target, keys, values))
        assert interpolate_at(keys, values, keys[0] - 1e-3) is None
        assert interpolate_at(keys, values, keys[-1] + 1e-3) is None


@pytest.mark.parametrize("keys, values, target, name", [
    ([0.1, 0.2], [1.0], 0.1, "same length"),
    ([0.1, float("nan")], [1.0, 2.0], 0.1, r"keys\[1\]"),
    ([0.1, 0.2], [1.0, float("inf")], 0.1, r"values\[1\]"),
    ([0.1, 0.2], [1.0, 2.0], float("nan"), "target"),
    ([0.1, 0.2], [1.0, 2.0], float("-inf"), "target"),
    ([0.1, 0.2], [1.0, 2.0], None, "target"),
    (["a", 0.2], [1.0, 2.0], 0.1, r"keys\[0\]"),
    ([0.1, 0.2], [True, 2.0], 0.1, r"values\[0\]"),
])
def test_interpolate_bad_input(keys, values, target, name):
    with pytest.raises(ValueError, match=name):
        interpolate_at(keys, values, target)


# ---------------------------------------------------------------------------------------------
# grad2_table


def _row(defense, label, value, attacker_acc, defender_acc, l1_transfer, budget=1000, victim="v", attack="knockoff"):
    return {"victim": victim, "attack": attack, "defense": defense, "label": label, "value": value, "budget": budget,
            "attacker_acc": attacker_acc, "defender_acc": defender_acc, "l1_transfer": l1_transfer}


def _rows():
    # none: d_err 10, a_err 20 (e_eps recorded as a tiny non-zero value: the baseline is 0 regardless)
    return [
        _row("none", "none", "0", 80.0, 90.0, 1e-4),
        _row("none", "none", "0", 50.0, 90.0, 1e-4, budget=100),  # a smaller budget: ignored
        # mad: d_err 10.5, 12, 20; e_eps 0.05, 0.3, 0.6; a_err 30, 40, 60
        _row("mad", "mad", "0.1", 70.0, 89.5, 0.05),
        _row("mad", "mad", "0.1", 10.0, 10.0, 1.9, budget=100),
        _row("mad", "mad", "0.5", 60.0, 88.0, 0.3),
        _row("mad", "mad", "1.0", 40.0, 80.0, 0.6),
        # weak: never costs more than 0.5 points of defender error nor more than 0.08 L1
        _row("random", "weak", "0.01", 79.0, 89.8, 0.05),
        _row("random", "weak", "0.02", 78.0, 89.5, 0.08),
    ]


def test_grad2_table_small_grid():
    table = grad2_table(_rows())
    assert [(e["victim"], e["attack"], e["label"], e["budget"]) for e in table] == [
        ("v", "knockoff", "none", 1000), ("v", "knockoff", "mad", 1000), ("v", "knockoff", "weak", 1000)]
    none, mad, weak = table
    # the none row reports its attacker error in every column
    assert all(none[c] == pytest.approx(20.0) for c in GRAD2_COLUMNS)
    # d_err targets 11, 12, 15 on (10, 20) (10.5, 30) (12, 40) (20, 60): the none point is grid point 0
    assert mad["a_err@d_err+1"] == pytest.approx(30.0 + 0.5 / 1.5 * 10.0)
    assert mad["a_err@d_err+2"] == pytest.approx(40.0)
    assert mad["a_err@d_err+5"] == pytest.approx(40.0 + 3.0 / 8.0 * 20.0)
    # e_eps targets 0.1, 0.2, 0.5 on (0, 20) (0.05, 30) (0.3, 40) (0.6, 60)
    assert mad["a_err@eps0.1"] == pytest.approx(30.0 + 0.05 / 0.25 * 10.0)
    assert mad["a_err@eps0.2"] == pytest.approx(30.0 + 0.15 / 0.25 * 10.0)
    assert mad["a_err@eps0.5"] == pytest.approx(40.0 + 0.2 / 0.3 * 20.0)
    # weak never reaches a target
    assert all(weak[c] is None for c in GRAD2_COLUMNS)


def test_grad2_table_none_point_brackets_targets_below_the_first_grid_point():
    rows = [_row("none", "none", "0", 80.0, 90.0, 0.0), _row("mad", "mad", "1.0", 40.0, 70.0, 1.0)]
    _, mad = grad2_table(rows)
    # segment (10, 20) -> (30, 60): d_err 11 -> 22
    assert mad["a_err@d_err+1"] == pytest.approx(22.0)
    # segment (0, 20) -> (1.0, 60): e_eps 0.1 -> 24
    assert mad["a_err@eps0.1"] == pytest.approx(24.0)
    assert mad["a_err@eps0.5"] == pytest.approx(40.0)


def test_grad2_table_missing_values_are_gaps():
    rows = [
        _row("none", "none", "0", 80.0, 90.0, None),  # e_eps of none is 0 even when not recorded
        _row("mad", "mad", "0.1", 70.0, None, None),  # no metric: neither segment through it brackets
        _row("mad", "mad", "0.5", 60.0, 85.0, 0.4),
        _row("mad", "mad", "1.0", 40.0, 80.0, 0.6),
    ]
    del rows[3]["l1_transfer"]  # a missing key counts as None
    _, mad = grad2_table(rows)
    # d_err: (10, 20) | gap | (15, 40) (20, 60): 11 and 12 fall in the gap, 15 is on (15, 40)-(20, 60)
    assert mad["a_err@d_err+1"] is None and mad["a_err@d_err+2"] is None
    assert mad["a_err@d_err+5"] == pytest.approx(40.0)
    # e_eps: (0, 20) | gap | (0.4, 40) | gap: nothing brackets
    assert all(mad[c] is None for c in ("a_err@eps0.1", "a_err@eps0.2", "a_err@eps0.5"))


def test_grad2_table_without_a_none_row_has_no_baseline():
    (mad,) = grad2_table([_row("mad", "mad", "0.5", 60.0, 85.0, 0.4)])
    assert all(mad[c] is None for c in GRAD2_COLUMNS)


def test_grad2_table_none_without_defender_accuracy():
    rows = [_row("none", "none", "0", 80.0, None, 0.0), _row("mad", "mad", "1.0", 40.0, 70.0, 1.0)]
    _, mad = grad2_table(rows)
    assert all(mad[f"a_err@d_err+{o:g}"] is None for o in GRAD2_DERR_OFFSETS)
    assert mad["a_err@eps0.5"] == pytest.approx(40.0)


def test_grad2_table_groups_victims_and_attacks():
    rows = _rows() + [_row(r["defense"], r["label"], r["value"], r["attacker_acc"], r["defender_acc"],
                           r["l1_transfer"], budget=r["budget"] * 2, victim="w") for r in _rows()]
    table = grad2_table(rows)
    assert [(e["victim"], e["label"], e["budget"]) for e in table] == [
        ("v", "none", 1000), ("v", "mad", 1000), ("v", "weak", 1000),
        ("w", "none", 2000), ("w", "mad", 2000), ("w", "weak", 2000)]
    for a, b in zip(table[:3], table[3:]):
        assert [a[c] for c in GRAD2_COLUMNS] == [b[c] for c in GRAD2_COLUMNS]


@pytest.mark.parametrize("rows, name", [
    ({"victim": "v"}, "rows"),
    ("rows", "rows"),
    ([1], r"rows\[0\]"),
    ([{"victim": "v"}], r"rows\[0\] lacks"),
    ([_row("none", "none", "0", float("nan"), 90.0, 0.0)], "attacker_acc"),
    ([_row("none", "none", "0", 80.0, float("inf"), 0.0)], "defender_acc"),
    ([_row("none", "none", "0", 80.0, 90.0, 0.0), _row("mad", "mad", "1", 80.0, 90.0, float("nan"))],
     "l1_transfer"),
])
def test_grad2_table_bad_input(rows, name):
    with pytest.raises(ValueError, match=name):
        grad2_table(rows)


# ---------------------------------------------------------------------------------------------
# grad2_markdown


def test_grad2_markdown():
    md = grad2_markdown(grad2_table(_rows()))
    lines = md.strip().split("\n")
    assert lines[1] == ""
    caption = lines[0]
    assert all(f"{x:g}" in caption for x in GRAD2_DERR_OFFSETS + GRAD2_EPS_TARGETS)
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["victim", "attack", "label", "budget"] + list(GRAD2_COLUMNS)
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]
    assert [r[2] for r in body] == ["none", "mad", "weak"]
    assert body[0][4:] == ["20.00"] * 6
    assert body[1][4] == f"{30.0 + 0.5 / 1.5 * 10.0:.2f}" == "33.33"
    assert body[2][4:] == ["–"] * 6
    assert math.isclose(float(body[1][9]), 40.0 + 0.2 / 0.3 * 20.0, abs_tol=0.005)


def test_grad2_markdown_bad_input():
    with pytest.raises(ValueError, match="table"):
        grad2_markdown("x")
    with pytest.raises(ValueError, match=r"table\[0\] lacks"):
        grad2_markdown([{"victim": "v"}])
