"""An experiment grid: victims × attacks × defenses × parameters × budgets, from one TOML file.

    ppoison grid CONFIG.toml --out runs/NAME [--jobs 2] [--device -1] [--executor ray [--address ADDR]]

Trains each victim and its MAD proxy, evaluates the defended victim at every defense setting, and
per victim × attack × defense setting (a "cell") builds the transfer set and trains the attacker
through the budgets. Each step is skipped when its ``done.json`` holds the same settings, so a
rerun resumes. ``results.csv`` / ``results.json`` are rebuilt from the files after every cell.

TOML sections (unknown keys are errors): ``[experiment]`` (``name``, ``seed``, ``device``, ``jobs``,
``data_root``); ``[[victim]]`` (``dataset``, ``arch`` and train-victim settings); ``[[attack]]``
(``label``, ``policy``, ``queryset``, ``budget``, ``arch``, ``budgets``, ``batch_size_train`` and
other transfer / train-attacker settings; thieves: ``transferset_from``, ``at = "least_loss"``,
``judged_by``, ``hurts_by``); ``[eval]`` (eval-bbox settings); ``[[defense]]`` (``label``,
``name``, ``args`` with ``{value}`` / ``{proxy}`` / ``{victim}``, ``param``, ``values``, and
``victim_options``: train-victim settings of a model trained for this defense alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..fileio import atomic_write_json
from .executors import is_gpu, open_executor, run_jobs
from .grid_config import (STEP_TABLES, TABLE_KEYS, ExperimentSpec, GridConfig, Table,
                          defense_settings, defense_victim, load_config, slug)
from .grid_results import (AMPLIFICATION_DROPS, ROW_KEYS, amplification, collect_results, least_loss_settings,
                           robust)
from .settings import device_arg

logger = logging.getLogger(__name__)

__all__ = ["GridConfig", "STEP_TABLES", "TABLE_KEYS", "load_config", "run_grid", "collect_results", "build_parser",
           "main", "AMPLIFICATION_DROPS", "ROW_KEYS", "amplification", "robust", "least_loss_settings",
           "defense_victim"]


def _fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _recorded(marker: Path) -> Optional[str]:
    """The fingerprint a marker file records (None without one, "unreadable" for a broken one)."""
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text()).get("fingerprint")
    except (ValueError, AttributeError):
        return "unreadable"


def _done(folder: Path, settings: Dict[str, Any]) -> bool:
    return _recorded(folder / "done.json") == _fingerprint(settings)


def _mark_done(folder: Path, settings: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> None:
    atomic_write_json(folder / "done.json", {"fingerprint": _fingerprint(settings), "settings": settings,
                                             "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **(extra or {})})


# What each step writes into its folder: deleted when the folder holds the outputs of other
# settings, which the step would otherwise resume from.
VICTIM_FILES = ("checkpoint.pth.tar", "last.pth.tar", "model_best.pth.tar", "train.log.tsv", "params.json",
                "done.json")
EVAL_FILES = ("bboxeval.*.log.tsv", "distancetest.log.tsv", "queriestest.*", "params_evalbbox.json", "done.json")
ATTACKER_FILES = ("checkpoint.*.pth.tar", "last.*.pth.tar", "train.*.log.tsv", "params_train.json", "done.json")
TRANSFER_FILES = ("transferset.*", "queriestransfer.*", "distancetransfer.log.tsv", "run_times*",
                  "params_transfer.json", "params_aware.json", "recover_table.pt") + ATTACKER_FILES
# the cell settings a transfer set depends on (besides the attack table's transfer settings)
_TRANSFER_KEYS = ("victim", "victim_recipe", "defense", "args", "seed")


def _start(folder: Path, settings: Dict[str, Any], patterns: Sequence[str], marker: Optional[Path] = None) -> None:
    """Claims ``folder`` for ``settings``, first deleting the files of ``patterns`` when ``marker``
    (default ``folder/started.json``) says an earlier run used other settings."""
    marker = marker or folder / "started.json"
    fingerprint = _fingerprint(settings)
    previous = _recorded(marker)
    if previous is None and folder.exists() and any(f.is_file() for p in patterns for f in folder.glob(p)):
        previous = "unknown"  # outputs from before markers existed: provenance unknown
    if previous is not None and previous != fingerprint:
        logger.warning("%s holds the outputs of other settings; starting over there", folder)
        for pattern in patterns:
            for f in folder.glob(pattern):
                if f.is_file():
                    f.unlink()
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"fingerprint": fingerprint, "settings": settings})


def _train_victim(folder: Path, exp: ExperimentSpec, v: Table, progress: bool) -> None:
    settings = {"victim": v.recipe(), "seed": exp.seed}
    if not _done(folder, settings):
        _start(folder, settings, VICTIM_FILES)
        v.step_settings(0, out_path=str(folder), device_id=exp.device, data_root=exp.data_root, seed=exp.seed,
                        no_progress=not progress, resume="auto", num_workers=0).run()
        _mark_done(folder, settings)


def _victim_step(out: Path, exp: ExperimentSpec, v: Table, progress: bool) -> None:
    from .victim import make_proxy

    vdir = out / "victims" / v.key
    pdir = out / "victims" / f"{v.key}-proxy"
    _train_victim(vdir, exp, v, progress)
    psettings = {"proxy_of": v.recipe(), "seed": exp.seed + 1}
    if not _done(pdir, psettings):
        _start(pdir, psettings, VICTIM_FILES)
        make_proxy(v.dataset, v.arch, pdir, device=exp.device, data_root=exp.data_root, seed=exp.seed + 1,
                   test_subset=v.test_subset or 1000, progress=progress)
        _mark_done(pdir, psettings)


def _eval_step(job: Dict[str, Any]) -> Dict[str, Any]:
    folder = Path(job["folder"])
    if _done(folder, job["settings"]):
        return json.loads((folder / "done.json").read_text())["result"]
    _start(folder, job["settings"], EVAL_FILES)
    res = {k: v for k, v in job["eval"].run().items() if k != "log"}
    _mark_done(folder, job["settings"], {"result": res})
    return res


def _transfer_step(job: Dict[str, Any]) -> Dict[str, Any]:
    """A cell's transfer set: queried, or made from another cell's by the defense-aware step."""
    folder = Path(job["folder"])
    tsettings = job["transfer_settings"]
    if not _done(folder / "transfer", tsettings):
        _start(folder, tsettings, TRANSFER_FILES, marker=folder / "transfer" / "started.json")
        if "aware" in job:
            from .aware import postprocess_transfer

            postprocess_transfer(job["aware"], Path(job["source"]))
        else:
            job["transfer"].run()
        _mark_done(folder / "transfer", tsettings)
    return {"folder": str(folder), "content": _content_key(folder, job["train_key"])}


def _train_step(job: Dict[str, Any]) -> Dict[str, Any]:
    """Trains the cell's attacker, recording its :func:`_content_key` in ``done.json``."""
    folder = Path(job["folder"])
    if not _done(folder, job["settings"]):
        _start(folder, job["settings"], ATTACKER_FILES)
        job["attacker"].run()
        _mark_done(folder, job["settings"], {"content": job["content"]})
    return {"folder": str(folder)}


