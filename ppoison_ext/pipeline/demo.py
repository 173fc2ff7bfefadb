"""The main job: the defense/attack trade-off on real MNIST, from one command.

    ppoison demo [--out runs/demo] [--jobs 2] [--fast] [--attackers default|all]

Runs the grid of ``configs/mnist_demo.toml`` (``--fast``: ``mnist_fast.toml``) on the embedded data
and writes ``results.csv``, ``results.json``, the plots and ``summary.md`` into ``--out``; reruns
reuse finished steps. ``--attackers all`` adds the thieves of ``configs/mnist_demo_thieves.toml``.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..fileio import atomic_write_json, atomic_write_text
from .grid import AMPLIFICATION_DROPS, load_config, run_grid
from .metrics import grad2_markdown, grad2_table
from .plots import plot_results
from .settings import device_arg

__all__ = ["run_demo", "config_path", "summary_markdown", "robust_markdown", "build_parser", "main"]


def config_path(fast: bool = False) -> Path:
    """The built-in demo config (``fast``: the small CI one)."""
    return Path(__file__).resolve().parents[1] / "configs" / ("mnist_fast.toml" if fast else "mnist_demo.toml")


#: ``--attackers all``: the thieves appended to the demo's (``configs/mnist_demo_thieves.toml``)
THIEVES_PATH = Path(__file__).resolve().parents[1] / "configs" / "mnist_demo_thieves.toml"


def _with_all_thieves(config: Path, out: Path) -> Path:
    """``config`` with the extra thieves' ``[[attack]]`` tables appended, as ``out/config.toml``."""
    out.mkdir(parents=True, exist_ok=True)
    merged = out / "config.toml"
    atomic_write_text(merged, Path(config).read_text() + "\n" + THIEVES_PATH.read_text())
    return merged


def _fmt(v: Any, nd: int = 2) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def summary_markdown(results: Dict[str, Any], meta: Dict[str, Any]) -> str:
    """The ``summary.md`` of a demo run: the results per setting, amplification, ranking, GRAD²."""
    all_rows = results["rows"]
    rows = [r for r in all_rows if not r.get("thief_of")]
    if not rows:
        return "No finished results yet.\n"
    bmax = max(r["budget"] for r in rows)
    budgets = sorted({r["budget"] for r in rows})
    robust = {(e["label"], e["value"]): e for e in results.get("robust", []) if e["attack"] == rows[0]["attack"]}
    thieves = list(dict.fromkeys(r["attack"] for r in all_rows if r.get("thief_of")))
    lines = [f"Victim {rows[0]['victim']} (undefended test accuracy {_fmt(rows[0]['victim_acc'])}%), "
             f"attack {rows[0]['attack']} with {rows[0]['queryset']} queries"
             + (f", defense-aware thieves {', '.join(thieves)}" if thieves else "")
             + f"; machine: {meta.get('machine')}; wall time {meta.get('wall_minutes')} min.", "",
             "| defense | setting | defender acc. (%) | Δ defender | mean ℓ1 ‖y−y′‖ | "
             + " | ".join(f"attacker @{b}" for b in budgets)
             + (f" | robust @{bmax} (best thief) |" if thieves else " |"),
             "|---|---|---|---|---|" + "---|" * len(budgets) + ("---|" if thieves else "")]
    seen = []
    for r in rows:
        key = (r["label"], r["value"])
        if key in seen:
            continue
        seen.append(key)
        accs = {x["budget"]: x["attacker_acc"] for x in rows if (x["label"], x["value"]) == key}
        setting = "" if r["value"] is None else f"{r['param']}={r['value']}"
        line = (f"| {r['label']} | {setting} | {_fmt(r['defender_acc'])} | {_fmt(r['defender_acc_drop'])} | "
                f"{_fmt(r['l1_mean'], 3)} | " + " | ".join(_fmt(accs.get(b)) for b in budgets) + " |")
        if thieves:
            e = robust.get(key)
            line += (f" {_fmt(e['robust'])} ({e['thief']}) |" if e and e["thieves"] else " |")
        lines.append(line)
    lines += ["", f"Attacker error amplification at the largest budget ({bmax} queries): "
              "(100 − attacker acc.) / (100 − undefended attacker acc.), best setting whose defender "
              "accuracy drops by at most the given points:", "",
              "| defense | " + " | ".join(f"drop ≤ {d:g} pt" for d in AMPLIFICATION_DROPS) + " |",
              "|---|" + "---|" * len(AMPLIFICATION_DROPS)]
    for a in results["amplification"]:
        if a["attack"] != rows[0]["attack"]:
            continue
        cells = []
        for d in AMPLIFICATION_DROPS:
            f, v = a[f"drop<={d:g}"], a[f"value@drop<={d:g}"]
            cells.append("–" if f is None else (f"{f:.2f}×" + ("" if v is None else f" ({v})")))
        lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    if thieves:
        lines += ["", robust_markdown(list(robust.values()))]
    lines += ["", grad2_markdown(grad2_table(rows))]
    return "\n".join(lines) + "\n"


