"""tools/loadtest.py at tiny counts (CI smoke): the load run and the kill -9 run leave no lost
or duplicated query in the ledger and the per-key logs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="ppoison serve needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="the load test needs httpx")

from _serve_models import models  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import loadtest  # noqa: E402


def test_loadtest_smoke_and_kill(tmp_path_factory, tmp_path):
    victim_dir, proxy_dir = models(tmp_path_factory)
    out = tmp_path / "lt.json"
    rc = loadtest.main(["--victim-dir", str(victim_dir), "--proxy-dir", str(proxy_dir), "--clients", "8",
                        "--requests", "48", "--scenarios", "mad,kill", "--kill-after", "16",
                        "--work-dir", str(tmp_path), "--json", str(out)])
    rows = {r["scenario"]: r for r in json.loads(out.read_text())["scenarios"]}
    assert rc == 0
    assert rows["mad"]["answered_200"] == 48 and rows["mad"]["audit"]["committed"] == 48 + 16  # + warm-up
    kill = rows["kill"]["audit"]
    assert kill["lost_200"] == kill["duplicates"] == kill["n_problems"] == 0
    assert kill["committed"] >= kill["answered_200"] >= 16 + 16
