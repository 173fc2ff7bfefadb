"""Plots of a grid run, rebuilt from its ``results.json``: ``attacker_vs_budget.png`` (attacker
accuracy vs budget, one panel per defense) and ``tradeoff.png`` (attacker vs defended victim
accuracy at the largest budget, with the best defense-aware thief as a hollow marker)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

__all__ = ["plot_results"]


def plot_results(out_dir) -> List[Path]:
    """Draws both figures into ``out_dir`` (per victim × attack); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    rows = [r for r in results["rows"] if not r.get("thief_of")]
    robust = results.get("robust", [])
    groups: Dict = {}
    for r in rows:
        groups.setdefault((r["victim"], r["attack"]), []).append(r)
    written = []
    for (victim, attack), rs in groups.items():
        suffix = "" if len(groups) == 1 else f"-{victim}-{attack}"
        labels = list(dict.fromkeys(r["label"] for r in rs))
        base = sorted([r for r in rs if r["defense"] == "none"], key=lambda r: r["budget"])
        # (a) attacker accuracy vs budget
        n = len(labels)
        cols = min(4, n)
        nrows = math.ceil(n / cols)
        budget_fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False,
                                        sharey=True)
        for ax, label in zip(axes.flat, labels):
            lr = [r for r in rs if r["label"] == label]
            values = list(dict.fromkeys(r["value"] for r in lr))
            cmap = plt.get_cmap("viridis")
            for i, v in enumerate(values):
                pts = sorted([r for r in lr if r["value"] == v], key=lambda r: r["budget"])
                name = "" if v is None else f"{pts[0]['param']}={v}"
                ax.plot([p["budget"] for p in pts], [p["attacker_acc"] for p in pts], "o-",
                        color=cmap(i / max(1, len(values) - 1)) if len(values) > 1 else "C0", label=name or label)
            if base and label != base[0]["label"]:
                ax.plot([p["budget"] for p in base], [p["attacker_acc"] for p in base], "k--", lw=1, label="undefended")
            ax.set_xscale("log")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("queries (budget)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
        for ax in axes[:, 0]:
            ax.set_ylabel("attacker test acc. (%)")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        budget_fig.suptitle(f"Attacker accuracy vs budget — victim {victim}, {attack} "
                            f"({rs[0]['queryset']} queries)", fontsize=11)
        # (b) trade-off at the largest budget
        bmax = max(r["budget"] for r in rs)
        top = [r for r in rs if r["budget"] == bmax and r["defender_acc"] is not None]
        fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12.8, 5.2))
        markers = "osD^vP*Xh"
        colors = plt.get_cmap("tab20")
        shown_robust = False
        for i, label in enumerate(labels):
            pts = sorted([r for r in top if r["label"] == label], key=lambda r: r["defender_acc"])
            if not pts:
                continue
            none = pts[0]["defense"] == "none"
            color = "k" if none else colors(i % 20)
            for a in (ax, zoom):
                a.plot([p["defender_acc"] for p in pts], [p["attacker_acc"] for p in pts],
                       "*" if none else f"{markers[i % len(markers)]}-", color=color,
                       label=label if a is ax else None, markersize=11 if none else 6)
            for e in robust:
                if e["victim"] == victim and e["attack"] == attack and e["label"] == label and e["thieves"]:
                    x = next((p["defender_acc"] for p in pts if p["value"] == e["value"]), None)
                    if x is None:
                        continue
                    for a in (ax, zoom):
                        a.plot([x, x], [e["naive"], e["robust"]], ":", color=color, lw=1)
                        a.plot([x], [e["robust"]], markers[i % len(markers)], mfc="none", color=color,
                               markersize=8, label=None if shown_robust or a is zoom
                               else "best defense-aware thief (hollow)")
                    shown_robust = True
            for p in pts:
                if p["value"] is not None:
                    zoom.annotate(f"{p['value']}", (p["defender_acc"], p["attacker_acc"]), fontsize=6,
                                  xytext=(3, 3), textcoords="offset points")
        # the right panel: the settings a defender would deploy (within 10 points of the victim)
        victim_acc = base[0]["victim_acc"] if base and base[0]["victim_acc"] is not None else None
        if victim_acc is not None:
            zoom.set_xlim(victim_acc - 10.0, victim_acc + 0.5)
        for a in (ax, zoom):
            a.set_xlabel("defended victim: test accuracy (%)  (utility →)")
            a.set_ylabel(f"attacker test accuracy (%) at {bmax} queries  (← protection)")
            a.grid(alpha=0.3)
        ax.set_title(f"Defense trade-off — victim {victim}, {attack}", fontsize=11)
        zoom.set_title("the same, defender loss ≤ 10 points", fontsize=11)
        ax.legend(fontsize=7, loc="best", ncol=2)
        for figure, name, dpi in ((budget_fig, "attacker_vs_budget", 120), (fig, "tradeoff", 130)):
            figure.tight_layout()
            path = out / f"{name}{suffix}.png"
            figure.savefig(path, dpi=dpi)
            plt.close(figure)
            written.append(path)
    return written
