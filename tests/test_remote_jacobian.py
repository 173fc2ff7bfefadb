"""``ppoison jacobian`` against a served victim's URL (the RemoteBlackbox path), tiny budget,
bounded in time (server start ≤ 60 s, each HTTP request ≤ 60 s)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="ppoison serve needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="RemoteBlackbox needs httpx")

from _serve_models import mad_args, models  # noqa: E402
from ppoison_ext.attacks.transferset import load_transferset  # noqa: E402
from ppoison_ext.defenses import read_queries  # noqa: E402
from ppoison_ext.pipeline import jacobian  # noqa: E402
from ppoison_ext.serve.auth import append_key  # noqa: E402
from ppoison_ext.serve.process import ServerProcess  # noqa: E402


def test_jacobian_cli_against_a_url(tmp_path_factory):
    victim_dir, proxy_dir = models(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("remote-jacobian")
    key_file = tmp / "keys.txt"
    (tmp / "attacker.key").write_text(append_key(key_file, "attacker") + "\n")
    srv_args = [victim_dir, "--defense", "mad", "--defense-args", mad_args(proxy_dir), "--api-keys", key_file,
                "--budget", "24", "--log-dir", tmp / "logs", "--max-wait-ms", "0"]
    common = ["--out_dir", str(tmp / "jb"), "--testset", "MNIST", "--queryset", "MNIST", "--seedsize", "8",
              "--budget", "24", "--train_epochs", "1", "--final_train_epochs", "1", "--test_subset", "50",
              "-d", "-1", "-w", "0", "--no-progress"]
    with ServerProcess(srv_args, log_path=tmp / "server.out", start_timeout=60) as srv:
        # a DEFENSE other than the server's, or defense args with a URL, are refused
        assert jacobian.main(["jbda", srv.url, "none", "--api-key-file", str(tmp / "attacker.key"),
                              *common]) == 2
        assert jacobian.main(["jbda", srv.url, "mad", "epsilon:0.5", "--api-key-file",
                              str(tmp / "attacker.key"), *common]) == 2
        assert jacobian.main(["jbda", srv.url, "--api-key-file", str(tmp / "attacker.key"), *common]) == 0
    params = json.loads((tmp / "jb" / "params_transfer.json").read_text())
    # (the CLI records its own arguments: "defense" stays as given, None here)
    assert params["queries"] == 24 and params["victim_model_dir"] == srv.url
    ts = load_transferset(tmp / "jb")
    assert len(ts) == 24 and ts.num_classes == 10
    served = read_queries(tmp / "logs" / "attacker", "serve")  # the whole budget, logged server-side
    assert served.shape[0] == 24
    assert served[:, 10:20].astype(np.float32).tobytes() == np.asarray(ts.y, dtype=np.float32).tobytes()
