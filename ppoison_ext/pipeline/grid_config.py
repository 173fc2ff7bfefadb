"""The grid's TOML config (keys: :mod:`.grid`): reading and checking it, and the step settings its
tables give. ``[[victim]]``, ``[[attack]]`` and ``[eval]`` are partial settings of their steps
(:data:`STEP_TABLES`), each key checked by the step's settings dataclass.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from .attacker import AttackerSettings
from .aware import AWARE_GROUP
from .evaluate import EvalSettings
from .settings import check_keys, check_value, group_fields
from .transfer import TransferSettings
from .victim import VictimSettings

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore

__all__ = ["GridConfig", "Table", "ExperimentSpec", "DefenseSpec", "STEP_TABLES", "TABLE_KEYS", "load_config",
           "defense_victim"]


@dataclass
class ExperimentSpec:
    name: str = "experiment"
    seed: int = 42
    device: Any = -1
    jobs: int = 1
    data_root: Optional[str] = None


@dataclass
class DefenseSpec:
    label: str = "none"
    name: str = "none"
    args: str = ""
    param: Optional[str] = None
    values: List[Any] = field(default_factory=list)
    #: train-victim settings of a model the defense serves instead of the plain victim
    victim_options: Dict[str, Any] = field(default_factory=dict)

    def settings(self, proxy_dir: str, victim_dir: str = "") -> List[Tuple[Optional[Any], str]]:
        values = self.values or [None]
        return [(v, self.args.replace("{value}", "" if v is None else str(v)).replace("{proxy}", proxy_dir)
                 .replace("{victim}", victim_dir)) for v in values]


class StepTable(NamedTuple):
    """A step a grid table configures: its settings class, renamed keys, and grid-set settings."""

    cls: type
    renamed: Dict[str, str]
    grid_owned: Tuple[str, ...]


_OWNED = ("device_id", "data_root", "seed", "no_progress", "resume")

#: grid table -> the steps it configures, in order (a key both steps have goes to the first)
STEP_TABLES: Dict[str, Tuple[StepTable, ...]] = {
    "victim": (StepTable(VictimSettings, {"arch": "model_arch"}, _OWNED + ("out_path", "num_workers")),),
    "attack": (StepTable(TransferSettings, {},
                         _OWNED + ("victim_model_dir", "defense", "defense_args", "out_dir", "nworkers",
                                   "num_shards", "shard_id", "merge_shards", "merge_timeout", "aware_out",
                                   "shadow_dir")),
               StepTable(AttackerSettings, {"arch": "model_arch", "batch_size_train": "batch_size"},
                         _OWNED + ("model_dir", "testdataset", "budgets", "num_workers"))),
    "eval": (StepTable(EvalSettings, {}, _OWNED + ("victim_model_dir", "defense", "defense_args", "out_dir",
                                                   "nworkers")),),
}

#: grid table -> its grid keys (those the fingerprints hold) and their defaults (``...``: the step
#: setting's default)
TABLE_KEYS: Dict[str, Dict[str, Any]] = {
    "victim": {"dataset": "MNIST", "arch": "lenet", "epochs": ..., "lr": ..., "momentum": ..., "batch_size": ...,
               "lr_step": ..., "lr_gamma": ..., "train_subset": ..., "test_subset": ...},
    "attack": {"label": "knockoff-random", "policy": "random", "queryset": "notMNIST", "budget": 10000,
               "batch_size": ..., "arch": "lenet", "budgets": [10000], "epochs": ..., "lr": ..., "momentum": ...,
               "lr_step": ..., "batch_size_train": ..., "argmaxed": ..., "test_subset": ...,
               "transferset_from": None, "at": "all", "judged_by": None, "hurts_by": 1.0},
    "eval": {"batch_size": 1000, "test_subset": ...},
}
# grid keys added after the first runs: absent from the fingerprints at their defaults
_RECIPE_DEFAULTS = {"transferset_from": None, "at": "all", "judged_by": None, "hurts_by": 1.0}


class Table:
    """A ``[[victim]]``, ``[[attack]]`` or ``[eval]`` table: ``values``, its grid keys (read as
    attributes, ``v.epochs``), and ``options``, the other step settings it sets."""

    def __init__(self, kind: str, values: Dict[str, Any], options: Optional[Dict[str, Any]] = None):
        self.kind = kind
        self.values = {k: copy.deepcopy(_default(kind, k)) for k in TABLE_KEYS[kind]}
        self.values.update(values)
        self.options = dict(options or {})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def key(self) -> str:
        """A victim's folder name."""
        return f"{self.dataset}-{self.arch}"

    def asdict(self) -> Dict[str, Any]:
        """The table as ``grid.json`` holds it."""
        return {**copy.deepcopy(self.values), "options": copy.deepcopy(self.options)}

    def recipe(self) -> Dict[str, Any]:
        """What the table's outputs depend on, for the fingerprints: its keys, then its options."""
        d = {**self.values, **self.options}
        for key, default in _RECIPE_DEFAULTS.items():
            if key in d and d[key] == default:
                del d[key]
        return d

    def step_values(self, step: int) -> Dict[str, Any]:
        """The table's keys (values and options) that set step ``step``, under the table's names."""
        out = {}
        for key in TABLE_KEYS[self.kind]:
            route = _route(self.kind, key, True)
            if route is not None and route[0] == step:
                out[key] = self.values[key]
        out.update({k: v for k, v in self.options.items() if _route(self.kind, k, False)[0] == step})
        return out

    def step_settings(self, step: int, **grid_values: Any):
        """Step ``step``'s settings dataclass from the table and the values the grid sets."""
        table = STEP_TABLES[self.kind][step]
        values = {table.renamed.get(k, k): v for k, v in self.step_values(step).items()}
        return table.cls(**values, **grid_values)


