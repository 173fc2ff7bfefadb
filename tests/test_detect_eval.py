"""``ppoison detect-eval`` end to end at small sizes (a LeNet trained for one epoch on 2,000 MNIST
images; 150-query benign accounts, 160-query attacks): every detector, account, sybil split and
clone appears in the results, the tables and the ROC figure are written, and the counts agree."""

from _serve_models import models
from ppoison_ext.pipeline.detect_eval import DetectEvalSettings, auc


def test_detect_eval_small(tmp_path_factory, tmp_path):
    victim_dir, _ = models(tmp_path_factory)
    res = DetectEvalSettings.of(str(victim_dir), out=str(tmp_path), budget=160, account_size=150,
                                device_id=-1).run()
    assert set(res["detectors"]) == {"prada", "dadd", "seat"}
    attacks = ["knockoff-0", "knockoff-1", "knockoff-2", "jbda", "jbtop3", "mixer"]
    for name, rows in res["accounts"].items():
        assert set(rows) == {f"benign{i}" for i in range(10)} | {"non-iid"} | set(attacks)
        assert all(r["queries"] == (160 if a in attacks else 150) for a, r in rows.items())
        for a, r in rows.items():
            assert r["flagged"] == (r["flagged_at"] is not None) and (r["flagged_at"] or 1) <= r["queries"]
        for attack in attacks:
            answered = res["sybil"][name][attack]
            assert answered[1] == (rows[attack]["flagged_at"] - 1 if rows[attack]["flagged"] else 160)
            assert all(0 <= answered[k] <= 160 for k in (5, 20))
    for row in res["clones"].values():
        assert len(row) == 8 and all(0.0 <= v <= 100.0 for v in row.values())
    assert (tmp_path / "roc.png").stat().st_size > 0 and (tmp_path / "results.json").exists()
    assert "benign queries refused" in (tmp_path / "detect_eval.md").read_text()


def test_auc():
    assert auc([0.0, 1.0], [2.0, 3.0]) == 1.0 and auc([1.0], [1.0]) == 0.5 and auc([2.0], [1.0]) == 0.0
