"""Typed step settings (ppoison_ext.pipeline.settings): the generated parsers, the checks of
mappings, the entry-point wrapper, and the grid tables checked by the step dataclasses."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from ppoison_ext.pipeline import attacker, evaluate, grid, jacobian, settings, transfer, victim
from ppoison_ext.pipeline.settings import CommonSettings, check_value, from_dict, setting

CONFIGS = Path(grid.__file__).resolve().parents[1] / "configs"


@dataclass(kw_only=True)
class Toy(CommonSettings):
    """A toy step."""

    name: str = setting(metavar="NAME", help="a positional")
    out_dir: str = setting("--out_dir", help="required flag")
    batch_size: int = setting("-b", "--batch-size", default=64, metavar="N", help="alias and dest")
    limit: Optional[int] = setting("--limit", default=None)
    rate: float = setting("--rate", default=0.5)
    kind: str = setting("--kind", default="a", choices=lambda: ["a", "b"])
    fast: bool = setting("--fast", default=False, group="extra")
    resume: bool = setting("--resume", default=True)
    error: str = setting("--error", default="")

    def run(self):
        if self.error == "value":
            raise ValueError("bad value for the toy")
        if self.error == "missing":
            raise FileNotFoundError("no such toy file")
        if self.error == "timeout":
            raise TimeoutError("the toy timed out")
        return self


def test_parser_from_dataclass():
    p = settings.build_parser(Toy, prog="toy")
    s = settings.from_args(Toy, p.parse_args(["x", "--out_dir", "o"]))
    assert s == Toy(name="x", out_dir="o")
    assert (s.batch_size, s.limit, s.rate, s.kind, s.fast, s.resume, s.seed, s.data_root, s.no_progress) == \
        (64, None, 0.5, "a", False, True, 42, None, False)
    s = settings.from_args(Toy, p.parse_args(["y", "--out_dir", "o", "-b", "8", "--limit", "3", "--rate", "2",
                                             "--kind", "b", "--fast", "--no-resume", "--seed", "7",
                                             "--data-root", "D", "--no-progress"]))
    assert (s.batch_size, s.limit, s.rate, s.kind, s.fast, s.resume, s.seed, s.data_root, s.no_progress) == \
        (8, 3, 2.0, "b", True, False, 7, "D", True)
    assert type(s.rate) is float and type(s.limit) is int
    with pytest.raises(SystemExit) as e:
        p.parse_args(["x"])  # --out_dir is required
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        p.parse_args(["x", "--out_dir", "o", "--kind", "c"])
    text = p.format_help()
    assert "A toy step." in text and "extra:" in text and "--batch-size" in text
    # the common flags come last, in the parser and in the params record
    assert [a.dest for a in p._actions][-3:] == ["data_root", "seed", "no_progress"]
    assert list(s.params())[-2:] == ["data_root", "seed"] and "no_progress" not in s.params()


def test_check_value_and_from_dict():
    assert from_dict(Toy, {"name": "x", "out_dir": "o", "rate": 1}, "t").rate == 1
    with pytest.raises(ValueError, match=r"t: unknown keys \['batchsize'\]"):
        from_dict(Toy, {"name": "x", "out_dir": "o", "batchsize": 3}, "t")
    with pytest.raises(ValueError, match="t: missing required keys \\['out_dir'\\]"):
        from_dict(Toy, {"name": "x"}, "t")
    with pytest.raises(ValueError, match=r"t: batch_size must be int, got '3' \(str\)"):
        check_value(Toy, "batch_size", "3", "t")
    with pytest.raises(ValueError, match="must be int"):
        check_value(Toy, "batch_size", True, "t")
    with pytest.raises(ValueError, match="t: limit must be int or None"):
        check_value(Toy, "limit", 1.5, "t")
    assert check_value(Toy, "limit", None, "t") is None
    with pytest.raises(ValueError, match=r"t: kind must be one of \['a', 'b'\], got 'c'"):
        check_value(Toy, "kind", "c", "t")
    with pytest.raises(ValueError, match="t: bs must be int"):
        check_value(Toy, "batch_size", "x", "t", key="bs")


@pytest.mark.parametrize("error, message", [("value", "bad value for the toy"),
                                            ("missing", "no such toy file"),
                                            ("timeout", "the toy timed out")])
def test_run_step_maps_user_errors_to_exit_2(error, message, caplog):
    with caplog.at_level(logging.ERROR):
        assert settings.run_step(Toy, ["x", "--out_dir", "o", "--error", error], prog="toy") == 2
    assert any(r.name == __name__ and r.getMessage() == message for r in caplog.records)
    assert settings.run_step(Toy, ["x", "--out_dir", "o"], prog="toy") == 0
    with pytest.raises(SystemExit) as e:
        settings.run_step(Toy, ["x", "--bogus"], prog="toy")
    assert e.value.code == 2


# every step: today's flags, dests, defaults and types (tests and scripts call main(argv) with them)
STEP_FLAGS = [
    (victim.VictimSettings, ["MNIST", "lenet", "-o", "O", "-d", "-1", "-b", "8", "-e", "2", "--lr", "0.5",
                             "--momentum", "0.1", "--log-interval", "3", "--resume", "auto", "--lr-step", "4",
                             "--lr-gamma", "0.2", "-w", "0", "--train_subset", "5", "--test_subset", "6",
                             "--pretrained", "P", "--weighted-loss"],
     dict(dataset="MNIST", model_arch="lenet", out_path="O", device_id=-1, batch_size=8, epochs=2, lr=0.5,
          momentum=0.1, log_interval=3, resume="auto", lr_step=4, lr_gamma=0.2, num_workers=0, train_subset=5,
          test_subset=6, pretrained="P", weighted_loss=True)),
    (attacker.AttackerSettings, ["D", "lenet", "MNIST", "--budgets", "5,10", "-b", "8", "--argmaxed",
                                 "--optimizer_choice", "adam", "--resume", "none", "-w", "1"],
     dict(model_dir="D", model_arch="lenet", testdataset="MNIST", budgets="5,10", batch_size=8, argmaxed=True,
          optimizer_choice="adam", resume="none", num_workers=1, epochs=100, lr=0.01, lr_step=60,
          log_interval=50)),
    (evaluate.EvalSettings, ["V", "mad", "epsilon:0.5", "--out_dir", "O", "--batch_size", "9", "-w", "0"],
     dict(victim_model_dir="V", defense="mad", defense_args="epsilon:0.5", out_dir="O", batch_size=9,
          nworkers=0, device_id=0, test_subset=None)),
    (jacobian.JacobianSettings, ["jbtop3", "V", "none", "", "--out_dir", "O", "--testset", "MNIST",
                                 "--queryset", "MNIST", "--rho", "none", "--kappa", "4", "--tau", "None",
                                 "--orig_clamp"],
     dict(policy="jbtop3", defense="none", defense_args="", rho=None, kappa=4, tau=None, orig_clamp=True,
          budget=10000, seedsize=100, sigma=3, train_epochs=20, final_train_epochs=100, batch_size=64,
          query_batch_size=64, nworkers=10, model_adv=None)),
    (transfer.TransferSettings, ["adaptive", "V", "topk", "topk:1", "--out_dir", "O", "--queryset", "MNIST",
                                 "--export-pickle", "--no-resume", "--num-shards", "2", "--shard-id", "1",
                                 "--merge-timeout", "3", "--online-lr", "0.5", "--reward", "div"],
     dict(policy="adaptive", export_pickle_file=True, resume=False, num_shards=2, shard_id=1,
          merge_timeout=3.0, online_lr=0.5, reward="div", batch_size=256, qpi=1, nworkers=10, budget=None,
          alpha=0.1, delta=25)),
]


@pytest.mark.parametrize("cls, argv, expected", STEP_FLAGS, ids=lambda x: getattr(x, "__name__", ""))
def test_step_flags(cls, argv, expected):
    module = {victim.VictimSettings: victim, attacker.AttackerSettings: attacker,
              evaluate.EvalSettings: evaluate, jacobian.JacobianSettings: jacobian,
              transfer.TransferSettings: transfer}[cls]
    s = settings.from_args(cls, module.build_parser("p").parse_args(argv + ["--seed", "3", "--no-progress"]))
    for k, v in expected.items():
        assert getattr(s, k) == v and type(getattr(s, k)) is type(v), (k, getattr(s, k), v)
    assert (s.seed, s.no_progress, s.data_root) == (3, True, None)


def test_pipeline_does_not_import_the_cli():
    for path in Path(settings.__file__).parent.glob("*.py"):
        text = path.read_text()
        # the CLI module itself; ``..client`` (RemoteBlackbox) is a lower layer
        assert not re.search(r"from \.\.cli\b|ppoison_ext\.cli\b", text), path


# --------------------------------------------------------------------------------------------
# the grid's tables


def _grid_toml(tmp_path, victim_extra="", attack_extra=""):
    text = (CONFIGS / "mnist_fast.toml").read_text()
    text = text.replace("test_subset = 2000\n\n[[attack]]", f"test_subset = 2000\n{victim_extra}\n[[attack]]")
    text = text.replace("budgets = [2000]\n", f"budgets = [2000]\n{attack_extra}\n", 1)  # the first attack
    path = tmp_path / "g.toml"
    path.write_text(text)
    return path


def test_grid_tables_are_checked_by_the_step_settings(tmp_path):
    path = _grid_toml(tmp_path, "weighted_loss = true", 'reward = "div"\noptimizer_choice = "adam"')
    cfg = grid.load_config(path)
    assert cfg.victims[0].options == {"weighted_loss": True}
    assert cfg.attacks[0].options == {"reward": "div", "optimizer_choice": "adam"}
    for victim_extra, attack_extra, message in [
            ("epochz = 3", "", r"\[\[victim\]\] #1: unknown keys \['epochz'\]"),
            ("weighted_loss = 1", "", "weighted_loss must be bool"),
            ("", "lr_gamma = 'x'", r"\[\[attack\]\] #1: lr_gamma must be float"),
            ("", 'optimizer_choice = "adamx"', "optimizer_choice must be one of"),
            ("num_workers = 2", "", "'num_workers' is set by the grid"),
            ("", "seed = 1", "'seed' is set by the grid"),
            ("", 'model_arch = "lenet"', "'model_arch' is called 'arch' here")]:
        with pytest.raises(ValueError, match=message):
            grid.load_config(_grid_toml(tmp_path, victim_extra, attack_extra))
    bad = (CONFIGS / "mnist_fast.toml").read_text().replace("epochs = 1\n", 'epochs = "1"\n', 1)
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(ValueError, match="epochs must be int"):
        grid.load_config(tmp_path / "bad.toml")


def _dry_run(monkeypatch, cfg_path, out):
    """run_grid with every step replaced by a recorder: the settings each step got, by folder."""
    ran = {}

    def record(self):
        folder = getattr(self, "out_dir", None) or getattr(self, "model_dir", None) or self.out_path
        ran[(type(self).__name__, str(Path(folder).relative_to(out)))] = self
        if isinstance(self, evaluate.EvalSettings):
            return {"accuracy": 90.0, "loss": 0.0, "n": 1, "log": ""}
        return None

    for cls in (victim.VictimSettings, evaluate.EvalSettings, transfer.TransferSettings,
                attacker.AttackerSettings):
        monkeypatch.setattr(cls, "run", record)
    monkeypatch.setattr(victim, "make_proxy", lambda *a, **k: None)
    grid.run_grid(cfg_path, out, jobs=1, progress=False)
    markers = {str(p.parent.relative_to(out)): json.loads(p.read_text())["fingerprint"]
               for p in out.rglob("done.json")}
    return ran, markers


def test_grid_fingerprints_of_the_shipped_configs_are_unchanged(monkeypatch, tmp_path):
    ran, markers = _dry_run(monkeypatch, CONFIGS / "mnist_fast.toml", tmp_path / "g")
    # measured before the steps' settings existed: cells finished then are not rerun
    assert markers["victims/MNIST-lenet"] == "f65b355cf28df6ac"
    assert markers["victims/MNIST-lenet-proxy"] == "0f8550620d7c130b"
    assert markers["eval/MNIST-lenet/none/default"] == "c3b7b61176bf3c04"
    assert markers["attack/MNIST-lenet/knockoff-random/none/default/transfer"] == "b954cb7091c3ecbc"
    assert markers["attack/MNIST-lenet/knockoff-random/none/default"] == "35003df444deff66"
    v = ran[("VictimSettings", "victims/MNIST-lenet")]
    assert (v.dataset, v.model_arch, v.epochs, v.lr, v.momentum, v.batch_size, v.train_subset, v.test_subset,
            v.resume, v.num_workers, v.device_id, v.seed, v.no_progress) == \
        ("MNIST", "lenet", 1, 0.05, 0.9, 128, 30000, 2000, "auto", 0, -1, 42, True)
    t = ran[("TransferSettings", "attack/MNIST-lenet/knockoff-random/none/default")]
    assert (t.policy, t.queryset, t.budget, t.batch_size, t.nworkers, t.resume, t.defense,
            t.defense_args) == ("random", "notMNIST", 2000, 1000, 0, True, "none", "")
    a = ran[("AttackerSettings", "attack/MNIST-lenet/knockoff-random/none/default")]
    assert (a.model_arch, a.testdataset, a.budgets, a.batch_size, a.epochs, a.lr, a.momentum, a.lr_step,
            a.test_subset, a.num_workers, a.resume) == \
        ("lenet", "MNIST", "2000", 64, 4, 0.02, 0.9, 60, 2000, 0, "auto")
    e = ran[("EvalSettings", "eval/MNIST-lenet/none/default")]
    assert (e.batch_size, e.test_subset, e.nworkers, e.seed) == (1000, 2000, 0, 42)


def test_grid_passes_extra_step_settings_and_fingerprints_them(monkeypatch, tmp_path):
    path = _grid_toml(tmp_path, "weighted_loss = true", 'optimizer_choice = "adam"')
    ran, markers = _dry_run(monkeypatch, path, tmp_path / "g")
    assert ran[("VictimSettings", "victims/MNIST-lenet")].weighted_loss is True
    cell = "attack/MNIST-lenet/knockoff-random/none/default"
    assert ran[("AttackerSettings", cell)].optimizer_choice == "adam"
    assert markers["victims/MNIST-lenet"] != "f65b355cf28df6ac"
    assert markers[cell] != "35003df444deff66"
    path = _grid_toml(tmp_path, "", 'optimizer_choice = "adam"')
    _, markers = _dry_run(monkeypatch, path, tmp_path / "g2")
    # an attacker setting: the victim, the evaluation and the transfer set are kept
    assert markers["victims/MNIST-lenet"] == "f65b355cf28df6ac"
    assert markers["eval/MNIST-lenet/none/default"] == "c3b7b61176bf3c04"
    assert markers[cell + "/transfer"] == "b954cb7091c3ecbc" and markers[cell] != "35003df444deff66"