@dataclass
class GridConfig:
    experiment: ExperimentSpec
    victims: List[Table]
    attacks: List[Table]
    defenses: List[DefenseSpec]
    eval: Table

    @classmethod
    def from_json(cls, g: Dict[str, Any]) -> "GridConfig":
        """The config ``grid.json`` records."""
        def table(kind, d):
            return Table(kind, {k: v for k, v in d.items() if k != "options"}, d.get("options"))

        return cls(ExperimentSpec(**g["experiment"]), [table("victim", v) for v in g["victims"]],
                   [table("attack", a) for a in g["attacks"]], [DefenseSpec(**d) for d in g["defenses"]],
                   table("eval", g["eval"]))

    def to_json(self, defenses: Sequence[DefenseSpec]) -> Dict[str, Any]:
        return {"experiment": asdict(self.experiment), "victims": [v.asdict() for v in self.victims],
                "attacks": [a.asdict() for a in self.attacks], "defenses": [asdict(d) for d in defenses],
                "eval": self.eval.asdict()}


def _default(kind: str, key: str) -> Any:
    default = TABLE_KEYS[kind][key]
    if default is not ...:
        return default
    step, name = _route(kind, key, True)
    return next(f.default for f in fields(STEP_TABLES[kind][step].cls) if f.name == name)


def _route(table: str, key: str, grid_key: bool) -> Optional[Tuple[int, str]]:
    """(step index, setting name) a key of ``table`` sets, or None for a grid-only key; ValueError
    for a key the grid sets or the table spells otherwise, KeyError for an unknown one."""
    for i, step in enumerate(STEP_TABLES[table]):
        names = {f.name for f in fields(step.cls)}
        if grid_key:
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
    if grid_key:
        return None
    raise KeyError(key)


def _accepted(kind: str) -> List[str]:
    extra = {f.name for step in STEP_TABLES[kind] for f in fields(step.cls)
             if f.name not in step.grid_owned and f.name not in step.renamed.values()}
    return sorted(set(TABLE_KEYS[kind]) | extra)


def _table(kind: str, raw: Any, where: str) -> Table:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a table, got {type(raw).__name__}")
    keys = TABLE_KEYS[kind]
    values: Dict[str, Any] = {}
    options: Dict[str, Any] = {}
    unknown = []
    for key, value in raw.items():
        try:
            route = _route(kind, key, key in keys)
        except KeyError:
            unknown.append(key)
            continue
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        if route is not None:  # a step setting: the step's dataclass checks it
            check_value(STEP_TABLES[kind][route[0]].cls, route[1], value, where, key=key)
        (values if key in keys else options)[key] = value
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; accepted: {_accepted(kind)}")
    return Table(kind, values, options)


def _plain(cls, raw: Any, where: str):
    check_keys(raw, [f.name for f in fields(cls)], where)
    return cls(**raw)


