"""The demo's configuration compares the field's defenses and thieves, and its summary shows
the robust column, the ranking against the strongest thief and GRAD²'s metric."""

from __future__ import annotations

import pytest

from ppoison_ext.pipeline.demo import THIEVES_PATH, _with_all_thieves, config_path, run_demo, summary_markdown
from ppoison_ext.pipeline.grid import load_config, robust


def test_demo_runs_every_field_defense_at_three_settings_and_two_thieves():
    cfg = load_config(config_path())
    by_name = {}
    for d in cfg.defenses:
        key = d.name + (":" + d.args.split("target:")[1].split(",")[0] if "target:" in d.args else "")
        by_name[key] = d
    for key in ("grad2:all_ones", "grad2:min_ip", "am", "modelguard_w", "modelguard_s"):
        assert key in by_name and len(by_name[key].values) >= 3, key
    am = by_name["am"]
    assert am.victim_options["outlier_exposure"] == "FashionMNIST"  # never the thief's notMNIST
    assert "{victim}/misinformation" in am.args
    thieves = [a for a in cfg.attacks if a.transferset_from]
    assert all(a.at == "least_loss" and a.transferset_from == cfg.attacks[0].label for a in thieves)
    assert any(a.options.get("hardlabel") for a in thieves)
    assert any(a.options.get("recover") in ("ddae", "pbayes") and a.options.get("dirichlet_prior", "sparse") != "oracle"
               for a in thieves)
    # the thieves train as the naive thief does, so the robust column compares like with like
    naive = cfg.attacks[0]
    for a in thieves:
        assert (a.budgets, a.epochs, a.lr, a.momentum, a.arch) == (naive.budgets, naive.epochs, naive.lr,
                                                                   naive.momentum, naive.arch)


def test_all_attackers_config_adds_the_thieves(tmp_path):
    cfg = load_config(_with_all_thieves(config_path(), tmp_path))
    labels = [a.label for a in cfg.attacks]
    assert len(labels) == len(load_config(config_path()).attacks) + THIEVES_PATH.read_text().count("[[attack]]")
    oracle = [a for a in cfg.attacks if a.options.get("dirichlet_prior") == "oracle"]
    assert oracle and all("oracle" in a.label for a in oracle)  # the leaking thief says so in its name
    with pytest.raises(ValueError, match="attackers"):
        run_demo(tmp_path / "x", attackers="some")


def _row(attack, label, value, acc, defense=None, drop=0.0, thief_of=None, budget=100):
    return {"victim": "V", "attack": attack, "queryset": "Q", "defense": defense or label, "label": label,
            "param": None if value is None else "eps", "value": value, "defense_args": "", "budget": budget,
            "attacker_acc": acc, "attacker_acc_final": acc, "defender_acc": 99.0 - drop, "defender_acc_drop": drop,
            "l1_mean": 0.0, "l2_mean": 0.0, "kl_mean": 0.0, "victim_acc": 99.0, "l1_transfer": 0.0 if value is None
            else value, "thief_of": thief_of}


def test_summary_has_the_robust_column_ranking_and_grad2_table():
    rows = [_row("naive", "none", None, 90.0), _row("naive", "A", 0.5, 60.0, defense="a"),
            _row("naive", "A", 1.0, 40.0, defense="a", drop=3.0), _row("naive", "B", 1.0, 70.0, defense="b"),
            _row("top1", "none", None, 91.0, thief_of="naive"), _row("top1", "A", 0.5, 88.0, defense="a",
                                                                     thief_of="naive"),
            _row("top1", "B", 1.0, 65.0, defense="b", thief_of="naive")]
    res = {"rows": rows, "amplification": [], "robust": robust(rows)}
    rob = {(e["label"], e["value"]): e for e in res["robust"]}
    assert rob[("A", 0.5)]["robust"] == 88.0 and rob[("A", 0.5)]["thief"] == "top1"
    assert rob[("B", 1.0)]["robust"] == 70.0 and rob[("B", 1.0)]["thief"] == "naive"  # the naive one is best
    assert rob[("A", 1.0)]["thieves"] == []
    md = summary_markdown(res, {"machine": "m", "wall_minutes": 1.0})
    assert "robust @100 (best thief)" in md and "| A | eps=0.5 |" in md and "88.00 (top1)" in md
    ranking = [line for line in md.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
               or line.startswith("| 3 |")]
    assert [line.split("|")[2].strip() for line in ranking] == ["B", "A", "none"]  # by robust acc: 70, 88, 91
    assert "a_err@d_err+1" in md  # GRAD²'s table beside the others
