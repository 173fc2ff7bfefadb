"""An experiment grid: victims × attacks × defenses × parameters × budgets, from one TOML file.

    ppoison grid CONFIG.toml --out runs/NAME [--jobs 2] [--device -1] [--executor ray [--address ADDR]]

Steps per grid, each skipped when its ``done.json`` marker exists with the same settings
(a rerun resumes; the steps themselves resume mid-way, see each one):

1. per victim: ``train-victim`` into ``<out>/victims/<DS>-<arch>``, and the MAD proxy
   (the reference's recipe: 1 epoch, 10 images, lr 0) into ``.../<DS>-<arch>-proxy``;
2. per victim × defense setting: ``eval-bbox`` (defender accuracy, perturbation size) into
   ``<out>/eval/<victim>/<defense>/<value>``;
3. per victim × attack × defense setting ("cell"): the transfer set under the defense and
   the attacker trained through the budgets, into ``<out>/attack/<victim>/<attack>/<defense>/<value>``.

Cells run in ``jobs`` worker processes (one torch thread each), or as tasks of a Ray cluster
with ``--executor ray`` (:mod:`.executors`; victims train in this process either way). After
every finished cell ``results.csv`` / ``results.json`` are rewritten from the files on disk, so
the tables are always rebuilt from the runs, never from memory.

Config (TOML; unknown keys are errors):

* ``[experiment]``: ``name``, ``seed`` (42), ``device`` (-1 CPU / GPU index), ``jobs``,
  ``data_root``.
* ``[[victim]]``: ``dataset``, ``arch``, and train-victim settings (``epochs``, ``lr``,
  ``momentum``, ``batch_size``, ``lr_step``, ``lr_gamma``, ``train_subset``, ``test_subset``).
* ``[[attack]]``: ``label``, ``policy`` (random/adaptive), ``queryset``, ``budget`` (queries),
  ``batch_size``, ``arch``, ``budgets`` (attacker training sizes), ``epochs``, ``lr``,
  ``momentum``, ``lr_step``, ``batch_size_train``, ``argmaxed``, ``test_subset``.
  Thieves beside it: ``transferset_from = LABEL`` reuses that attack's transfer set (the same
  queries and answers: no query is sent) through the defense-aware step, set by that step's
  keys (``hardlabel``, ``recover``, ``recover_table``, ``dirichlet_prior``, ``table_size``, ...;
  :mod:`.aware`); ``at = "least_loss"`` runs an attack only at each defense's setting of least
  defender loss that lowers the ``judged_by`` (default: ``transferset_from``) thief's accuracy
  by ``hurts_by`` (1.0) points (:func:`least_loss_settings`), after the attacks run at all
  settings. A thief whose transfer set and training settings equal an earlier cell's gets
  that cell's attacker instead of training the same model again (``done.json`` says
  ``trained_in``). ``results.json``'s ``robust`` lists the best thief per setting.
* ``[eval]``: ``batch_size``, ``test_subset``.
* ``[[defense]]``: ``label``, ``name`` (the reference's names), ``args`` (a defense_args
  template: ``{value}`` is replaced by each entry of ``values``, ``{proxy}`` by the proxy
  folder, ``{victim}`` by the folder of the model the defense serves), optional ``param`` and
  ``values``, and ``victim_options``: train-victim settings of a model trained for this
  defense alone (e.g. ``{outlier_exposure = "FashionMNIST"}`` for Adaptive Misinformation's
  defender, into ``victims/<DS>-<arch>-<label>``); its defender loss is against the plain victim.

The victim, attack and eval tables configure the steps' settings (:data:`STEP_TABLES`): a key
is checked by the step's settings dataclass (type, choices), and any other setting of the step
is accepted too, e.g. ``weighted_loss = true`` in ``[[victim]]`` (``VictimSettings``),
``optimizer_choice = "adam"`` or ``reward = "div"`` in ``[[attack]]`` (``AttackerSettings``,
``TransferSettings``). The settings the grid sets itself (folders, device, seed, data root,
workers, resuming) are not accepted. Extra keys are fingerprinted with their table, so setting
one reruns what it affects.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..fileio import atomic_write_json, atomic_write_text
from .settings import check_value, group_fields

logger = logging.getLogger(__name__)

__all__ = ["GridConfig", "STEP_TABLES", "load_config", "run_grid", "collect_results", "build_parser", "main"]

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
    #: further train-victim settings (VictimSettings fields), from the table's other keys
    options: Dict[str, Any] = field(default_factory=dict)

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
    #: a thief that reuses the transfer set (the queries and answers) of the attack with this
    #: label and only changes what it learns from it (the defense-aware step, pipeline/aware.py)
    transferset_from: Optional[str] = None
    #: "all" settings of every defense, or "least_loss": each defense's setting of least
    #: defender loss that hurts the ``judged_by`` thief (see :func:`least_loss_settings`)
    at: str = "all"
    judged_by: Optional[str] = None
    hurts_by: float = 1.0
    #: further transfer / train-attacker settings (TransferSettings, AttackerSettings fields)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSpec:
    batch_size: int = 1000
    test_subset: Optional[int] = None
    #: further eval-bbox settings (EvalSettings fields)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DefenseSpec:
    label: str = "none"
    name: str = "none"
    args: str = ""
    param: Optional[str] = None
    values: List[Any] = field(default_factory=list)
    #: train-victim settings of a model trained for this defense alone (e.g. Adaptive
    #: Misinformation's Outlier-Exposure defender): the defense serves that model instead of
    #: the plain victim; ``{victim}`` in ``args`` names its folder
    victim_options: Dict[str, Any] = field(default_factory=dict)

    def settings(self, proxy_dir: str, victim_dir: str = "") -> List[Tuple[Optional[Any], str]]:
        values = self.values or [None]
        return [(v, self.args.replace("{value}", "" if v is None else str(v)).replace("{proxy}", proxy_dir)
                 .replace("{victim}", victim_dir)) for v in values]


@dataclass
class GridConfig:
    experiment: ExperimentSpec
    victims: List[VictimSpec]
    attacks: List[AttackSpec]
    defenses: List[DefenseSpec]
    eval: EvalSpec


@dataclass(frozen=True)
class StepTable:
    """How a grid table configures one step: the step's settings dataclass (``"module:Class"``
    in this package), the table keys named differently there, and the settings the grid sets."""

    settings: str
    renamed: Dict[str, str]
    grid_owned: Tuple[str, ...]

    @property
    def cls(self) -> type:
        import importlib

        module, name = self.settings.split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)


_OWNED = ("device_id", "data_root", "seed", "no_progress", "resume")

#: grid table -> the steps it configures, in order (a key both steps have goes to the first)
STEP_TABLES: Dict[str, Tuple[StepTable, ...]] = {
    "victim": (StepTable("victim:VictimSettings", {"arch": "model_arch"},
                         _OWNED + ("out_path", "num_workers")),),
    "attack": (StepTable("transfer:TransferSettings", {},
                         _OWNED + ("victim_model_dir", "defense", "defense_args", "out_dir", "nworkers",
                                   "num_shards", "shard_id", "merge_shards", "merge_timeout", "aware_out",
                                   "shadow_dir")),
               StepTable("attacker:AttackerSettings",
                         {"arch": "model_arch", "batch_size_train": "batch_size"},
                         _OWNED + ("model_dir", "testdataset", "budgets", "num_workers"))),
    "eval": (StepTable("evaluate:EvalSettings", {}, _OWNED + ("victim_model_dir", "defense", "defense_args",
                                                              "out_dir", "nworkers")),),
}
_TABLE_OF = {VictimSpec: "victim", AttackSpec: "attack", EvalSpec: "eval"}


def _spec_keys(cls) -> List[str]:
    return [f.name for f in fields(cls) if f.name != "options"]


def _route(table: str, key: str, spec_key: bool) -> Optional[Tuple[int, str]]:
    """(step index, setting name) a key of ``table`` sets, or None for a key of the grid's own
    (``label``, ``budgets``); raises ValueError for an extra key the grid sets itself or
    that has another name in the table."""
    for i, step in enumerate(STEP_TABLES[table]):
        names = {f.name for f in fields(step.cls)}
        if spec_key:
            name = step.renamed.get(key, key)
            if name in names and name not in step.grid_owned:
                return i, name
            continue
        if key in step.renamed.values():
            table_key = next(k for k, v in step.renamed.items() if v == key)
            raise ValueError(f"{key!r} is called {table_key!r} here")
        if key in names:
            if key in step.grid_owned:
                raise ValueError(f"{key!r} is set by the grid")
            return i, key
    if spec_key:
        return None
    raise KeyError(key)


def _accepted(cls) -> List[str]:
    extra = {f.name for step in STEP_TABLES[_TABLE_OF[cls]] for f in fields(step.cls)
             if f.name not in step.grid_owned and f.name not in step.renamed.values()}
    return sorted(set(_spec_keys(cls)) | extra)


def _build(cls, raw: Dict[str, Any], where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table, got {type(raw).__name__}")
    table = _TABLE_OF.get(cls)
    names = _spec_keys(cls)
    values: Dict[str, Any] = {}
    options: Dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        if table is None:
            if key in names:
                values[key] = value
            else:
                unknown.append(key)
            continue
        try:
            route = _route(table, key, key in names)
        except KeyError:
            unknown.append(key)
            continue
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if route is not None:  # a step setting: the step's dataclass checks it
            check_value(STEP_TABLES[table][route[0]].cls, route[1], value, where, key=key)
        (values if key in names else options)[key] = value
    if unknown:
        accepted = names if table is None else _accepted(cls)
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; accepted: {sorted(accepted)}")
    return cls(**values, options=options) if table is not None else cls(**values)


def _step_values(spec, step: int) -> Dict[str, Any]:
    """The table keys of ``spec`` (its fields and options) that set step ``step``'s settings,
    under the table's names."""
    table = _TABLE_OF[type(spec)]
    out = {}
    for key in _spec_keys(type(spec)):
        route = _route(table, key, True)
        if route is not None and route[0] == step:
            out[key] = getattr(spec, key)
    out.update({k: v for k, v in spec.options.items() if _route(table, k, False)[0] == step})
    return out


