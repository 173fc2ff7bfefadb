"""Grid thieves that reuse another attack's transfer set (Top-1, D-DAE+), run at each defense's
setting of least defender loss that hurts the naive thief; a defense serving its own model
(Adaptive Misinformation's Outlier-Exposure defender); one training per distinct content."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tiny_grid
from ppoison_ext.attacks.transferset import load_transferset
from ppoison_ext.pipeline import attacker
from ppoison_ext.pipeline.grid import AMPLIFICATION_DROPS, load_config, run_grid

THIEF_TABLES = f"""
[[attack]]
label = "top-1 thief"
transferset_from = "knockoff-random"
at = "least_loss"
hardlabel = true
{tiny_grid.ATTACKER_TRAINING}
[[attack]]
label = "D-DAE+ thief"
transferset_from = "knockoff-random"
at = "least_loss"
recover = "ddae"
table_size = 2000
recover_epochs = 3
{tiny_grid.ATTACKER_TRAINING}"""
DEFENSES = """
[[defense]]
label = "none"
name = "none"
args = ""

[[defense]]
label = "top-1"
name = "topk"
args = "topk:1,rounding:0"

[[defense]]
label = "reverse sigmoid"
name = "reverse_sigmoid"
param = "beta"
values = [0.5, 1.0]
args = "beta:{value},gamma:0.1"

[[defense]]
label = "MAD-argmax"
name = "mad"
param = "epsilon"
values = [2.0]
args = "epsilon:{value},objmax:True,oracle:argmax,model_adv_proxy:{proxy}"

