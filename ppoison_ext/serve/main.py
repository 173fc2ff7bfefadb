"""``ppoison serve VICTIM_DIR --defense NAME --defense-args "k:v,..."``: a defended victim over HTTP.

::

    ppoison serve models/victim/MNIST-lenet --defense mad \\
        --defense-args "epsilon:1.0,oracle:argmax,model_adv_proxy:models/proxy" \\
        --api-keys keys.txt --budget 10000 --log-dir serve-logs [--host 127.0.0.1 --port 8000]

Runs FastAPI on uvicorn, one process (see :mod:`ppoison_ext.serve.app` for the endpoints,
:mod:`ppoison_ext.serve.batcher` for micro-batching, :mod:`ppoison_ext.serve.ledger` for the
budgets and per-key query logs and their commit order). The defense is built with
:func:`~ppoison_ext.defenses.build_defense` and seeded once from ``--seed``: a client cannot
reseed it, so a stochastic defense (``rand_noise``, MAD's ``random`` oracle) served over HTTP
draws from one server-side stream in the order batches arrive. The white-box ``*_wb``
defenses (an online simulated attacker trained on the query stream) are not served.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from ..datasets import DATASETS
from ..defenses import DEFENSE_NAMES, WB_DEFENSES, DefenseSpec, build_defense
from ..modeldir import dataset_name, modelfamily_for_dataset, read_params
from ..pipeline import settings
from ..pipeline.common import resolve_device
from ..pipeline.settings import CommonSettings, device_setting, setting
from .app import ANONYMOUS, BATCH_INDEPENDENT, ServeState, create_app
from .auth import KeyStore
from .inputs import FAMILY_INPUT
from .ledger import Ledger

__all__ = ["ServeSettings", "build_state", "build_parser", "main", "SERVED_DEFENSES"]

logger = logging.getLogger(__name__)

SERVED_DEFENSES = [d for d in DEFENSE_NAMES if d not in WB_DEFENSES]
_PRIVATE_ARGS = ("model_adv_proxy", "out_path", "log_prefix")


def _classes(name: Optional[str], K: int) -> List[str]:
    cls = DATASETS.get(name or "")
    names = list(getattr(cls, "classes_list", ()) or ())
    return [str(c) for c in names] if len(names) == K else [str(k) for k in range(K)]


def _batch_independent(name: str, defense) -> bool:
    if name not in BATCH_INDEPENDENT:
        return False
    if name == "mad":
        if getattr(defense, "oracle", None) == "random":
            return False
        proxy = getattr(defense, "proxy", None)
        if proxy is not None and proxy.training and any(
                isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in proxy.modules()):
            return False
    return True


@dataclass(kw_only=True)
class ServeSettings(CommonSettings):
    """Serve a defended victim over HTTP (FastAPI on uvicorn) with micro-batching, API keys,
    per-key budgets and query logs."""

    victim_dir: str = setting(metavar="VICTIM_DIR", help="victim folder (params.json + checkpoint)")
    defense: str = setting("--defense", default="none", choices=SERVED_DEFENSES, help="defense: %(choices)s")
    defense_args: str = setting("--defense-args", default="", metavar="STR", help='"k1:v1,k2:v2,..."')
    host: str = setting("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    port: int = setting("--port", default=8000, help="port (default %(default)s; 0 picks a free one)")
    max_batch: int = setting("--max-batch", default=64, metavar="N",
                             help="images per defense call (micro-batch); 1 turns batching off")
    max_wait_ms: float = setting("--max-wait-ms", default=2.0, metavar="MS",
                                 help="how long a batch's first request waits for others")
    pad_multiple: int = setting("--pad-multiple", default=16, metavar="N",
                                help="pad batches to a multiple of N rows (bitwise batch independence)")
    max_request_images: int = setting("--max-request-images", default=256, metavar="N",
                                      help="images per request (more: 413)")
    max_body_mb: float = setting("--max-body-mb", default=32.0, metavar="MB", help="request body limit (413)")
    api_keys: Optional[str] = setting("--api-keys", default=None, metavar="FILE",
                                      help="file of 'KEY_ID SHA256_HEX [BUDGET]' lines (no file: no auth)")
    budget: Optional[int] = setting("--budget", default=None, metavar="N",
                                    help="queries per key (default: unlimited)")
    log_dir: str = setting("--log-dir", default="serve-logs", metavar="DIR",
                           help="ledger.sqlite and the per-key query logs")
    log_every: int = setting("--log-every", default=1000, metavar="N", help="distance-log row period")
    durable: bool = setting("--durable", default=False, help="fsync every commit (survive power loss)")
    threads: Optional[int] = setting("--threads", default=None, metavar="N", help="torch threads")
    device_id: int = device_setting("GPU id, -1 for the CPU")

    def run(self) -> None:
        import uvicorn

        state = build_state(self)
        uvicorn.run(create_app(state), host=self.host, port=self.port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5)


def build_state(s: ServeSettings) -> ServeState:
    """Loads the victim and defense, the keys and the ledger: the server without its HTTP layer."""
    for name in ("max_batch", "pad_multiple", "max_request_images", "log_every"):
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.max_wait_ms < 0:
        raise ValueError(f"--max-wait-ms must be >= 0, got {s.max_wait_ms}")
    if s.budget is not None and s.budget < 0:
        raise ValueError(f"--budget must be >= 0, got {s.budget}")
    if s.defense in WB_DEFENSES:
        raise ValueError(f"{s.defense} is not served (its online attacker is trained on the query stream)")
    spec = DefenseSpec.parse(s.defense, s.defense_args)
    params = read_params(s.victim_dir)
    ds = dataset_name(params)
    family = modelfamily_for_dataset(ds)
    if family not in FAMILY_INPUT:
        raise ValueError(f"no input format known for model family {family!r}")
    mode, input_shape = FAMILY_INPUT[family]
    device = resolve_device(s.device_id)
    torch.manual_seed(s.seed)
    defense = build_defense(spec, victim_dir=s.victim_dir, logger=None, device=device)
    if hasattr(defense, "seed"):
        defense.reseed(s.seed)  # stochastic defenses: one server-side stream from --seed
    keys = KeyStore.load(s.api_keys) if s.api_keys else None
    if keys is None and s.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without --api-keys: anyone who reaches it can query", s.host)
    budgets = keys.budgets(s.budget) if keys is not None else {ANONYMOUS: s.budget}
    ledger = Ledger(Path(s.log_dir), budgets, log_every=s.log_every, durable=s.durable)
    from ..datasets import get_transform

    K = int(params["num_classes"])
    info = {
        "model": params.get("model_arch"), "dataset": ds, "model_family": family, "num_classes": K,
        "classes": _classes(ds, K), "input_shape": list(input_shape), "input_dtype": "float32",
        "defense": spec.name, "batch_independent": _batch_independent(spec.name, defense),
        "max_batch": s.max_batch, "max_request_images": s.max_request_images,
    }
    assert not any(k in info for k in _PRIVATE_ARGS)
    return ServeState(defense=defense, ledger=ledger, keys=keys, info=info, input_shape=input_shape,
                      image_mode=mode, transform=get_transform(family, "test"), device=device,
                      max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000.0, pad_multiple=s.pad_multiple,
                      max_request_images=s.max_request_images, max_body_bytes=int(s.max_body_mb * (1 << 20)),
                      torch_threads=s.threads)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    return settings.build_parser(ServeSettings, prog=prog)


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    return settings.run_step(ServeSettings, argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
