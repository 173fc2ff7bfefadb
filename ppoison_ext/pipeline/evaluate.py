"""Utility of a defended victim: ``ppoison eval-bbox VIC_DIR DEFENSE DEFENSE_ARGS --out_dir D``.

Queries the defended black box (query log prefix ``test``) with the victim's test split and writes
into ``--out_dir``: ``bboxeval.<N>.log.tsv`` (one ``test`` row: the mean NLL of the true label under
y′ + 1e-7 renormalised, and the top-1 accuracy in %), the defense's ``distancetest.log.tsv`` and
query log, and ``params_evalbbox.json``. A white-box defense is queried one image at a time.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import distributed
from ..checks import int_arg
from ..datasets import get_dataset, get_transform
from ..defenses import DEFENSE_NAMES, WB_DEFENSES, DefenseSpec, QueryLogger
from ..devices import as_device
from ..fileio import atomic_write_text
from ..modeldir import dataset_name, modelfamily_for_dataset, read_params, write_params
from ..training import LOG_COLUMNS, seed_everything
from .common import first_n, local_blackbox
from .settings import CommonSettings, device_setting, entry_points, jsonable, setting

logger = logging.getLogger(__name__)

__all__ = ["eval_bbox", "EvalSettings", "build_parser", "main"]


def eval_bbox(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Evaluates a defended victim on its test set: ``EvalSettings.of(*args, **kwargs).run()``."""
    return EvalSettings.of(*args, **kwargs).run()


@dataclass(kw_only=True)
class EvalSettings(CommonSettings):
    """Accuracy and perturbation size of a defended victim on its test set."""

    call_defaults = {"nworkers": 0}

    victim_model_dir: str = setting(metavar="VIC_DIR", help="victim folder")
    defense: str = setting(metavar="DEFENSE", choices=DEFENSE_NAMES, help="defense: %(choices)s")
    defense_args: str = setting(metavar="DEFENSE_ARGS",
                                help="defense arguments 'key:value,...' (e.g. 'epsilon:0.5,objmax:True'; "
                                     "'' for none)")
    out_dir: str = setting("--out_dir", metavar="PATH", help="output folder")
    batch_size: int = setting("--batch_size", default=256, metavar="N", help="queries per call (256)")
    device_id: int = device_setting()
    nworkers: int = setting("-w", "--nworkers", default=10, metavar="N",
                            help="DataLoader worker processes (default: 10)")
    test_subset: Optional[int] = setting("--test_subset", default=None, metavar="N",
                                         help="evaluate the first N test images only")

    def run(self) -> Dict[str, Any]:
        """Returns ``{"accuracy", "loss", "n", "log"}`` and the l1/l2/KL ``*_mean`` / ``*_std``."""
        batch_size = int_arg(self.batch_size, "batch_size")
        if distributed.launched_with_torchrun():
            raise ValueError("eval-bbox runs in one process; start it with python, not torchrun")
        dev = as_device(self.device_id)
        if self.seed is not None:
            seed_everything(self.seed)
        out_dir = Path(self.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        vparams = read_params(self.victim_model_dir)
        spec = DefenseSpec.parse(self.defense, self.defense_args)
        qlog = QueryLogger(out_dir, prefix="test")
        blackbox = local_blackbox(spec, self.victim_model_dir, qlog, dev, out_dir, self.data_root)
        kwargs = {**spec.args, "log_prefix": "test"}
        if spec.name in WB_DEFENSES and batch_size != 1:  # their online attacker learns from every query
            logger.info("white-box defense %s: querying one image at a time", self.defense)
            batch_size = 1
        if kwargs.get("out_path") not in (None, str(out_dir)):
            logger.info("defense_args out_path=%s ignored: the defense logs go to --out_dir %s",
                        kwargs["out_path"], out_dir)
        dataset = dataset_name(vparams)
        family = modelfamily_for_dataset(dataset)
        testset = first_n(get_dataset(dataset, train=False, transform=get_transform(family, "test"),
                                      root=self.data_root), self.test_subset)
        n = len(testset)
        logger.info("evaluating %s (%s) on %s: %d test images, batch %d", self.defense, self.defense_args,
                    dataset, n, batch_size)

        loader = DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=self.nworkers)
        nll_sum, correct, total = 0.0, 0, 0
        try:
            for x, y in tqdm(loader, desc="eval-bbox", disable=self.no_progress, unit="batch"):
                x, y = x.to(dev), y.to(dev)
                y_prime = blackbox(x).detach().double()
                p = y_prime + 1e-7
                p = p / p.sum(1, keepdim=True)
                nll_sum += float(-torch.log(p.gather(1, y.view(-1, 1))).sum().item())
                correct += int(y_prime.argmax(1).eq(y).sum().item())
                total += int(y.numel())
        finally:
            qlog.close()
        acc = 100.0 * correct / max(total, 1)
        loss = nll_sum / max(total, 1)
        log_path = out_dir / f"bboxeval.{n}.log.tsv"
        row = [str(datetime.datetime.now()), vparams.get("epochs", -1), "test", loss, acc, acc]
        atomic_write_text(log_path, "\t".join(LOG_COLUMNS) + "\n" + "\t".join(str(c) for c in row) + "\n")
        result = {"accuracy": acc, "loss": loss, "n": total, "log": str(log_path)}
        result.update(zip(("l1_mean", "l1_std", "l2_mean", "l2_std", "kl_mean", "kl_std"), qlog.stats()))
        record = {**self.params(), **{k: jsonable(v) for k, v in kwargs.items()}}
        write_params(out_dir / "params_evalbbox.json", record)
        logger.info("accuracy %.2f%%, loss %.4f, l1 %.4f ± %.4f", acc, loss, result["l1_mean"], result["l1_std"])
        return result


build_parser, main = entry_points(EvalSettings)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