def _step_settings(spec, step: int, **grid_values: Any):
    """Step ``step``'s settings dataclass from ``spec`` and the values the grid sets."""
    table = STEP_TABLES[_TABLE_OF[type(spec)]][step]
    values = {table.renamed.get(k, k): v for k, v in _step_values(spec, step).items()}
    return table.cls(**values, **grid_values)


def _recipe(spec) -> Dict[str, Any]:
    """What a spec's outputs depend on, for the fingerprints: its fields, its options flat
    (none in the shipped configs, so their fingerprints are those of ``asdict`` before options)."""
    d = asdict(spec)
    d.update(d.pop("options", None) or {})
    for key, default in _RECIPE_DEFAULTS.items():  # fields added later: absent at their defaults
        if key in d and d[key] == default:
            del d[key]
    return d


_RECIPE_DEFAULTS = {"transferset_from": None, "at": "all", "judged_by": None, "hurts_by": 1.0}


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
    for i, d in enumerate(cfg.defenses):
        for v in cfg.victims:
            defense_victim(v, d, f"{path} [[defense]] #{i + 1}")
    labels = [a.label for a in cfg.attacks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: attack labels must be unique, got {labels}")
    # labels and values name folders: two that give the same folder name would share its files
    _unique_slugs(path, "attack labels", labels)
    _unique_slugs(path, "defense labels", [d.label for d in cfg.defenses])
    for d in cfg.defenses:
        _unique_slugs(path, f"values of defense {d.label!r}", d.values)
    for i, a in enumerate(cfg.attacks):
        _check_thief(cfg, a, raw["attack"][i], f"{path} [[attack]] #{i + 1} ({a.label!r})")
        if a.policy not in ("random", "adaptive"):
            raise ValueError(f"{path}: attack {a.label!r}: policy must be 'random' or 'adaptive'")
        if sorted(a.budgets) != list(a.budgets) or max(a.budgets) > a.budget:
            raise ValueError(f"{path}: attack {a.label!r}: budgets must be increasing and <= budget {a.budget}")
    return cfg


def _unique_slugs(path: Path, what: str, names: Sequence[Any]) -> None:
    folders: Dict[str, Any] = {}
    for name in names:
        other = folders.setdefault(_slug(name), name)
        if other != name:
            raise ValueError(f"{path}: {what} {other!r} and {name!r} give the same folder name {_slug(name)!r}")


def _aware_keys() -> List[str]:
    from .transfer import AWARE_GROUP, TransferSettings

    owned = STEP_TABLES["attack"][0].grid_owned
    return [k for k in group_fields(TransferSettings, AWARE_GROUP) if k not in owned]


def _check_thief(cfg: GridConfig, a: AttackSpec, raw: Dict[str, Any], where: str) -> None:
    """Checks ``transferset_from`` / ``at`` / ``judged_by`` of ``a``; a thief reusing another
    attack's transfer set takes that attack's query settings (it sends no queries)."""
    by_label = {b.label: b for b in cfg.attacks}
    if a.at not in ("all", "least_loss"):
        raise ValueError(f"{where}: at must be 'all' or 'least_loss', got {a.at!r}")
    if isinstance(a.hurts_by, bool) or not isinstance(a.hurts_by, (int, float)) or not a.hurts_by >= 0:
        raise ValueError(f"{where}: hurts_by must be a number of accuracy points >= 0, got {a.hurts_by!r}")
    if a.transferset_from is not None:
        base = by_label.get(a.transferset_from)
        if base is None or base is a or base.transferset_from is not None or base.at != "all":
            querying_all = [b.label for b in cfg.attacks if b.transferset_from is None and b.at == "all" and b is not a]
            raise ValueError(f"{where}: transferset_from must name another attack that queries the victim itself "
                             f"at all settings, one of {querying_all}, got {a.transferset_from!r}")
        aware = set(_aware_keys())
        routes = {k: _route("attack", k, k in _spec_keys(AttackSpec)) for k in raw}
        querying = sorted(k for k, route in routes.items() if route is not None and route[0] == 0 and k not in aware)
        if querying:
            raise ValueError(f"{where}: {querying} set how queries are asked, but this thief reuses the transfer "
                             f"set of {a.transferset_from!r}; only the defense-aware keys {sorted(aware)} apply")
        for key in _step_values(base, 0):
            if key in _spec_keys(AttackSpec):
                setattr(a, key, getattr(base, key))
            elif key not in aware:
                a.options[key] = base.options[key]
    if a.at == "least_loss":
        judge = a.judged_by or a.transferset_from
        if judge is None or judge not in by_label or by_label[judge].at != "all" or judge == a.label:
            raise ValueError(f"{where}: at = 'least_loss' needs judged_by (or transferset_from): the label of an "
                             f"attack run at all settings, got {judge!r}")
    elif a.judged_by is not None:
        raise ValueError(f"{where}: judged_by is only used with at = 'least_loss'")


def defense_victim(v: VictimSpec, d: DefenseSpec, where: str = "") -> Optional[Tuple[str, VictimSpec]]:
    """The folder name and recipe of the model ``d`` serves instead of the plain victim ``v``
    (``d.victim_options`` over ``v``'s settings), or None when ``d`` serves ``v`` itself."""
    if not d.victim_options:
        return None
    if not isinstance(d.victim_options, dict):
        raise ValueError(f"{where}: victim_options must be a table of train-victim settings")
    fixed = sorted({"dataset", "arch"} & set(d.victim_options))
    if fixed:
        raise ValueError(f"{where}: victim_options cannot set {fixed}: the defense serves a model of its victim's task")
    raw = {k: val for k, val in asdict(v).items() if k != "options"}
    raw.update(v.options)
    raw.update(d.victim_options)
    return f"{v.key}-{_slug(d.label)}", _build(VictimSpec, raw, f"{where} victim_options")


def _slug(v: Any) -> str:
    return "default" if v is None else re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(v))


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
                  "params_transfer.json", "params_aware.json", "recover_table.pt") + ATTACKER_FILES