def robust_markdown(entries: List[Dict[str, Any]]) -> str:
    """The defenses ranked by the strongest thief's accuracy (the most robust on top)."""
    ran = [e for e in entries if e["thieves"]]
    if not ran:
        return ""
    none = next((e for e in ran if e["label"] == "none"), None)
    err0 = None if none is None else max(100.0 - none["robust"], 1e-9)
    lines = [f"Against the strongest thief (at {ran[0]['budget']} queries; each defense at its setting of least "
             "defender loss that lowers the naive thief by ≥ 1 point; robust amplification = "
             "(100 − robust acc.) / (100 − robust acc. undefended)):", "",
             "| rank | defense | setting | Δ defender | naive acc. | robust acc. | strongest thief | robust ampl. |",
             "|---|---|---|---|---|---|---|---|"]
    for i, e in enumerate(sorted(ran, key=lambda e: (e["robust"], e["label"])), 1):
        ampl = "–" if err0 is None else f"{(100.0 - e['robust']) / err0:.2f}×"
        lines.append(f"| {i} | {e['label']} | {_fmt(e['value'])} | {_fmt(e['defender_acc_drop'])} | "
                     f"{_fmt(e['naive'])} | {_fmt(e['robust'])} | {e['thief']} | {ampl} |")
    return "\n".join(lines)


def run_demo(out_dir="runs/demo", *, fast: bool = False, config=None, jobs: Optional[int] = None,
             device: Any = None, progress: bool = True, attackers: str = "default") -> Dict[str, Any]:
    """Runs (or resumes) the demo grid, draws the plots, writes summary.md; returns the results."""
    if attackers not in ("default", "all"):
        raise ValueError(f"attackers must be 'default' or 'all', got {attackers!r}")
    t0 = time.time()
    out = Path(out_dir)
    config = config or config_path(fast)
    if attackers == "all":
        config = _with_all_thieves(config, out)
    cfg = load_config(config)
    results = run_grid(cfg, out, jobs=jobs, device=device, progress=progress)
    plots = plot_results(out)
    import torch

    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                       f"{platform.processor() or platform.system()}",
            "wall_minutes": round((time.time() - t0) / 60, 1), "torch": torch.__version__,
            "config": str(config), "attackers": attackers, "plots": [str(p) for p in plots]}
    atomic_write_json(out / "run_meta.json", meta)
    atomic_write_text(out / "summary.md", summary_markdown(results, meta))
    results["meta"] = meta
    return results


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "ppoison demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (reruns reuse finished steps)")
    p.add_argument("--fast", action="store_true", help="the small CI configuration")
    p.add_argument("--config", default=None, help="another grid TOML instead of the built-in one")
    p.add_argument("--attackers", choices=("default", "all"), default="default",
                   help="all: also the Smoothing, S4L, Partial Bayes, D-DAE and oracle-prior D-DAE+ thieves")
    p.add_argument("--jobs", type=int, default=None, help="parallel worker processes (default 2)")
    p.add_argument("-d", "--device", type=device_arg, default=None, help="GPU index or -1 for the CPU (default: CPU)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    res = run_demo(args.out, fast=args.fast, config=args.config, jobs=args.jobs, device=args.device,
                   progress=not args.no_progress, attackers=args.attackers)
    sys.stdout.write((Path(args.out) / "summary.md").read_text())
    sys.stdout.write(f"\nresults: {args.out}/results.csv, plots: {', '.join(res['meta']['plots'])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
