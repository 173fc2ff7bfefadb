"""Extraction detectors for a victim: ``ppoison detect-calibrate VICTIM_DIR --detector NAME --fpr F
--out DIR`` fits one (:mod:`ppoison_ext.detectors`) and writes its folder, for ``ppoison serve
--detector DIR`` and ``ppoison detect-eval``.

Benign data never seen in evaluation: the victim's test split is cut in two halves by a fixed
permutation (:func:`benign_halves`, seed 0); calibration uses the first half only, as accounts of
``--account-size`` queries in order; ``detect-eval`` measures on the second. D-ADD's reference
statistics and SEAT's encoder come from the victim's training split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from ..datasets import get_dataset, get_transform
from ..datasets._common import in_memory
from ..detectors import DETECTORS, Detector, parse_detector_args
from ..devices import as_device
from ..modeldir import dataset_name, load_model_dir, modelfamily_for_dataset
from .settings import CommonSettings, device_setting, entry_points, setting

logger = logging.getLogger(__name__)

__all__ = ["DetectCalibrateSettings", "benign_halves", "split_data", "build_parser", "main"]


def split_data(name: str, train: bool, root=None) -> Tuple[Tensor, Tensor]:
    """A dataset split as tensors (inputs after the test transform, labels)."""
    transform = get_transform(modelfamily_for_dataset(name), "test")
    ds = in_memory(get_dataset(name, train=train, transform=transform, root=root), max_bytes=1 << 40)
    return ds.inputs, torch.as_tensor(ds.targets)


def benign_halves(x: Tensor, y: Tensor, seed: int = 0) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """The test split in two halves by a fixed permutation: (calibration, evaluation)."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    half = x.shape[0] // 2
    return (x[perm[:half]], y[perm[:half]]), (x[perm[half:]], y[perm[half:]])


@dataclass(kw_only=True)
class DetectCalibrateSettings(CommonSettings):
    """Fit an extraction detector for a victim on benign data and write its folder."""

    victim_dir: str = setting(metavar="VICTIM_DIR", help="victim folder (params.json + checkpoint)")
    detector: str = setting("--detector", metavar="NAME", choices=list(DETECTORS), help="%(choices)s")
    fpr: float = setting("--fpr", default=0.01, metavar="F",
                         help="target false-positive rate on the calibration data: per account (PRADA), per "
                              "window (D-ADD); SEAT's percentile rule ignores it (default %(default)s)")
    out: str = setting("--out", metavar="DIR", help="the detector folder to write")
    detector_args: str = setting("--detector-args", default="", metavar="STR",
                                 help='more calibrate() keywords, "k:v,..." (e.g. "epochs:2,window:32")')
    account_size: int = setting("--account-size", default=500, metavar="N",
                                help="queries per benign calibration account (default %(default)s)")
    device_id: int = device_setting()

    def run(self) -> Detector:
        if not 0.0 <= self.fpr < 1.0:
            raise ValueError(f"fpr must be in [0, 1), got {self.fpr}")
        if self.account_size < 1:
            raise ValueError(f"account_size must be >= 1, got {self.account_size}")
        device = as_device(self.device_id)
        model, params = load_model_dir(self.victim_dir, device=device)
        ds = dataset_name(params)
        train_x, train_y = split_data(ds, True, self.data_root)
        (cal_x, _), _ = benign_halves(*split_data(ds, False, self.data_root))
        benign = list(cal_x.split(self.account_size))
        torch.manual_seed(self.seed)
        logger.info("calibrating %s on %d benign accounts of %s (calibration half of the test split)",
                    self.detector, len(benign), ds)
        extra: Dict[str, Any] = parse_detector_args(self.detector_args)
        det = DETECTORS[self.detector].calibrate(model, train_x=train_x, train_y=train_y, benign=benign,
                                                 fpr=self.fpr, **extra)
        det.save(Path(self.out))
        logger.info("wrote %s: %s", self.out, det.config())
        return det


build_parser, main = entry_points(DetectCalibrateSettings)

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