# the cell settings a transfer set depends on (besides the attack table's transfer settings)
_TRANSFER_KEYS = ("victim", "victim_recipe", "defense", "args", "seed")


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


def _train_victim(folder: Path, exp: ExperimentSpec, v: VictimSpec, progress: bool) -> None:
    settings = {"victim": _recipe(v), "seed": exp.seed}
    if not _done(folder, settings):
        _start(folder, settings, VICTIM_FILES)
        _step_settings(v, 0, out_path=str(folder), device_id=exp.device, data_root=exp.data_root, seed=exp.seed,
                       no_progress=not progress, resume="auto", num_workers=0).run()
        _mark_done(folder, settings)


def _victim_step(out: Path, exp: ExperimentSpec, v: VictimSpec, progress: bool) -> Tuple[Path, Path]:
    from .victim import make_proxy

    vdir = out / "victims" / v.key
    pdir = out / "victims" / f"{v.key}-proxy"
    _train_victim(vdir, exp, v, progress)
    psettings = {"proxy_of": _recipe(v), "seed": exp.seed + 1}
    if not _done(pdir, psettings):
        _start(pdir, psettings, VICTIM_FILES)
        make_proxy(v.dataset, v.arch, pdir, device=exp.device, data_root=exp.data_root, seed=exp.seed + 1,
                   test_subset=v.test_subset or 1000, progress=progress)
        _mark_done(pdir, psettings)
    return vdir, pdir


