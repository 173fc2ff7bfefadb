"""Utility of a defended victim: ``ppoison eval-bbox VIC_DIR DEFENSE DEFENSE_ARGS --out_dir D``
(the reference's ``defenses/adversary/eval_bbox.py``).

Builds the defended black box (:func:`~ppoison_ext.defenses.build_defense`, query
log prefix ``test``), queries it with the victim's test split (``params.json`` dataset,
``train=False``, family test transform, no shuffling) and writes into ``--out_dir``:

* ``bboxeval.<N>.log.tsv`` — header ``run_id epoch split loss accuracy best_accuracy``, one
  row ``[run_id, victim epochs, test, loss, acc, acc]``; N is the number of test images;
* ``distancetest.log.tsv`` (+ the query log) — written by the defense's
  :class:`~ppoison_ext.defenses.QueryLogger`: mean/std of ‖y−y′‖₁, ‖y−y′‖₂, KL(y‖y′) over
  all test queries, every 1000 queries and once at the end;
* ``params_evalbbox.json`` — the arguments, the parsed defense arguments (including
  ``log_prefix='test'``, overriding same-named arguments) and ``created_on``.

``accuracy`` is the top-1 accuracy (%) of argmax y′. Further:

* ``loss`` is the mean negative log-likelihood of the true label under y′ + 1e-7
  renormalised, ``mean_i −log((y′_i,c + 1e-7) / Σ_k (y′_i,k + 1e-7))``, a proper loss of
  the released probabilities;
* ``--batch_size`` defaults to 256 queries per call (batching does not change the outputs of
  the batch-independent defenses; 1 queries one image at a time);
* ``--test_subset N`` evaluates the first N test images only.

Deliberate differences from the reference: ``docs/differences.md``.

Example::

    ppoison eval-bbox models/victim/MNIST-lenet-train-nodefense mad "epsilon:0.5,objmax:True" --out_dir D
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .. import distributed
from ..fileio import atomic_write_text
from ..defenses import WB_DEFENSES, DefenseSpec, QueryLogger, build_defense
from ..modeldir import dataset_name, modelfamily_for_dataset, read_params, write_params
from ..datasets import get_dataset, get_transform
from ..training import LOG_COLUMNS, seed_everything
from . import settings
from .common import resolve_device
from .settings import CommonSettings, device_setting, setting

logger = logging.getLogger(__name__)

__all__ = ["eval_bbox", "EvalSettings", "build_parser", "main"]


def eval_bbox(
    victim_dir: Union[str, Path],
    defense: str,
    defense_args: Union[str, Dict[str, Any], None],
    out_dir: Union[str, Path],
    *,
    batch_size: int = 256,
    device: Union[int, str, torch.device, None] = 0,
    num_workers: int = 0,
    data_root: Optional[Union[str, Path]] = None,
    seed: Optional[int] = 42,
    test_subset: Optional[int] = None,
    progress: bool = True,
    params: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Evaluates a defended victim on its test set (see the module docs).

    Args:
        victim_dir: the victim's folder (``params.json`` + checkpoint).
        defense: defense name (``none``, ``topk``, ``rounding``, ``mad``, ``reverse_sigmoid``,
            ``rand_noise``, or a ``*_wb`` variant).
        defense_args: ``"key:value,..."`` string or mapping.
        out_dir: output folder.
        batch_size: queries per call (1 for the ``*_wb`` defenses, which train an online
            attacker per query).
        device: GPU index (-1 = CPU, falls back to the CPU), or a device.
        num_workers: DataLoader workers.
        data_root: dataset root.
        seed: seeds the RNGs first (randomised defenses); None leaves them alone.
        test_subset: evaluate the first N test images only.
        progress: show a progress bar.
        params: values recorded in ``params_evalbbox.json`` (default: these arguments).

    Returns:
        ``{"accuracy", "loss", "n", "l1_mean", "l1_std", "l2_mean", "l2_std", "kl_mean",
        "kl_std", "log"}`` (accuracy in %, distances over all queries).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if distributed.launched_with_torchrun():
        raise ValueError("eval-bbox runs in one process; start it with python, not torchrun")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and not device.lstrip("-").isdigit():
        dev = torch.device(device)
    else:
        dev = resolve_device(0 if device is None else int(device))
    if seed is not None:
        seed_everything(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vparams = read_params(victim_dir)
    spec = DefenseSpec.parse(defense, defense_args)
    qlog = QueryLogger(out_dir, prefix="test")
    blackbox = build_defense(spec, victim_dir=victim_dir, logger=qlog, device=dev, out_dir=out_dir,
                             whitebox={"data_root": data_root} if defense in WB_DEFENSES else None)
    kwargs = {**spec.args, "log_prefix": "test"}
    if defense.endswith("_wb") and batch_size != 1:
        logger.info("white-box defense %s: querying one image at a time", defense)
        batch_size = 1
    if kwargs.get("out_path") not in (None, str(out_dir)):
        logger.info("defense_args out_path=%s ignored: the defense logs go to --out_dir %s",
                    kwargs["out_path"], out_dir)
    dataset = dataset_name(vparams)
    family = modelfamily_for_dataset(dataset)
    testset = get_dataset(dataset, train=False, transform=get_transform(family, "test"), root=data_root)
    if test_subset is not None:
        if isinstance(test_subset, bool) or not isinstance(test_subset, int) or test_subset < 1:
            raise ValueError(f"test_subset must be a positive int or None, got {test_subset!r}")
        testset = Subset(testset, list(range(min(test_subset, len(testset)))))
    n = len(testset)
    logger.info("evaluating %s (%s) on %s: %d test images, batch %d", defense, defense_args, dataset, n,
                batch_size)

    loader = DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    nll_sum, correct, total = 0.0, 0, 0
    try:
        for x, y in tqdm(loader, desc="eval-bbox", disable=not progress, unit="batch"):
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
    epoch = vparams.get("epochs", -1)
    run_id = str(datetime.datetime.now())
    log_path = out_dir / f"bboxeval.{n}.log.tsv"
    row = [run_id, epoch, "test", loss, acc, acc]
    atomic_write_text(log_path, "\t".join(LOG_COLUMNS) + "\n" + "\t".join(str(c) for c in row) + "\n")
    stats = qlog.stats()
    result = {"accuracy": acc, "loss": loss, "n": total, "log": str(log_path)}
    result.update(zip(("l1_mean", "l1_std", "l2_mean", "l2_std", "kl_mean", "kl_std"), stats))
    record = dict(params) if params is not None else {
        "victim_model_dir": str(victim_dir), "defense": defense,
        "defense_args": (defense_args if isinstance(defense_args, str) or defense_args is None
                         else dict(defense_args)),
        "out_dir": str(out_dir), "batch_size": batch_size,
        "device_id": device if isinstance(device, int) else str(device), "nworkers": num_workers,
        "data_root": None if data_root is None else str(data_root), "seed": seed, "test_subset": test_subset,
    }
    record.update(kwargs)
    write_params(out_dir / "params_evalbbox.json", {k: _jsonable(v) for k, v in record.items()})
    logger.info("accuracy %.2f%%, loss %.4f, l1 %.4f ± %.4f", acc, loss, result["l1_mean"], result["l1_std"])
    return result


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    return v


def _defense_names() -> List[str]:
    from ..defenses import DEFENSE_NAMES

    return list(DEFENSE_NAMES)


@dataclass(kw_only=True)
class EvalSettings(CommonSettings):
    """Accuracy and perturbation size of a defended victim on its test set
    (defenses/adversary/eval_bbox.py)."""

    victim_model_dir: str = setting(metavar="VIC_DIR",
                                    help="victim folder (params.json + checkpoint.pth.tar)")
    defense: str = setting(metavar="DEFENSE", choices=_defense_names, help="defense: %(choices)s")
    defense_args: str = setting(metavar="DEFENSE_ARGS",
                                help="defense arguments 'key:value,...' (e.g. 'epsilon:0.5,objmax:True'; "
                                     "'' for none)")
    out_dir: str = setting("--out_dir", metavar="PATH", help="output folder")
    batch_size: int = setting("--batch_size", default=256, metavar="N",
                              help="queries per call (default: 256; the reference used 1)")
    device_id: int = device_setting()
    nworkers: int = setting("-w", "--nworkers", default=10, metavar="N",
                            help="DataLoader worker processes (default: 10)")
    test_subset: Optional[int] = setting("--test_subset", default=None, metavar="N",
                                         help="evaluate the first N test images only")

    def run(self) -> Dict[str, Any]:
        """:func:`eval_bbox` with these settings (recorded as ``params_evalbbox.json``)."""
        return eval_bbox(self.victim_model_dir, self.defense, self.defense_args, self.out_dir,
                         batch_size=self.batch_size, device=self.device_id, num_workers=self.nworkers,
                         data_root=self.data_root, seed=self.seed, test_subset=self.test_subset,
                         progress=not self.no_progress, params=self.params())


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    return settings.build_parser(EvalSettings, prog=prog)


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    return settings.run_step(EvalSettings, argv, prog=prog)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