def load_config(path) -> GridConfig:
    """Reads and validates a grid TOML file (see :mod:`.grid`)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: cannot read the grid config ({err})") from err
    unknown = sorted(set(raw) - {"experiment", "victim", "attack", "defense", "eval"})
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}")
    cfg = GridConfig(
        experiment=_plain(ExperimentSpec, raw.get("experiment", {}), f"{path} [experiment]"),
        victims=[_table("victim", v, f"{path} [[victim]] #{i + 1}") for i, v in enumerate(raw.get("victim", []))],
        attacks=[_table("attack", a, f"{path} [[attack]] #{i + 1}") for i, a in enumerate(raw.get("attack", []))],
        defenses=[_plain(DefenseSpec, d, f"{path} [[defense]] #{i + 1}")
                  for i, d in enumerate(raw.get("defense", []))],
        eval=_table("eval", raw.get("eval", {}), f"{path} [eval]"),
    )
    if not cfg.victims or not cfg.defenses:
        raise ValueError(f"{path}: needs at least one [[victim]] and one [[defense]]")
    _unique_slugs(path, "defense labels", [d.label for d in cfg.defenses], distinct=True)
    for i, d in enumerate(cfg.defenses):
        for v in cfg.victims:
            defense_victim(v, d, f"{path} [[defense]] #{i + 1}")
    _unique_slugs(path, "attack labels", [a.label for a in cfg.attacks], distinct=True)
    for d in cfg.defenses:
        _unique_slugs(path, f"values of defense {d.label!r}", d.values)
    for i, a in enumerate(cfg.attacks):
        _check_thief(cfg, a, raw["attack"][i], f"{path} [[attack]] #{i + 1} ({a.label!r})")
        if sorted(a.budgets) != list(a.budgets) or max(a.budgets) > a.budget:
            raise ValueError(f"{path}: attack {a.label!r}: budgets must be increasing and <= budget {a.budget}")
    return cfg


def _unique_slugs(path: Path, what: str, names: Sequence[Any], distinct: bool = False) -> None:
    """Refuses ``names`` that give the same folder name (and, with ``distinct``, equal names)."""
    if distinct and len(set(names)) != len(names):
        raise ValueError(f"{path}: {what} must be unique, got {list(names)}")
    folders: Dict[str, Any] = {}
    for name in names:
        other = folders.setdefault(slug(name), name)
        if other != name:
            raise ValueError(f"{path}: {what} {other!r} and {name!r} give the same folder name {slug(name)!r}")


def _aware_keys() -> List[str]:
    owned = STEP_TABLES["attack"][0].grid_owned
    return [k for k in group_fields(TransferSettings, AWARE_GROUP) if k not in owned]


def _check_thief(cfg: GridConfig, a: Table, raw: Dict[str, Any], where: str) -> None:
    """Checks ``a``'s thief keys; a thief reusing a transfer set takes its attack's query settings."""
    by_label = {b.label: b for b in cfg.attacks}
    if a.at not in ("all", "least_loss"):
        raise ValueError(f"{where}: at must be 'all' or 'least_loss', got {a.at!r}")
    if isinstance(a.hurts_by, bool) or not isinstance(a.hurts_by, (int, float)) or not a.hurts_by >= 0:
        raise ValueError(f"{where}: hurts_by must be a number of accuracy points >= 0, got {a.hurts_by!r}")
    if a.transferset_from is not None:
        base = by_label.get(a.transferset_from)
        if base is None or base is a or base.transferset_from is not None or base.at != "all":
            querying_all = [b.label for b in cfg.attacks if b.transferset_from is None and b.at == "all"
                            and b is not a]
            raise ValueError(f"{where}: transferset_from must name another attack that queries the victim itself "
                             f"at all settings, one of {querying_all}, got {a.transferset_from!r}")
        aware = set(_aware_keys())
        routes = {k: _route("attack", k, k in TABLE_KEYS["attack"]) for k in raw}
        querying = sorted(k for k, route in routes.items() if route is not None and route[0] == 0 and k not in aware)
        if querying:
            raise ValueError(f"{where}: {querying} set how queries are asked, but this thief reuses the transfer "
                             f"set of {a.transferset_from!r}; only the defense-aware keys {sorted(aware)} apply")
        for key in base.step_values(0):
            if key in TABLE_KEYS["attack"]:
                a.values[key] = base.values[key]
            elif key not in aware:
                a.options[key] = base.options[key]
    if a.at == "least_loss":
        judge = a.judged_by or a.transferset_from
        if judge is None or judge not in by_label or by_label[judge].at != "all" or judge == a.label:
            raise ValueError(f"{where}: at = 'least_loss' needs judged_by (or transferset_from): the label of an "
                             f"attack run at all settings, got {judge!r}")
    elif a.judged_by is not None:
        raise ValueError(f"{where}: judged_by is only used with at = 'least_loss'")


def defense_victim(v: Table, d: DefenseSpec, where: str = "") -> Optional[Tuple[str, Table]]:
    """The folder name and recipe of the model ``d`` serves instead of the plain victim ``v``
    (``d.victim_options`` over ``v``'s settings), or None when ``d`` serves ``v`` itself."""
    if not d.victim_options:
        return None
    if not isinstance(d.victim_options, dict):
        raise ValueError(f"{where}: victim_options must be a table of train-victim settings")
    fixed = sorted({"dataset", "arch"} & set(d.victim_options))
    if fixed:
        raise ValueError(f"{where}: victim_options cannot set {fixed}: the defense serves a model of its victim's task")
    raw = {**v.values, **v.options, **d.victim_options}
    return f"{v.key}-{slug(d.label)}", _table("victim", raw, f"{where} victim_options")


def defense_settings(out: Path, v: Table, d: DefenseSpec) -> Tuple[Path, List[Tuple[Optional[Any], str]]]:
    """The folder of the model ``d`` serves for victim ``v``, and ``d``'s (value, args) settings."""
    own = defense_victim(v, d)
    ddir = out / "victims" / (own[0] if own else v.key)
    return ddir, d.settings(str(out / "victims" / f"{v.key}-proxy"), str(ddir))


def slug(v: Any) -> str:
    """The folder name of a label or setting value."""
    return "default" if v is None else re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(v))
