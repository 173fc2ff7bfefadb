"""The GRAD² table metric: attacker error at a fixed defender-error cost and at a fixed budget.

For each victim × attack × defense label, at the largest budget, over the defense's grid points:
``a_err`` = 100 − ``attacker_acc``, ``d_err`` = 100 − ``defender_acc`` and ``e_eps`` =
``l1_transfer`` (mean L1 distance between defended and undefended posteriors). The targets are
the ``none`` defense's ``d_err`` + :data:`GRAD2_DERR_OFFSETS` points, and :data:`GRAD2_EPS_TARGETS`
of L1 distance; a cell is :func:`interpolate_at` of the (metric, ``a_err``) sequence at its target,
with the ``none`` point prepended as grid point 0. A missing value is a gap in the sequence.
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

GRAD2_DERR_OFFSETS = (1.0, 2.0, 5.0)
"""Defender-error targets: percentage points above the ``none`` defense's defender error."""

GRAD2_EPS_TARGETS = (0.1, 0.2, 0.5)
"""Effective-budget targets: mean L1 distance to the undefended posteriors (the baseline is 0)."""

DERR_COLUMNS = tuple(f"a_err@d_err+{o:g}" for o in GRAD2_DERR_OFFSETS)
EPS_COLUMNS = tuple(f"a_err@eps{e:g}" for e in GRAD2_EPS_TARGETS)
GRAD2_COLUMNS = DERR_COLUMNS + EPS_COLUMNS
"""The metric columns of a :func:`grad2_table` entry, in table order."""

_ROW_KEYS = ("victim", "attack", "defense", "label", "budget", "attacker_acc")
_ENTRY_KEYS = ("victim", "attack", "label", "budget") + GRAD2_COLUMNS


def _check_dicts(items: Any, name: str, keys: Sequence[str]) -> None:
    """``items`` must be a sequence of dicts that hold ``keys``; ValueError naming the item."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Sequence):
        raise ValueError(f"{name} must be a list of dicts, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{name}[{i}] must be a dict, got {type(item).__name__}")
        missing = [k for k in keys if k not in item]
        if missing:
            raise ValueError(f"{name}[{i}] lacks the keys {missing}")


def _finite(x: Any, name: str) -> float:
    try:
        f = float(x)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(x, bool) or not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return f


def interpolate_at(keys: Sequence[float], values: Sequence[float], target: float) -> Optional[float]:
    """The linear interpolation at ``target`` on the first segment ``keys[j] <= target <= keys[j + 1]``
    of the (keys, values) polyline, or None; on a segment of two equal keys, ``values[j + 1]``."""
    ks = [_finite(k, f"keys[{i}]") for i, k in enumerate(keys)]
    vs = [_finite(v, f"values[{i}]") for i, v in enumerate(values)]
    if len(ks) != len(vs):
        raise ValueError(f"keys and values must have the same length, got {len(ks)} and {len(vs)}")
    t = _finite(target, "target")
    for j in range(len(ks) - 1):
        k0, k1 = ks[j], ks[j + 1]
        if k0 <= t <= k1:
            if k1 == k0:
                return vs[j + 1]
            return vs[j] + (t - k0) / (k1 - k0) * (vs[j + 1] - vs[j])
    return None


def _interpolate_with_gaps(points: List[Tuple[Optional[float], Optional[float]]],
                           target: float) -> Optional[float]:
    """:func:`interpolate_at` over (key, value) points where a None key or value is a gap."""
    for (k0, v0), (k1, v1) in zip(points, points[1:]):
        if None not in (k0, v0, k1, v1):
            y = interpolate_at([k0, k1], [v0, v1], target)
            if y is not None:
                return y
    return None


def _err(acc: Any, name: str) -> Optional[float]:
    return None if acc is None else 100.0 - _finite(acc, name)


def grad2_table(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The GRAD² table of result rows (:func:`~.grid_results.collect_results`, each label's rows in
    grid order): one entry ``{"victim", "attack", "label", "budget"}`` plus :data:`GRAD2_COLUMNS`
    per victim × attack × label, None where no segment brackets the target (all None without a
    ``none`` row)."""
    _check_dicts(rows, "rows", _ROW_KEYS)
    for i, r in enumerate(rows):
        _finite(r["budget"], f"rows[{i}]['budget']")
    out: List[Dict[str, Any]] = []
    for victim, attack in dict.fromkeys((r["victim"], r["attack"]) for r in rows):
        group = [(i, r) for i, r in enumerate(rows) if r["victim"] == victim and r["attack"] == attack]
        bmax = max(r["budget"] for _, r in group)
        group = [(i, r) for i, r in group if r["budget"] == bmax]
        # (d_err, e_eps, a_err) per grid point, per label, in grid order
        points: Dict[Any, List[Tuple[Optional[float], Optional[float], Optional[float]]]] = {}
        none_label = None
        for i, r in group:
            a_err = _err(r["attacker_acc"], f"rows[{i}]['attacker_acc']")
            d_err = _err(r.get("defender_acc"), f"rows[{i}]['defender_acc']")
            l1 = r.get("l1_transfer")
            e_eps = None if l1 is None else _finite(l1, f"rows[{i}]['l1_transfer']")
            if r["defense"] == "none":
                if none_label is None:
                    none_label = r["label"]
                if r["label"] == none_label:
                    e_eps = 0.0  # the undefended posteriors' distance to themselves
            points.setdefault(r["label"], []).append((d_err, e_eps, a_err))
        base = points[none_label][0] if none_label is not None else None
        for label, pts in points.items():
            entry: Dict[str, Any] = {"victim": victim, "attack": attack, "label": label, "budget": bmax}
            if base is None:
                entry.update(dict.fromkeys(GRAD2_COLUMNS))
            elif label == none_label:
                entry.update(dict.fromkeys(GRAD2_COLUMNS, base[2]))
            else:
                seq = [base] + pts
                derr = [(d, a) for d, _, a in seq]
                eps = [(e, a) for _, e, a in seq]
                for col, off in zip(DERR_COLUMNS, GRAD2_DERR_OFFSETS):
                    entry[col] = None if base[0] is None else _interpolate_with_gaps(derr, base[0] + off)
                for col, target in zip(EPS_COLUMNS, GRAD2_EPS_TARGETS):
                    entry[col] = _interpolate_with_gaps(eps, target)
            out.append(entry)
    return out


def grad2_markdown(table: Sequence[Dict[str, Any]]) -> str:
    """A markdown table of :func:`grad2_table`'s entries, '–' for None."""
    _check_dicts(table, "table", _ENTRY_KEYS)
    caption = ("Attacker error (%, linear interpolation over each defense's grid) where the defender "
               "error reaches the undefended one + " + "/".join(f"{o:g}" for o in GRAD2_DERR_OFFSETS)
               + " points (d_err+) and where the mean L1 distance to the undefended posteriors "
               "reaches " + "/".join(f"{e:g}" for e in GRAD2_EPS_TARGETS)
               + " (eps); '–': the grid does not reach it.")
    head = ["victim", "attack", "label", "budget"] + list(GRAD2_COLUMNS)
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, e in enumerate(table):
        cells = [str(e[k]) for k in ("victim", "attack", "label", "budget")]
        for col in GRAD2_COLUMNS:
            v = e[col]
            cells.append("–" if v is None else f"{_finite(v, f'table[{i}][{col!r}]'):.2f}")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