def _defense_settings(out: Path, v: VictimSpec, d: DefenseSpec) -> Tuple[Path, List[Tuple[Optional[Any], str]]]:
    """The folder of the model ``d`` serves for victim ``v``, and ``d``'s (value, args) settings."""
    own = defense_victim(v, d)
    ddir = out / "victims" / (own[0] if own else v.key)
    return ddir, d.settings(str(out / "victims" / f"{v.key}-proxy"), str(ddir))


def _eval_step(job: Dict[str, Any]) -> Dict[str, Any]:
    folder = Path(job["folder"])
    if _done(folder, job["settings"]):
        return json.loads((folder / "done.json").read_text())["result"]
    _start(folder, job["settings"], EVAL_FILES)
    res = job["eval"].run()
    res = {k: v for k, v in res.items() if k != "log"}
    _mark_done(folder, job["settings"], {"result": res})
    return res


def _transfer_step(job: Dict[str, Any]) -> Dict[str, Any]:
    """A cell's transfer set: queried (``transfer``), or made from another cell's by the
    defense-aware step (``aware``: the settings, ``source``: that cell's folder)."""
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
    """Trains the cell's attacker; ``job["content"]`` is its :func:`_content_key` (from
    :func:`_transfer_step`), recorded in ``done.json``."""
    folder = Path(job["folder"])
    if not _done(folder, job["settings"]):
        _start(folder, job["settings"], ATTACKER_FILES)
        job["attacker"].run()
        _mark_done(folder, job["settings"], {"content": job["content"]})
    return {"folder": str(folder)}


