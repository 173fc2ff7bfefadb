"""The results of a grid run, rebuilt from its files: ``results.csv`` / ``results.json`` (the rows,
the error amplification at equal defender loss, the best thief per setting), and the settings the
``at = "least_loss"`` thieves run at."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..fileio import atomic_write_json, atomic_write_text
from .grid_config import GridConfig, defense_settings, slug

__all__ = ["ROW_KEYS", "AMPLIFICATION_DROPS", "collect_results", "amplification", "robust", "least_loss_settings"]


def _read_log(path: Path) -> Optional[Dict[str, float]]:
    """Final and best test accuracy from a train.<b>.log.tsv (None while unfinished)."""
    if not path.exists():
        return None
    rows = list(csv.reader(path.read_text().splitlines(), delimiter="\t"))
    tests = [r for r in rows[1:] if len(r) >= 6 and r[2] == "test"]
    if not tests:
        return None
    last = tests[-1]
    return {"epoch": int(float(last[1])), "acc_final": float(last[4]), "acc_best": float(last[5])}


ROW_KEYS = ["victim", "attack", "queryset", "defense", "label", "param", "value", "defense_args", "budget",
            "attacker_acc", "attacker_acc_final", "defender_acc", "defender_acc_drop", "l1_mean", "l2_mean",
            "kl_mean", "victim_acc", "l1_transfer", "thief_of"]


def _transfer_l1(folder: Path) -> Optional[float]:
    """Mean ‖ỹ − y‖₁ over a cell's transfer queries (the last row of its distance log)."""
    path = folder / "distancetransfer.log.tsv"
    if not path.exists():
        return None
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        return None
    header, last = lines[0].split("\t"), lines[-1].split("\t")
    try:
        return float(last[header.index("l1_mean")])
    except (ValueError, IndexError):
        return None


def collect_results(out_dir, cfg: Optional[GridConfig] = None, *, write: bool = True) -> Dict[str, Any]:
    """Rebuilds the result rows (:data:`ROW_KEYS`) from the files of a grid run. ``attacker_acc`` is
    the best test accuracy (%) over the epochs at that budget, ``attacker_acc_final`` the last one's."""
    out = Path(out_dir)
    if cfg is None:
        cfg = GridConfig.from_json(json.loads((out / "grid.json").read_text()))
    rows: List[Dict[str, Any]] = []
    for v in cfg.victims:
        pdir = str(out / "victims" / f"{v.key}-proxy")
        none_eval = None
        evals = {}
        served = {d.label: defense_settings(out, v, d) for d in cfg.defenses}
        for d in cfg.defenses:
            for value, args in served[d.label][1]:
                marker = out / "eval" / v.key / slug(d.label) / slug(value) / "done.json"
                if marker.exists():
                    evals[(d.label, slug(value))] = json.loads(marker.read_text())["result"]
                    if d.name == "none" and none_eval is None:
                        none_eval = evals[(d.label, slug(value))]
        victim_acc = none_eval["accuracy"] if none_eval else None
        for a in cfg.attacks:
            for d in cfg.defenses:
                ddir, settings = served[d.label]
                for value, args in settings:
                    ev = evals.get((d.label, slug(value)))
                    folder = out / "attack" / v.key / slug(a.label) / slug(d.label) / slug(value)
                    l1_transfer = _transfer_l1(out / "attack" / v.key / slug(a.transferset_from or a.label)
                                               / slug(d.label) / slug(value))
                    for b in a.budgets:
                        log = _read_log(folder / f"train.{b}.log.tsv")
                        if log is None or log["epoch"] < a.epochs:
                            continue
                        rows.append({
                            "victim": v.key, "attack": a.label, "queryset": a.queryset, "defense": d.name,
                            "label": d.label, "param": d.param, "value": value,
                            "defense_args": args.replace(pdir, "{proxy}").replace(str(ddir), "{victim}"),
                            "budget": b,
                            "attacker_acc": log["acc_best"], "attacker_acc_final": log["acc_final"],
                            "defender_acc": ev["accuracy"] if ev else None,
                            "defender_acc_drop": (victim_acc - ev["accuracy"]) if (ev and victim_acc is not None)
                            else None,
                            "l1_mean": ev["l1_mean"] if ev else None, "l2_mean": ev["l2_mean"] if ev else None,
                            "kl_mean": ev["kl_mean"] if ev else None, "victim_acc": victim_acc,
                            "l1_transfer": l1_transfer, "thief_of": a.transferset_from or a.judged_by,
                        })
    summary = {"rows": rows, "amplification": amplification(rows), "robust": robust(rows)}
    if write:
        _write_results(out, summary)
    return summary