[[defense]]
label = "AM"
name = "am"
param = "tau"
values = [0.5]
args = "tau:{value},model_misinfo:{victim}/misinformation"
victim_options = {outlier_exposure = "FashionMNIST", oe_lambda = 1.0, epochs = 1}
"""
GRID = tiny_grid.HEAD + THIEF_TABLES + DEFENSES
NAIVE, THIEVES = "knockoff-random", ("top-1 thief", "D-DAE+ thief")
SLUG = {"top-1 thief": "top-1_thief", "D-DAE+ thief": "D-DAE+_thief"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("thieves")
    cfg = root / "grid.toml"
    cfg.write_text(GRID)
    res = run_grid(cfg, root / "run", progress=False)
    return root / "run", res


def _cells(run: Path, attack: str):
    base = run / "attack" / "MNIST-lenet" / attack
    return sorted(str(p.parent.relative_to(base)) for p in base.glob("*/*/done.json"))


def _expected_choice(rows, hurts_by=1.0):
    """The settings the thieves should run at, by enumeration: for every defense, every setting
    that hurts, ranked by the first allowed drop it fits in, then by the naive accuracy."""
    rs = [r for r in rows if r["attack"] == NAIVE and r["budget"] == 400]
    base = next(r for r in rs if r["defense"] == "none")["attacker_acc"]
    out = {"none/default"}
    for label in {r["label"] for r in rs if r["defense"] != "none"}:
        ranked = []
        for r in rs:
            if r["label"] != label or r["attacker_acc"] > base - hurts_by:
                continue
            fits = [i for i, d in enumerate(AMPLIFICATION_DROPS) if r["defender_acc_drop"] <= d]
            if fits:
                ranked.append((fits[0], r["attacker_acc"], r["value"]))
        if ranked:
            v = min(ranked)[2]
            out.add(f"{label.replace(' ', '_')}/{'default' if v is None else v}")
    return sorted(out)


def test_thieves_run_at_the_least_loss_settings_only(grid):
    run, res = grid
    assert len(_cells(run, NAIVE)) == 6  # none, top-1, RS x2, MAD-argmax, AM
    expected = _expected_choice(res["rows"])
    assert "none/default" in expected and len(expected) >= 2
    for thief in THIEVES:
        assert _cells(run, SLUG[thief]) == expected


def test_thieves_send_no_queries_and_see_the_naive_answers(grid):
    run, _ = grid
    for thief in THIEVES:
        for cell in _cells(run, SLUG[thief]):
            folder = run / "attack" / "MNIST-lenet" / SLUG[thief] / cell
            source = run / "attack" / "MNIST-lenet" / NAIVE / cell
            assert not list(folder.glob("queriestransfer.*"))  # no query log: nothing was asked
            ts, raw = load_transferset(folder), load_transferset(source)
            assert torch.equal(ts.indices, raw.indices)
            assert (folder / "transferset.x.u8").read_bytes() == (source / "transferset.x.u8").read_bytes()
            if thief == "top-1 thief":
                assert torch.equal(ts.y, torch.nn.functional.one_hot(raw.y.argmax(1), 10).float())
            else:
                assert torch.allclose(ts.y.sum(1), torch.ones(len(ts)), atol=1e-4)


def test_a_copied_attacker_is_the_one_training_would_give(grid, tmp_path):
    run, _ = grid
    copies = [p.parent for p in (run / "attack").rglob("done.json") if "trained_in" in json.loads(p.read_text())]
    # the Top-1 thief of the undefended victim sees exactly the top-1 defense's labels
    assert any(p.parts[-3:] == (SLUG["top-1 thief"], "none", "default") for p in copies)
    for folder in copies:
        source = Path(json.loads((folder / "done.json").read_text())["trained_in"])
        for name in ("transferset.x.u8", "transferset.y.f32", "transferset.index.i64"):
            assert (folder / name).read_bytes() == (source / name).read_bytes(), name
    folder = copies[0]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for f in folder.glob("transferset.*"):
        shutil.copy(f, fresh / f.name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the grid's workers: the same reduction order, the same bits
    try:
        attacker.train_attacker(fresh, "lenet", "MNIST", "200,400", device=-1, epochs=3, lr=0.02, momentum=0.9,
                                test_subset=300, progress=False, seed=7)
    finally:
        torch.set_num_threads(threads)
    for b in (200, 400):
        cols = lambda p: [line.split("\t")[1:] for line in p.read_text().splitlines()[1:]]  # noqa: E731
        assert cols(fresh / f"train.{b}.log.tsv") == cols(folder / f"train.{b}.log.tsv")


def test_robust_is_the_best_thief_at_each_setting(grid):
    _, res = grid
    rows = [r for r in res["rows"] if r["budget"] == 400]
    assert len(res["robust"]) == 6
    for e in res["robust"]:
        accs = {r["attack"]: r["attacker_acc"] for r in rows if r["label"] == e["label"] and r["value"] == e["value"]}
        assert e["naive"] == accs[NAIVE]
        assert e["robust"] == max(accs.values()) and accs[e["thief"]] == e["robust"]
        assert sorted(e["thieves"]) == sorted(a for a in accs if a != NAIVE)


def test_a_defense_serves_its_own_model(grid):
    run, res = grid
    oe = run / "victims" / "MNIST-lenet-AM"
    params = json.loads((oe / "params.json").read_text())
    assert params["outlier_exposure"] == "FashionMNIST" and params["epochs"] == 1
    assert (oe / "misinformation" / "params.json").is_file()
    ev = json.loads((run / "eval" / "MNIST-lenet" / "AM" / "0.5" / "params_evalbbox.json").read_text())
    assert Path(ev["victim_model_dir"]) == oe
    am = [r for r in res["rows"] if r["label"] == "AM"]
    none = next(r for r in res["rows"] if r["defense"] == "none")
    assert am and all(r["defense_args"] == "tau:0.5,model_misinfo:{victim}/misinformation" for r in am)
    # the loss is against the plain victim, the model AM's defender replaces
    assert all(r["defender_acc_drop"] == pytest.approx(none["victim_acc"] - r["defender_acc"]) for r in am)


def test_rerun_trains_nothing(grid):
    run, _ = grid
    markers = {p: p.stat().st_mtime_ns for p in run.rglob("done.json")}
    run_grid(run.parent / "grid.toml", run, progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("done.json")} == markers


@pytest.mark.parametrize("edit, match", [
    (('transferset_from = "knockoff-random"\nat', 'transferset_from = "nobody"\nat'), "transferset_from"),
    (("hardlabel = true", "hardlabel = true\nqpi = 3"), "qpi"),
    (('at = "least_loss"\nhardlabel', 'at = "sometimes"\nhardlabel'), "at must be"),
    (("oe_lambda = 1.0,", "oe_lambda = 1.0, dataset = 'CIFAR10',"), "victim_options cannot set"),
    (("oe_lambda = 1.0,", "oe_lambda = 'lots',"), "oe_lambda"),
    (('label = "D-DAE+ thief"', 'label = "top-1 thief"'), "attack labels must be unique"),
    (('label = "D-DAE+ thief"', 'label = "top-1_thief"'), "give the same folder name"),
    (("values = [0.5, 1.0]", "values = [0.5, '0.5']"), "give the same folder name"),
])
def test_bad_thief_and_variant_keys_are_named(tmp_path, edit, match):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(GRID.replace(*edit, 1))
    with pytest.raises(ValueError, match=match):
        load_config(cfg)