def _attack_step(job: Dict[str, Any]) -> Dict[str, Any]:
    return _train_step({**job, "content": _transfer_step(job)["content"]})


def _content_key(folder: Path, train_key: Dict[str, Any]) -> Optional[str]:
    """What an attacker trained in ``folder`` depends on: the bytes of its transfer set, and
    the attack's training settings and victim task; equal keys train the same model."""
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
    import shutil

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
    return (_eval_step if job["kind"] == "eval" else _attack_step)(job)


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


def _run_jobs(fn, jobs: List[Dict[str, Any]], workers: int, desc: str, progress: bool, after=None,
              executor=None, gpu: bool = False) -> List[Any]:
    from tqdm import tqdm

    results: List[Any] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress, unit="cell")
    if executor is not None:  # a RayExecutor (see executors.py)
        for i, res in executor.run(fn, jobs, gpu=gpu):
            results[i] = res
            bar.update(1)
            if after:
                after()
    elif workers <= 1 or len(jobs) <= 1:
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
             only_defenses: Optional[Sequence[str]] = None, executor: str = "local",
             address: Optional[str] = None) -> Dict[str, Any]:
    """Runs (or resumes) every step of the grid; returns :func:`collect_results`. ``executor``:
    ``"local"`` (worker processes) or ``"ray"`` (Ray tasks on the cluster at ``address``, or on a
    local one), see :mod:`.executors`."""
    from .executors import is_gpu, open_executor

    cfg = config if isinstance(config, GridConfig) else load_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exp = cfg.experiment
    if device is not None:
        exp.device = device
    workers = exp.jobs if jobs is None else jobs
    pool = open_executor(executor, address=address, workers=workers)  # checks the name first
    defenses = [d for d in cfg.defenses if not only_defenses or d.label in only_defenses]
    atomic_write_json(out / "grid.json", {"experiment": asdict(exp), "victims": [asdict(v) for v in cfg.victims],
                                          "attacks": [asdict(a) for a in cfg.attacks],
                                          "defenses": [asdict(d) for d in defenses], "eval": asdict(cfg.eval)})
    t0 = time.time()
    eval_jobs: List[Dict[str, Any]] = []
    own_victims: Dict[str, Dict[str, Any]] = {}  # folder -> the job training a model a defense serves
    cells: Dict[str, List[Dict[str, Any]]] = {a.label: [] for a in cfg.attacks}  # attack label -> its cells
    # what the grid sets in every step (the rest comes from the tables, see STEP_TABLES)
    own = {"device_id": exp.device, "data_root": exp.data_root, "seed": exp.seed, "no_progress": True}
    for v in cfg.victims:
        vdir, pdir = _victim_step(out, exp, v, progress)
        for d in defenses:
            variant = defense_victim(v, d)
            needs = None
            if variant is not None:
                needs = str(out / "victims" / variant[0])
                if needs not in own_victims:
                    own_victims[needs] = {"kind": "victim", "folder": needs, "experiment": exp, "spec": variant[1]}
            ddir, settings = _defense_settings(out, v, d)
            recipe = _recipe(variant[1] if variant else v)
            for value, args in settings:
                base = {"victim": v.key, "victim_recipe": _fingerprint(recipe), "defense": d.name,
                        "args": args, "seed": exp.seed}
                folder = out / "eval" / v.key / _slug(d.label) / _slug(value)
                eval_jobs.append({
                    "kind": "eval", "needs": needs,
                    "folder": str(folder), "settings": {**base, "eval": _recipe(cfg.eval)},
                    "eval": _step_settings(cfg.eval, 0, victim_model_dir=str(ddir), defense=d.name,
                                           defense_args=args, out_dir=str(folder), nworkers=0, **own),
                })
                for a in cfg.attacks:
                    folder = out / "attack" / v.key / _slug(a.label) / _slug(d.label) / _slug(value)
                    source = (out / "attack" / v.key / _slug(a.transferset_from) / _slug(d.label) / _slug(value)
                              if a.transferset_from else None)
                    transfer = _step_settings(a, 0, victim_model_dir=str(ddir), defense=d.name,
                                              defense_args=args, out_dir=str(source or folder), nworkers=0,
                                              **({"aware_out": str(folder), "shadow_dir": str(folder / "shadows")}
                                                 if source else {}), **own)
                    # the transfer set depends on the victim, defense, seed and transfer settings only
                    tsettings = {**{k: base[k] for k in _TRANSFER_KEYS}, "attack": _step_values(a, 0)}
                    if source is not None:
                        tsettings["from"] = a.transferset_from
                    cells[a.label].append({
                        "kind": "cell", "needs": needs, "folder": str(folder), "settings": {**base, "attack": _recipe(a)},
                        "transfer_settings": tsettings, "defense_label": d.label, "value": _slug(value),
                        "victim_key": v.key, **({"aware": transfer, "source": str(source)} if source
                                                else {"transfer": transfer}),
                        "attacker": _step_settings(a, 1, model_dir=str(folder), testdataset=v.dataset,
                                                   budgets=",".join(map(str, a.budgets)), num_workers=0,
                                                   **own),
                        "train_key": {"attacker": _step_values(a, 1), "budgets": list(a.budgets),
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
        _run_jobs(_grid_job, now, workers, "eval-bbox + attacks", progress, after=refresh, executor=ex, gpu=gpu)
        _run_jobs(_grid_job, [j for j in eval_jobs + first_cells if j["needs"] is not None], workers,
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
    """Runs the cells that come after the first attacks: their transfer sets first (queried, or
    made from another cell's), then one training per distinct content (transfer set bytes and
    training settings); a cell whose content an earlier cell already trained on gets that
    cell's attacker (the same model, see :func:`_content_key`)."""
    trained: Dict[str, Path] = {}
    for c in finished:
        marker = Path(c["folder"]) / "done.json"
        if marker.exists():
            content = json.loads(marker.read_text()).get("content")
            if content:
                trained.setdefault(content, Path(c["folder"]))
    keys = _run_jobs(_transfer_step, jobs, workers, "thieves: transfer sets", progress, executor=ex, gpu=gpu)
    to_train, copies = [], []
    for job, key in zip(jobs, keys):
        if _done(Path(job["folder"]), job["settings"]):
            if key["content"] is not None:
                trained.setdefault(key["content"], Path(job["folder"]))
        elif key["content"] is not None and (key["content"] in trained
                                             or any(k["content"] == key["content"] for _, k in to_train)):
            copies.append((job, key))
        else:
            to_train.append((job, key))
    _run_jobs(_train_step, [{**j, "content": k["content"]} for j, k in to_train], workers, "thieves: training",
              progress, after=refresh, executor=ex, gpu=gpu)
    for job, key in to_train:
        if key["content"] is not None:
            trained.setdefault(key["content"], Path(job["folder"]))
    for job, key in copies:
        _reuse_training(Path(job["folder"]), trained[key["content"]], job["settings"], key["content"])
    if copies:
        refresh()


def least_loss_settings(rows: List[Dict[str, Any]], attack: str, hurts_by: float = 1.0
                        ) -> Dict[Tuple[str, str], str]:
    """Per (victim, defense label), the setting (its folder slug) of least defender loss that
    hurts the thief ``attack``: the setting the amplification table reports at the smallest
    allowed drop of defender accuracy (:data:`AMPLIFICATION_DROPS`) at which some setting lowers
    that thief's accuracy at its largest budget by at least ``hurts_by`` points below the
    undefended one (ties: the setting that lowers it most). The undefended ``none`` rows are
    always chosen (the thieves' own baseline); a defense that hurts at no allowed drop is left out."""
    out: Dict[Tuple[str, str], str] = {}
    for (victim, name), vr in _at_largest_budget(rows).items():
        if name != attack:
            continue
        base = [r for r in vr if r["defense"] == "none"]
        for r in base:
            out[(victim, r["label"])] = _slug(r["value"])
        if not base:
            continue
        bar = base[0]["attacker_acc"] - hurts_by
        for label in dict.fromkeys(r["label"] for r in vr if r["defense"] != "none"):
            for drop in AMPLIFICATION_DROPS:
                # the best setting within the allowance hurts exactly when some setting there does
                best = _best_within(vr, label, drop)
                if best is not None and best["attacker_acc"] <= bar:
                    out[(victim, label)] = _slug(best["value"])
                    break
    return out


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
    """Rebuilds the result table from the files of a grid run (see :data:`ROW_KEYS`).

    ``attacker_acc`` is the attacker's best test accuracy over its epochs at that budget (what
    the reference's checkpoint keeps), ``attacker_acc_final`` the last epoch's; accuracies in %.
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
        served = {d.label: _defense_settings(out, v, d) for d in cfg.defenses}
        for d in cfg.defenses:
            for value, args in served[d.label][1]:
                marker = out / "eval" / v.key / _slug(d.label) / _slug(value) / "done.json"
                if marker.exists():
                    evals[(d.label, _slug(value))] = json.loads(marker.read_text())["result"]
                    if d.name == "none" and none_eval is None:
                        none_eval = evals[(d.label, _slug(value))]
        victim_acc = none_eval["accuracy"] if none_eval else None
        for a in cfg.attacks:
            for d in cfg.defenses:
                ddir, settings = served[d.label]
                for value, args in settings:
                    ev = evals.get((d.label, _slug(value)))
                    folder = out / "attack" / v.key / _slug(a.label) / _slug(d.label) / _slug(value)
                    l1_transfer = _transfer_l1(out / "attack" / v.key / _slug(a.transferset_from or a.label)
                                               / _slug(d.label) / _slug(value))
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
    """Attacker error amplification at equal defender accuracy loss.

    For each victim × attack × defense and each allowed drop of defender accuracy
    (``AMPLIFICATION_DROPS`` percentage points), the largest
    (100 − attacker acc) / (100 − attacker acc undefended) over the defense's settings whose
    defender accuracy dropped by at most that much; at the largest budget.
    """
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
    """The best attacker over all thieves, per victim × first attack × defense setting, at the
    first attack's largest budget: the first attack (``naive``) and every thief run beside it
    (rows whose ``thief_of`` names it) at that setting and budget. ``thief`` names the best
    (the naive one on a tie)."""
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
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where cells run: local worker processes (default) or Ray tasks")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on (ray.init address, 'auto' for this machine's; default: "
                        "$RAY_ADDRESS, else a local cluster of --jobs CPUs on 127.0.0.1)")
    p.add_argument("--plots", action="store_true", help="also draw the plots (ppoison_ext.pipeline.plots)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = None if args.device is None else (int(args.device) if args.device.lstrip("-").isdigit() else args.device)
    res = run_grid(args.config, args.out, jobs=args.jobs, device=device, progress=not args.no_progress,
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