AMPLIFICATION_DROPS = (0.1, 1.0, 5.0, 10.0)


def _at_largest_budget(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str], List[Dict[str, Any]]]:
    """Per (victim, attack), in order of appearance, its rows at its largest budget."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["victim"], r["attack"]), []).append(r)
    for key, rs in groups.items():
        bmax = max(r["budget"] for r in rs)
        groups[key] = [r for r in rs if r["budget"] == bmax]
    return groups


def _best_within(rs: List[Dict[str, Any]], label: str, drop: float) -> Optional[Dict[str, Any]]:
    """The row of ``label`` with the lowest attacker accuracy among its settings whose defender
    accuracy dropped by at most ``drop`` points (the first on a tie), or None."""
    ok = [r for r in rs if r["label"] == label and r["defender_acc_drop"] is not None
          and r["defender_acc_drop"] <= drop]
    return min(ok, key=lambda r: r["attacker_acc"]) if ok else None


def amplification(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Attacker error amplification at equal defender accuracy loss: per victim × attack × defense
    and allowed drop (:data:`AMPLIFICATION_DROPS` points), the largest (100 − attacker acc) /
    (100 − undefended attacker acc) over the settings within the drop, at the largest budget."""
    out = []
    groups = _at_largest_budget(rows)
    for victim, attack in sorted(groups):
        rs = groups[(victim, attack)]
        bmax = rs[0]["budget"]
        base = [r for r in rs if r["defense"] == "none"]
        if not base:
            continue
        err0 = max(100.0 - base[0]["attacker_acc"], 1e-9)
        for label in dict.fromkeys(r["label"] for r in rs):
            entry = {"victim": victim, "attack": attack, "label": label, "budget": bmax}
            for drop in AMPLIFICATION_DROPS:
                best = _best_within(rs, label, drop)
                entry[f"drop<={drop:g}"] = None if best is None else round((100.0 - best["attacker_acc"]) / err0, 2)
                entry[f"value@drop<={drop:g}"] = None if best is None else best["value"]
            out.append(entry)
    return out


def robust(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The best attacker per victim × attack × defense setting at the largest budget: the attack
    (``naive``) or a thief run beside it (``thief_of``); ``thief`` names it (the naive one on a tie)."""
    out = []
    for (victim, attack), rs in _at_largest_budget([r for r in rows if not r.get("thief_of")]).items():
        bmax = rs[0]["budget"]
        for r in rs:
            others = [t for t in rows if t.get("thief_of") == attack and t["victim"] == victim
                      and t["budget"] == bmax and t["label"] == r["label"] and t["value"] == r["value"]]
            best = max([r] + others, key=lambda t: t["attacker_acc"])
            out.append({"victim": victim, "attack": attack, "label": r["label"], "value": r["value"],
                        "budget": bmax, "naive": r["attacker_acc"], "robust": best["attacker_acc"],
                        "thief": best["attack"], "thieves": [t["attack"] for t in others],
                        "defender_acc_drop": r["defender_acc_drop"]})
    return out


def _write_results(out: Path, summary: Dict[str, Any]) -> None:
    rows = summary["rows"]
    lines = [",".join(ROW_KEYS)]
    for r in rows:
        cells = []
        for k in ROW_KEYS:
            v = r[k]
            s = "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
            cells.append('"' + s.replace('"', '""') + '"' if ("," in s or '"' in s) else s)
        lines.append(",".join(cells))
    atomic_write_text(out / "results.csv", "\n".join(lines) + "\n")
    atomic_write_json(out / "results.json", summary)


def least_loss_settings(rows: List[Dict[str, Any]], attack: str, hurts_by: float = 1.0
                        ) -> Dict[Tuple[str, str], str]:
    """Per (victim, defense label), the slug of the setting of least defender loss that lowers the
    thief ``attack``'s accuracy by ``hurts_by`` points: the amplification table's setting at the
    smallest allowed drop where one does. ``none`` is always chosen; a defense that never hurts is
    left out."""
    out: Dict[Tuple[str, str], str] = {}
    for (victim, name), vr in _at_largest_budget(rows).items():
        if name != attack:
            continue
        base = [r for r in vr if r["defense"] == "none"]
        for r in base:
            out[(victim, r["label"])] = slug(r["value"])
        if not base:
            continue
        bar = base[0]["attacker_acc"] - hurts_by
        for label in dict.fromkeys(r["label"] for r in vr if r["defense"] != "none"):
            for drop in AMPLIFICATION_DROPS:
                # the best setting within the allowance hurts exactly when some setting there does
                best = _best_within(vr, label, drop)
                if best is not None and best["attacker_acc"] <= bar:
                    out[(victim, label)] = slug(best["value"])
                    break
    return out
