"""An experiment grid: victims × attacks × defenses × parameters × budgets, from one TOML file.

    ppoison grid CONFIG.toml --out runs/NAME [--jobs 2] [--device -1]

Steps per grid, each skipped when its ``done.json`` marker exists with the same settings
(a rerun resumes; the steps themselves resume mid-way, see each one):

1. per victim: ``train-victim`` into ``<out>/victims/<DS>-<arch>``, and the MAD proxy
   (the original recipe: 1 epoch, 10 images, lr 0) into ``.../<DS>-<arch>-proxy``;
2. per victim × defense setting: ``eval-bbox`` (defender accuracy, perturbation size) into
   ``<out>/eval/<victim>/<defense>/<value>``;
3. per victim × attack × defense setting ("cell"): the transfer set under the defense and
   the attacker trained through the budgets, into ``<out>/attack/<victim>/<attack>/<defense>/<value>``.

Cells run in ``jobs`` worker processes (one torch thread each). After every finished cell
``results.csv`` / ``results.json`` are rewritten from the files on disk, so the tables are
always rebuilt from the runs, never from memory.

Config (TOML; unknown keys are errors):

* ``[experiment]``: ``name``, ``seed`` (42), ``device`` (-1 CPU / GPU index), ``jobs``,
  ``data_root``.
* ``[[victim]]``: ``dataset``, ``arch``, and train-victim settings (``epochs``, ``lr``,
  ``momentum``, ``batch_size``, ``lr_step``, ``lr_gamma``, ``train_subset``, ``test_subset``).
* ``[[attack]]``: ``label``, ``policy`` (random/adaptive), ``queryset``, ``budget`` (queries),
  ``batch_size``, ``arch``, ``budgets`` (attacker training sizes), ``epochs``, ``lr``,
  ``momentum``, ``lr_step``, ``batch_size_train``, ``argmaxed``, ``test_subset``.
* ``[eval]``: ``batch_size``, ``test_subset``.
* ``[[defense]]``: ``label``, ``name`` (the original's names), ``args`` (a defense_args
  template: ``{value}`` is replaced by each entry of ``values``, ``{proxy}`` by the proxy
  folder), optional ``param`` and ``values``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..fileio import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["GridConfig", "load_config", "run_grid", "collect_results", "build_parser", "main"]

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore


@dataclass
class ExperimentSpec:
    name: str = "experiment"
    seed: int = 42
    device: Any = -1
    jobs: int = 1
    data_root: Optional[str] = None


@dataclass
class VictimSpec:
    dataset: str = "MNIST"
    arch: str = "lenet"
    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.5
    batch_size: int = 64
    lr_step: int = 30
    lr_gamma: float = 0.1
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.arch}"


@dataclass
class AttackSpec:
    label: str = "knockoff-random"
    policy: str = "random"
    queryset: str = "notMNIST"
    budget: int = 10000
    batch_size: int = 256
    arch: str = "lenet"
    budgets: List[int] = field(default_factory=lambda: [10000])
    epochs: int = 100
    lr: float = 0.01
    momentum: float = 0.5
    lr_step: int = 60
    batch_size_train: int = 64
    argmaxed: bool = False
    test_subset: Optional[int] = None


@dataclass
class EvalSpec:
    batch_size: int = 1000
    test_subset: Optional[int] = None


@dataclass
class DefenseSpec:
    label: str = "none"
    name: str = "none"
    args: str = ""
    param: Optional[str] = None
    values: List[Any] = field(default_factory=list)

    def settings(self, proxy_dir: str) -> List[Tuple[Optional[Any], str]]:
        values = self.values or [None]
        return [(v, self.args.replace("{value}", "" if v is None else str(v)).replace("{proxy}", proxy_dir))
                for v in values]


@dataclass
class GridConfig:
    experiment: ExperimentSpec
    victims: List[VictimSpec]
    attacks: List[AttackSpec]
    defenses: List[DefenseSpec]
    eval: EvalSpec


def _build(cls, raw: Dict[str, Any], where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; accepted: {sorted(names)}")
    return cls(**raw)


def load_config(path) -> GridConfig:
    """Reads and validates a grid TOML file (see the module docs)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: cannot read the grid config ({err})") from err
    unknown = sorted(set(raw) - {"experiment", "victim", "attack", "defense", "eval"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}")
    cfg = GridConfig(
        experiment=_build(ExperimentSpec, raw.get("experiment", {}), f"{path} [experiment]"),
        victims=[_build(VictimSpec, v, f"{path} [[victim]] #{i + 1}") for i, v in enumerate(raw.get("victim", []))],
        attacks=[_build(AttackSpec, a, f"{path} [[attack]] #{i + 1}") for i, a in enumerate(raw.get("attack", []))],
        defenses=[_build(DefenseSpec, d, f"{path} [[defense]] #{i + 1}")
                  for i, d in enumerate(raw.get("defense", []))],
        eval=_build(EvalSpec, raw.get("eval", {}), f"{path} [eval]"),
    )
    if not cfg.victims or not cfg.defenses:
        raise ValueError(f"{path}: needs at least one [[victim]] and one [[defense]]")
    labels = [d.label for d in cfg.defenses]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: defense labels must be unique, got {labels}")
    for a in cfg.attacks:
        if a.policy not in ("random", "adaptive"):
            raise ValueError(f"{path}: attack {a.label!r}: policy must be 'random' or 'adaptive'")
        if sorted(a.budgets) != list(a.budgets) or max(a.budgets) > a.budget:
            raise ValueError(f"{path}: attack {a.label!r}: budgets must be increasing and <= budget {a.budget}")
    return cfg


def _slug(v: Any) -> str:
    return "default" if v is None else re.sub(r"[^A-Za-z0-9_.-]+", "_", str(v))


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _done(folder: Path, settings: Dict[str, Any]) -> bool:
    marker = folder / "done.json"
    if not marker.exists():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == _fingerprint(settings)
    except ValueError:
        return False


def _mark_done(folder: Path, settings: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> None:
    atomic_write_json(folder / "done.json", {"fingerprint": _fingerprint(settings), "settings": settings,
                                             "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **(extra or {})})


# What each step writes into its folder: deleted when the folder holds the outputs of other
# settings, because every step resumes from what it finds (a victim or attacker checkpoint of
# another recipe, a transfer set of another defense) and would otherwise mix the two.
VICTIM_FILES = ("checkpoint.pth.tar", "last.pth.tar", "model_best.pth.tar", "train.log.tsv", "params.json",
                "done.json")
EVAL_FILES = ("bboxeval.*.log.tsv", "distancetest.log.tsv", "queriestest.*", "params_evalbbox.json", "done.json")
ATTACKER_FILES = ("checkpoint.*.pth.tar", "last.*.pth.tar", "train.*.log.tsv", "params_train.json", "done.json")
TRANSFER_FILES = ("transferset.*", "queriestransfer.*", "distancetransfer.log.tsv", "run_times*",
                  "params_transfer.json") + ATTACKER_FILES


def _start(folder: Path, settings: Dict[str, Any], patterns: Sequence[str], marker: Optional[Path] = None) -> None:
    """Claims ``folder`` for ``settings`` before a step runs there. When ``marker`` (default
    ``folder/started.json``) says an earlier run used other settings, the files of ``patterns``
    are deleted first: a changed config reruns the step instead of resuming foreign files."""
    marker = marker or folder / "started.json"
    fingerprint = _fingerprint(settings)
    previous = None
    if marker.exists():
        try:
            previous = json.loads(marker.read_text()).get("fingerprint")
        except (ValueError, AttributeError):
            previous = "unreadable"
    elif folder.exists() and any(f.is_file() for p in patterns for f in folder.glob(p)):
        previous = "unknown"  # outputs from before markers existed: provenance unknown
    if previous is not None and previous != fingerprint:
        logger.warning("%s holds the outputs of other settings; starting over there", folder)
        for pattern in patterns:
            for f in folder.glob(pattern):
                if f.is_file():
                    f.unlink()
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"fingerprint": fingerprint, "settings": settings})


# ---------------------------------------------------------------------------------------------
# Steps


def _victim_step(out: Path, exp: ExperimentSpec, v: VictimSpec, progress: bool) -> Tuple[Path, Path]:
    from .victim import make_proxy, train_victim

    vdir = out / "victims" / v.key
    pdir = out / "victims" / f"{v.key}-proxy"
    settings = {"victim": asdict(v), "seed": exp.seed}
    if not _done(vdir, settings):
        _start(vdir, settings, VICTIM_FILES)
        train_victim(v.dataset, v.arch, vdir, device=exp.device, batch_size=v.batch_size, epochs=v.epochs, lr=v.lr,
                     momentum=v.momentum, lr_step=v.lr_step, lr_gamma=v.lr_gamma, train_subset=v.train_subset,
                     test_subset=v.test_subset, data_root=exp.data_root, seed=exp.seed, progress=progress,
                     resume="auto")
        _mark_done(vdir, settings)
    psettings = {"proxy_of": asdict(v), "seed": exp.seed + 1}
    if not _done(pdir, psettings):
        _start(pdir, psettings, VICTIM_FILES)
        make_proxy(v.dataset, v.arch, pdir, device=exp.device, data_root=exp.data_root, seed=exp.seed + 1,
                   test_subset=v.test_subset or 1000, progress=progress)
        _mark_done(pdir, psettings)
    return vdir, pdir


def _eval_step(job: Dict[str, Any]) -> Dict[str, Any]:
    from .evaluate import eval_bbox

    folder = Path(job["folder"])
    if _done(folder, job["settings"]):
        return json.loads((folder / "done.json").read_text())["result"]
    _start(folder, job["settings"], EVAL_FILES)
    res = eval_bbox(job["victim_dir"], job["defense"], job["args"], folder, batch_size=job["batch_size"],
                    device=job["device"], data_root=job["data_root"], seed=job["seed"],
                    test_subset=job["test_subset"], progress=False)
    res = {k: v for k, v in res.items() if k != "log"}
    _mark_done(folder, job["settings"], {"result": res})
    return res


def _attack_step(job: Dict[str, Any]) -> Dict[str, Any]:
    from .attacker import train_attacker
    from .transfer import transfer

    folder = Path(job["folder"])
    a = job["attack"]
    tsettings = {k: job["settings"][k] for k in ("victim", "victim_recipe", "defense", "args", "seed")}
    tsettings["attack"] = {k: a[k] for k in ("policy", "queryset", "budget", "batch_size")}
    if not _done(folder / "transfer", tsettings):
        _start(folder, tsettings, TRANSFER_FILES, marker=folder / "transfer" / "started.json")
        transfer(a["policy"], job["victim_dir"], job["defense"], job["args"], out_dir=folder, queryset=a["queryset"],
                 budget=a["budget"], batch_size=a["batch_size"], device_id=job["device"], nworkers=0,
                 data_root=job["data_root"], seed=job["seed"], progress=False)
        _mark_done(folder / "transfer", tsettings)
    if not _done(folder, job["settings"]):
        _start(folder, job["settings"], ATTACKER_FILES)
        train_attacker(folder, a["arch"], job["testset"], a["budgets"], device=job["device"],
                       batch_size=a["batch_size_train"], epochs=a["epochs"], lr=a["lr"], momentum=a["momentum"],
                       lr_step=a["lr_step"], argmaxed=a["argmaxed"], data_root=job["data_root"], seed=job["seed"],
                       test_subset=a["test_subset"], progress=False)
        _mark_done(folder, job["settings"])
    return {"folder": str(folder)}


def _orphan_watchdog(parent: int, interval: float = 0.5) -> None:
    # A SIGKILLed grid cannot stop its workers; without this they would finish their cell and
    # race the rerun writing the same folder. Exit as soon as the parent is gone.
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def _worker_init(parent: int) -> None:
    import threading

    import torch

    threading.Thread(target=_orphan_watchdog, args=(parent,), daemon=True, name="orphan-watchdog").start()
    torch.set_num_threads(1)
    logging.getLogger().setLevel(logging.WARNING)


def _run_jobs(fn, jobs: List[Dict[str, Any]], workers: int, desc: str, progress: bool, after=None) -> List[Any]:
    from tqdm import tqdm

    results: List[Any] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="cell")
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = fn(job)
            bar.update(1)
            if after:
                after()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
                if after:
                    after()
    bar.close()
    return results


def run_grid(config, out_dir, *, jobs: Optional[int] = None, device: Any = None, progress: bool = True,
             only_defenses: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs (or resumes) every step of the grid; returns :func:`collect_results`."""
    cfg = config if isinstance(config, GridConfig) else load_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exp = cfg.experiment
    if device is not None:
        exp.device = device
    workers = exp.jobs if jobs is None else jobs
    defenses = [d for d in cfg.defenses if not only_defenses or d.label in only_defenses]
    atomic_write_json(out / "grid.json", {"experiment": asdict(exp), "victims": [asdict(v) for v in cfg.victims],
                                          "attacks": [asdict(a) for a in cfg.attacks],
                                          "defenses": [asdict(d) for d in defenses], "eval": asdict(cfg.eval)})
    t0 = time.time()
    eval_jobs, attack_jobs = [], []
    for v in cfg.victims:
        vdir, pdir = _victim_step(out, exp, v, progress)
        for d in defenses:
            for value, args in d.settings(str(pdir)):
                base = {"victim": v.key, "victim_recipe": _fingerprint(asdict(v)), "defense": d.name, "args": args,
                        "seed": exp.seed}
                eval_jobs.append({
                    "folder": str(out / "eval" / v.key / _slug(d.label) / _slug(value)),
                    "settings": {**base, "eval": asdict(cfg.eval)}, "victim_dir": str(vdir), "defense": d.name,
                    "args": args, "batch_size": cfg.eval.batch_size, "test_subset": cfg.eval.test_subset,
                    "device": exp.device, "data_root": exp.data_root, "seed": exp.seed,
                })
                for a in cfg.attacks:
                    attack_jobs.append({
                        "folder": str(out / "attack" / v.key / _slug(a.label) / _slug(d.label) / _slug(value)),
                        "settings": {**base, "attack": asdict(a)}, "victim_dir": str(vdir), "defense": d.name,
                        "args": args, "attack": asdict(a), "testset": v.dataset, "device": exp.device,
                        "data_root": exp.data_root, "seed": exp.seed,
                    })
    refresh = lambda: collect_results(out, cfg, write=True)  # noqa: E731
    _run_jobs(_eval_step, eval_jobs, workers, "eval-bbox", progress, after=None)
    _run_jobs(_attack_step, attack_jobs, workers, "attacks", progress, after=refresh)
    results = collect_results(out, cfg, write=True)
    results["wall_seconds"] = round(time.time() - t0, 1)
    return results


# ---------------------------------------------------------------------------------------------
# Results


def _read_log(path: Path) -> Optional[Dict[str, float]]:
    """Final and best test accuracy from a train.<b>.log.tsv (None while unfinished)."""
    if not path.exists():
        return None
    rows = [r for r in csv.reader(path.read_text().splitlines(), delimiter="\t")]
    tests = [r for r in rows[1:] if len(r) >= 6 and r[2] == "test"]
    if not tests:
        return None
    last = tests[-1]
    return {"epoch": int(float(last[1])), "acc_final": float(last[4]), "acc_best": float(last[5])}


ROW_KEYS = ["victim", "attack", "queryset", "defense", "label", "param", "value", "defense_args", "budget",
            "attacker_acc", "attacker_acc_final", "defender_acc", "defender_acc_drop", "l1_mean", "l2_mean",
            "kl_mean", "victim_acc"]


def collect_results(out_dir, cfg: Optional[GridConfig] = None, *, write: bool = True) -> Dict[str, Any]:
    """Rebuilds the result table from the files of a grid run (see :data:`ROW_KEYS`).

    ``attacker_acc`` is the attacker's best test accuracy over its epochs at that budget (what
    the original's checkpoint keeps), ``attacker_acc_final`` the last epoch's; accuracies in %.
    """
    out = Path(out_dir)
    if cfg is None:
        g = json.loads((out / "grid.json").read_text())
        cfg = GridConfig(ExperimentSpec(**g["experiment"]), [VictimSpec(**v) for v in g["victims"]],
                         [AttackSpec(**a) for a in g["attacks"]], [DefenseSpec(**d) for d in g["defenses"]],
                         EvalSpec(**g["eval"]))
    rows: List[Dict[str, Any]] = []
    for v in cfg.victims:
        pdir = str(out / "victims" / f"{v.key}-proxy")
        none_eval = None
        evals = {}
        for d in cfg.defenses:
            for value, args in d.settings(pdir):
                marker = out / "eval" / v.key / _slug(d.label) / _slug(value) / "done.json"
                if marker.exists():
                    evals[(d.label, _slug(value))] = json.loads(marker.read_text())["result"]
                    if d.name == "none" and none_eval is None:
                        none_eval = evals[(d.label, _slug(value))]
        victim_acc = none_eval["accuracy"] if none_eval else None
        for a in cfg.attacks:
            for d in cfg.defenses:
                for value, args in d.settings(pdir):
                    ev = evals.get((d.label, _slug(value)))
                    folder = out / "attack" / v.key / _slug(a.label) / _slug(d.label) / _slug(value)
                    for b in a.budgets:
                        log = _read_log(folder / f"train.{b}.log.tsv")
                        if log is None or log["epoch"] < a.epochs:
                            continue
                        rows.append({
                            "victim": v.key, "attack": a.label, "queryset": a.queryset, "defense": d.name,
                            "label": d.label, "param": d.param, "value": value,
                            "defense_args": args.replace(pdir, "{proxy}"), "budget": b,
                            "attacker_acc": log["acc_best"], "attacker_acc_final": log["acc_final"],
                            "defender_acc": ev["accuracy"] if ev else None,
                            "defender_acc_drop": (victim_acc - ev["accuracy"]) if (ev and victim_acc is not None)
                            else None,
                            "l1_mean": ev["l1_mean"] if ev else None, "l2_mean": ev["l2_mean"] if ev else None,
                            "kl_mean": ev["kl_mean"] if ev else None, "victim_acc": victim_acc,
                        })
    summary = {"rows": rows, "amplification": amplification(rows)}
    if write:
        _write_results(out, summary)
    return summary


AMPLIFICATION_DROPS = (0.1, 1.0, 5.0, 10.0)


def amplification(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Attacker error amplification at equal defender accuracy loss.

    For each victim × attack × defense and each allowed drop of defender accuracy
    (``AMPLIFICATION_DROPS`` percentage points), the largest
    (100 − attacker acc) / (100 − attacker acc undefended) over the defense's settings whose
    defender accuracy dropped by at most that much; at the largest budget.
    """
    out = []
    keyset = sorted({(r["victim"], r["attack"]) for r in rows})
    for victim, attack in keyset:
        rs = [r for r in rows if r["victim"] == victim and r["attack"] == attack]
        if not rs:
            continue
        bmax = max(r["budget"] for r in rs)
        rs = [r for r in rs if r["budget"] == bmax]
        base = [r for r in rs if r["defense"] == "none"]
        if not base:
            continue
        err0 = max(100.0 - base[0]["attacker_acc"], 1e-9)
        for label in dict.fromkeys(r["label"] for r in rs):
            entry = {"victim": victim, "attack": attack, "label": label, "budget": bmax}
            for drop in AMPLIFICATION_DROPS:
                ok = [r for r in rs if r["label"] == label and r["defender_acc_drop"] is not None
                      and r["defender_acc_drop"] <= drop]
                best = max(ok, key=lambda r: 100.0 - r["attacker_acc"]) if ok else None
                entry[f"drop<={drop:g}"] = None if best is None else round((100.0 - best["attacker_acc"]) / err0, 2)
                entry[f"value@drop<={drop:g}"] = None if best is None else best["value"]
            out.append(entry)
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


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "ppoison grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="grid TOML file")
    p.add_argument("--out", required=True, help="output folder (reruns resume here)")
    p.add_argument("--jobs", type=int, default=None, help="parallel worker processes (default: the config's)")
    p.add_argument("-d", "--device", default=None, help="GPU index, -1 for the CPU (default: the config's)")
    p.add_argument("--only", default=None, help="comma-separated defense labels to run")
    p.add_argument("--plots", action="store_true", help="also draw the plots (ppoison_ext.pipeline.plots)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = None if args.device is None else (int(args.device) if args.device.lstrip("-").isdigit() else args.device)
    res = run_grid(args.config, args.out, jobs=args.jobs, device=device, progress=not args.no_progress,
                   only_defenses=args.only.split(",") if args.only else None)
    if args.plots:
        from .plots import plot_results

        plot_results(args.out)
    sys.stderr.write(f"grid: {len(res['rows'])} result rows in {args.out}/results.csv "
                     f"({res.get('wall_seconds', 0):.0f} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
