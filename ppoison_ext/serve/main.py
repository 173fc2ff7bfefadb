"""``ppoison serve VICTIM_DIR --defense NAME --defense-args "k:v,..."``: a defended victim over HTTP.

::

    ppoison serve models/victim/MNIST-lenet --defense mad \\
        --defense-args "epsilon:1.0,oracle:argmax,model_adv_proxy:models/proxy" \\
        --api-keys keys.txt --budget 10000 --log-dir serve-logs [--host 127.0.0.1 --port 8000]

With ``--detector DIR`` (``ppoison detect-calibrate``'s folder, or ``prada`` uncalibrated) each
key is watched by an extraction detector; ``--on-detect`` says how a flagged key is answered:
``log``, ``refuse`` (403) or ``defense:NAME`` (with ``--on-detect-args``). With
``--watermark-key FILE`` the defense's answers carry a DAWN watermark (``--watermark-rate``), its
marked queries recorded per key for ``ppoison verify``.

Runs :func:`~ppoison_ext.serve.app.create_app`'s app on uvicorn, one process. The defense is
seeded once from ``--seed``: a stochastic defense draws from one server-side stream in the order
batches arrive. The white-box ``*_wb`` defenses are not served.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from ..datasets import DATASETS, get_transform
from ..defenses import DAWN, DEFENSE_NAMES, WB_DEFENSES, DefenseSpec, build_defense, read_watermark_key
from ..detectors import PRADA, load_detector, parse_detector_args
from ..devices import as_device
from ..models import INPUT_SIZES
from ..modeldir import dataset_name, load_model_dir, modelfamily_for_dataset
from ..pipeline import settings
from ..pipeline.settings import CommonSettings, device_setting, setting
from .app import create_app

__all__ = ["ServeSettings", "build_app", "build_parser", "main", "SERVED_DEFENSES"]

logger = logging.getLogger(__name__)

SERVED_DEFENSES = [d for d in DEFENSE_NAMES if d not in WB_DEFENSES]


def _classes(name: Optional[str], K: int) -> List[str]:
    names = list(getattr(DATASETS.get(name or ""), "classes_list", ()) or ())
    return [str(c) for c in names] if len(names) == K else [str(k) for k in range(K)]


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
    detector: Optional[str] = setting("--detector", default=None, metavar="DIR_OR_NAME",
                                      help="a detector folder (ppoison detect-calibrate), or 'prada' "
                                           "(delta 0.9)")
    detector_args: str = setting("--detector-args", default="", metavar="STR",
                                 help='settings over the detector\'s, e.g. "latch:false"')
    on_detect: str = setting("--on-detect", default="log", metavar="ACTION",
                             help="a flagged key: log | refuse (403) | defense:NAME (default %(default)s)")
    on_detect_args: str = setting("--on-detect-args", default="", metavar="STR",
                                  help="defense arguments of --on-detect defense:NAME")
    watermark_key: Optional[str] = setting("--watermark-key", default=None, metavar="FILE",
                                           help="DAWN watermark over the defense's answers, keyed by this "
                                                "file (ppoison serve-keygen --watermark-key FILE)")
    watermark_rate: float = setting("--watermark-rate", default=0.005, metavar="R",
                                    help="fraction of queries DAWN marks (default %(default)s)")
    device_id: int = device_setting("GPU id, -1 for the CPU")

    def run(self) -> None:
        import uvicorn

        uvicorn.run(build_app(self), host=self.host, port=self.port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5)


def build_app(s: ServeSettings):
    """The victim folder's model behind the defense, as a FastAPI app (:func:`~.app.create_app`)."""
    spec = DefenseSpec.parse(s.defense, s.defense_args)
    device = as_device(s.device_id)
    torch.manual_seed(s.seed)
    model, params = load_model_dir(s.victim_dir, device=device)
    ds = dataset_name(params)
    family = modelfamily_for_dataset(ds)
    defense = build_defense(spec, model=model, logger=None, device=device)
    on_detect = s.on_detect
    if on_detect.startswith("defense:"):
        spec_other = DefenseSpec.parse(on_detect[len("defense:"):], s.on_detect_args)
        on_detect = build_defense(spec_other, model=model, logger=None, device=device)
    for d in (defense, on_detect):
        if getattr(d, "reseedable", False):
            d.reseed(s.seed)  # stochastic defenses: one server-side stream from --seed
    if s.watermark_key is not None:
        defense = DAWN(defense, key=read_watermark_key(s.watermark_key), rate=s.watermark_rate)
    detector, overrides = None, parse_detector_args(s.detector_args)
    if s.detector is not None and Path(s.detector).is_dir():
        detector = load_detector(s.detector, model, **overrides)
    elif s.detector == "prada":
        detector = PRADA(INPUT_SIZES[family], **overrides)
    elif s.detector is not None:
        raise ValueError(f"--detector: {s.detector!r} is neither a detector folder nor 'prada' (dadd and "
                         "seat need one: ppoison detect-calibrate)")
    if s.api_keys is None and s.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without --api-keys: anyone who reaches it can query", s.host)
    classes = _classes(ds, int(params["num_classes"]))
    return create_app(defense, input_shape=INPUT_SIZES[family], classes=classes,
                      info={"model": params.get("model_arch"), "dataset": ds, "model_family": family,
                            "defense": spec.name},
                      transform=get_transform(family, "test"), api_keys=s.api_keys, budget=s.budget,
                      log_dir=s.log_dir, log_every=s.log_every, durable=s.durable, device=device,
                      max_batch=s.max_batch, max_wait_ms=s.max_wait_ms, pad_multiple=s.pad_multiple,
                      max_request_images=s.max_request_images, max_body_mb=s.max_body_mb, threads=s.threads,
                      detector=detector, on_detect=on_detect)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    return settings.build_parser(ServeSettings, prog=prog)


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    return settings.run_step(ServeSettings, argv, prog=prog)


if __name__ == "__main__":
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
