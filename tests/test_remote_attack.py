"""Attacks over HTTP: a Knockoff transfer set built against a real ``ppoison serve`` process
equals, bit for bit, the one built in-process with the same defense and seeds."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="ppoison serve needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="RemoteBlackbox needs httpx")

from _serve_models import mad_args, models  # noqa: E402
from ppoison_ext.attacks.transferset import load_transferset  # noqa: E402
from ppoison_ext.client import RemoteBlackbox  # noqa: E402
from ppoison_ext.pipeline import transfer  # noqa: E402
from ppoison_ext.serve.auth import append_key  # noqa: E402
from ppoison_ext.serve.process import ServerProcess  # noqa: E402


def test_knockoff_over_http_is_bit_for_bit(tmp_path_factory):
    """MAD argmax with a proxy: deterministic, so the server needs no per-batch reseeding."""
    victim_dir, proxy_dir = models(tmp_path_factory)
    defense, args = "mad", mad_args(proxy_dir)
    tmp = tmp_path_factory.mktemp(f"remote-{defense}")
    key_file = tmp / "keys.txt"
    (tmp / "attacker.key").write_text(append_key(key_file, "attacker") + "\n")
    common = dict(queryset="MNIST", budget=160, batch_size=32, device_id=-1, nworkers=0, seed=3, progress=False)
    local = transfer.transfer("random", victim_dir, defense, args, out_dir=tmp / "local", **common)
    srv_args = [victim_dir, "--defense", defense, "--defense-args", args, "--api-keys", key_file,
                "--log-dir", tmp / "logs", "--max-wait-ms", "0"]
    with ServerProcess(srv_args, log_path=tmp / "server.out") as srv:
        rc = transfer.main(["random", srv.url, "--api-key-file", str(tmp / "attacker.key"), "--out_dir",
                            str(tmp / "remote"), "--queryset", "MNIST", "--budget", "160", "--batch_size", "32",
                            "-d", "-1", "-w", "0", "--seed", "3", "--no-progress"])
        assert rc == 0
        with RemoteBlackbox(srv.url, api_key=(tmp / "attacker.key").read_text().strip()) as bb:
            assert bb.info["budget_remaining"] is None and bb.num_classes == 10
        with pytest.raises(SystemExit):  # a DEFENSE other than the server's is refused
            transfer.main(["random", srv.url, "no-such-defense"])
        assert transfer.main(["random", srv.url, "none", "--api-key-file", str(tmp / "attacker.key"),
                              "--out_dir", str(tmp / "wrong"), "--queryset", "MNIST", "--budget", "8",
                              "-d", "-1", "-w", "0", "--no-progress"]) == 2
    a, b = load_transferset(local), load_transferset(tmp / "remote")
    assert len(a) == len(b) == 160
    assert np.array_equal(np.asarray(a.indices), np.asarray(b.indices))
    ya, yb = np.asarray(a.y), np.asarray(b.y)
    assert ya.dtype == yb.dtype and ya.tobytes() == yb.tobytes()
    from ppoison_ext.defenses import read_queries

    served = read_queries(tmp / "logs" / "attacker", "serve")  # the defender's audit log
    assert served.shape[0] == 160 and served[:, 10:20].tobytes() == yb.astype(np.float32).tobytes()