def _content_key(folder: Path, train_key: Dict[str, Any]) -> Optional[str]:
    """A hash of what the attacker trained in ``folder`` depends on: its transfer set's bytes and
    ``train_key``; equal keys train the same model."""
    from ..attacks.transferset import INDEX_FILE, PATHS_FILE, X_FILE, Y_FILE

    if not (folder / "transferset.json").is_file():
        return None  # nothing to compare: never taken for another cell's
    h = hashlib.sha256()
    meta = json.loads((folder / "transferset.json").read_text())
    h.update(json.dumps({k: meta.get(k) for k in ("num_classes", "kind", "image_shape", "queryset")},
                        sort_keys=True).encode())
    for name in (X_FILE, PATHS_FILE, Y_FILE, INDEX_FILE):  # the data, not its provenance
        if (folder / name).is_file():
            with open(folder / name, "rb") as f:
                h.update(name.encode())
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    h.update(json.dumps(train_key, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def _reuse_training(folder: Path, source: Path, settings: Dict[str, Any], content: str) -> None:
    """Gives ``folder`` the attacker ``source`` trained on the same ``content`` (copies its files)."""
    _start(folder, settings, ATTACKER_FILES)
    for pattern in ATTACKER_FILES:
        for f in source.glob(pattern):
            if f.is_file() and f.name != "done.json":
                shutil.copy2(f, folder / f.name)
    _mark_done(folder, settings, {"content": content, "trained_in": str(source)})


def _grid_job(job: Dict[str, Any]) -> Dict[str, Any]:
    if job["kind"] == "victim":
        _train_victim(Path(job["folder"]), job["experiment"], job["spec"], progress=False)
        return {"folder": job["folder"]}
    if job["kind"] == "eval":
        return _eval_step(job)
    return _train_step({**job, "content": _transfer_step(job)["content"]})


def run_grid(config, out_dir, *, jobs: Optional[int] = None, device: Any = None, progress: bool = True,
             only_defenses: Optional[Sequence[str]] = None, executor: str = "local",
             address: Optional[str] = None) -> Dict[str, Any]:
    """Runs (or resumes) every step of the grid; returns :func:`collect_results`."""
    cfg = config if isinstance(config, GridConfig) else load_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exp = cfg.experiment
    if device is not None:
        exp.device = device
    workers = exp.jobs if jobs is None else jobs
    pool = open_executor(executor, address=address, workers=workers)  # checks the name first
    defenses = [d for d in cfg.defenses if not only_defenses or d.label in only_defenses]
    atomic_write_json(out / "grid.json", cfg.to_json(defenses))
    t0 = time.time()
    eval_jobs: List[Dict[str, Any]] = []
    own_victims: Dict[str, Dict[str, Any]] = {}  # folder -> the job training a model a defense serves
    cells: Dict[str, List[Dict[str, Any]]] = {a.label: [] for a in cfg.attacks}  # attack label -> its cells
    # what the grid sets in every step (the rest comes from the tables)
    own = {"device_id": exp.device, "data_root": exp.data_root, "seed": exp.seed, "no_progress": True}
    for v in cfg.victims:
        _victim_step(out, exp, v, progress)
        for d in defenses:
            variant = defense_victim(v, d)
            needs = None
            if variant is not None:
                needs = str(out / "victims" / variant[0])
                if needs not in own_victims:
                    own_victims[needs] = {"kind": "victim", "folder": needs, "experiment": exp, "spec": variant[1]}
            ddir, settings = defense_settings(out, v, d)
            recipe = (variant[1] if variant else v).recipe()
            for value, args in settings:
                base = {"victim": v.key, "victim_recipe": _fingerprint(recipe), "defense": d.name,
                        "args": args, "seed": exp.seed}
                folder = out / "eval" / v.key / slug(d.label) / slug(value)
                eval_jobs.append({
                    "kind": "eval", "needs": needs,
                    "folder": str(folder), "settings": {**base, "eval": cfg.eval.recipe()},
                    "eval": cfg.eval.step_settings(0, victim_model_dir=str(ddir), defense=d.name,
                                                   defense_args=args, out_dir=str(folder), nworkers=0, **own),
                })
                for a in cfg.attacks:
                    folder = out / "attack" / v.key / slug(a.label) / slug(d.label) / slug(value)
                    source = (out / "attack" / v.key / slug(a.transferset_from) / slug(d.label) / slug(value)
                              if a.transferset_from else None)
                    aware_dirs = {"aware_out": str(folder), "shadow_dir": str(folder / "shadows")} if source else {}
                    transfer = a.step_settings(0, victim_model_dir=str(ddir), defense=d.name, defense_args=args,
                                               out_dir=str(source or folder), nworkers=0, **aware_dirs, **own)
                    tsettings = {**{k: base[k] for k in _TRANSFER_KEYS}, "attack": a.step_values(0)}
                    if source is not None:
                        tsettings["from"] = a.transferset_from
                    cells[a.label].append({
                        "kind": "cell", "needs": needs, "folder": str(folder),
                        "settings": {**base, "attack": a.recipe()},
                        "transfer_settings": tsettings, "defense_label": d.label, "value": slug(value),
                        "victim_key": v.key, **({"aware": transfer, "source": str(source)} if source
                                                else {"transfer": transfer}),
                        "attacker": a.step_settings(1, model_dir=str(folder), testdataset=v.dataset,
                                                    budgets=",".join(map(str, a.budgets)), num_workers=0, **own),
                        "train_key": {"attacker": a.step_values(1), "budgets": list(a.budgets),
                                      "testdataset": v.dataset, "seed": exp.seed},
                    })
    refresh = lambda: collect_results(out, cfg, write=True)  # noqa: E731
    first = [a for a in cfg.attacks if a.at == "all" and a.transferset_from is None]
    later = [a for a in cfg.attacks if a not in first]
    with pool as ex:
        gpu = is_gpu(exp.device)
        # the models defenses serve train in workers beside everything that does not need them
        first_cells = [c for a in first for c in cells[a.label]]
        now = list(own_victims.values()) + [j for j in eval_jobs + first_cells if j["needs"] is None]
        run_jobs(_grid_job, now, workers, "eval-bbox + attacks", progress, after=refresh, executor=ex, gpu=gpu)
        run_jobs(_grid_job, [j for j in eval_jobs + first_cells if j["needs"] is not None], workers,
                 "defenses with their own model", progress, after=refresh, executor=ex, gpu=gpu)
        if later:
            rows = collect_results(out, cfg, write=True)["rows"]
            jobs = []
            for a in later:
                chosen = (least_loss_settings(rows, a.judged_by or a.transferset_from, a.hurts_by)
                          if a.at == "least_loss" else None)
                jobs += [c for c in cells[a.label]
                         if chosen is None or chosen.get((c["victim_key"], c["defense_label"])) == c["value"]]
            _run_thieves(jobs, first_cells, workers, progress, refresh, ex, gpu)
    results = collect_results(out, cfg, write=True)
    results["wall_seconds"] = round(time.time() - t0, 1)
    return results


def _run_thieves(jobs: List[Dict[str, Any]], finished: List[Dict[str, Any]], workers: int, progress: bool,
                 refresh, ex, gpu: bool) -> None:
    """Runs the thieves' cells: their transfer sets, then one training per distinct
    :func:`_content_key`; a cell whose content was already trained on gets a copy of that attacker."""
    trained: Dict[str, Path] = {}
    for c in finished:
        marker = Path(c["folder"]) / "done.json"
        if marker.exists():
            content = json.loads(marker.read_text()).get("content")
            if content:
                trained.setdefault(content, Path(c["folder"]))
    keys = run_jobs(_transfer_step, jobs, workers, "thieves: transfer sets", progress, executor=ex, gpu=gpu)
    to_train, copies, planned = [], [], set()
    for job, key in zip(jobs, keys):
        if _done(Path(job["folder"]), job["settings"]):
            if key["content"] is not None:
                trained.setdefault(key["content"], Path(job["folder"]))
        elif key["content"] is not None and (key["content"] in trained or key["content"] in planned):
            copies.append((job, key))
        else:
            to_train.append((job, key))
            planned.add(key["content"])
    run_jobs(_train_step, [{**j, "content": k["content"]} for j, k in to_train], workers, "thieves: training",
             progress, after=refresh, executor=ex, gpu=gpu)
    for job, key in to_train:
        if key["content"] is not None:
            trained.setdefault(key["content"], Path(job["folder"]))
    for job, key in copies:
        _reuse_training(Path(job["folder"]), trained[key["content"]], job["settings"], key["content"])
    if copies:
        refresh()


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog or "ppoison grid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="grid TOML file")
    p.add_argument("--out", required=True, help="output folder (reruns resume here)")
    p.add_argument("--jobs", type=int, default=None, help="parallel worker processes (default: the config's)")
    p.add_argument("-d", "--device", type=device_arg, default=None, help="GPU, -1: CPU (default: config's)")
    p.add_argument("--only", default=None, help="comma-separated defense labels to run")
    p.add_argument("--executor", choices=("local", "ray"), default="local", help="local processes or Ray")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto': this machine's; default: "
                   "$RAY_ADDRESS, else a local cluster of --jobs CPUs)")
    p.add_argument("--plots", action="store_true", help="also draw the plots (ppoison_ext.pipeline.plots)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    res = run_grid(args.config, args.out, jobs=args.jobs, device=args.device, progress=not args.no_progress,
                   only_defenses=args.only.split(",") if args.only else None, executor=args.executor,
                   address=args.address)
    if args.plots:
        from .plots import plot_results

        plot_results(args.out)
    sys.stderr.write(f"grid: {len(res['rows'])} result rows in {args.out}/results.csv "
                     f"({res.get('wall_seconds', 0):.0f} s)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
