"""Jacobian-based attacks: ``ppoison jacobian POLICY VIC_DIR DEFENSE DEFENSE_ARGS --model_adv ARCH
--out_dir D --testset T --queryset Q`` (the reference's ``defenses/adversary/jacobian.py``).

POLICY is ``jbda``, ``jbself`` or ``jbtop<k>`` (e.g. ``jbtop3``); the algorithm and the
reference bugs that ``--orig_aliasing``, ``--orig_jbself_store``, ``--orig_clamp``,
``--orig_topk_cap`` and ``--orig_pgd_sign`` restore (all fixed by default) are described in
:mod:`ppoison_ext.attacks.jbda`.

Setup: seed numpy/torch/CUDA with ``--seed`` (42); the seed set is
``np.random.choice(len(queryset), --seedsize, replace=False)`` of the query set's training
split (its family's test transform, or train transform with ``--train_transform``); the
substitute's family comes from ``--testset``, whose test split is evaluated after every
substitute epoch; the black box is the defended victim (query log prefix ``transfer``).
Defaults follow the reference: ``--budget 10000 --seedsize 100 --rho None --sigma 3 --kappa None
--tau 5 --train_epochs 20 --batch_size 64`` (substitute training batch), final substitute
100 epochs (``--final_train_epochs``), λ = 0.1, PGD 8 × 0.01.

Writes into ``--out_dir``: ``checkpoint.<queries>.pth.tar`` / ``train.<queries>.log.tsv`` for
every substitute training (the last one, ``.<budget>``, is the reported attacker),
``params_transfer.json``, the defense's ``distancetransfer.log.tsv`` and query log, and
the final set D as a transfer set plus ``jbda_images.pt`` (see
:func:`~ppoison_ext.attacks.jbda.save_augmented_set`), so ``train-attacker`` can train on it.

Queries are batched (``--query_batch_size``, default 64; 1 gives one query per call, the
reference's call pattern; forced to 1 for ``*_wb`` defenses); ``--model_adv`` defaults to the
victim's architecture; ``--test_subset N`` tests the substitutes on the first N test images
only. Deliberate differences from the reference: ``docs/differences.md``.

Over HTTP: with a URL for VIC_DIR (``ppoison jacobian jbda http://127.0.0.1:8000 --api-key-file F
...``) the black box is a :class:`~ppoison_ext.client.RemoteBlackbox`; DEFENSE / DEFENSE_ARGS
are left out (the server's defense is used), K and the default ``--model_adv`` come from
``/v1/info``, and the query log is the server's.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Subset

from .. import distributed
from ..client import RemoteBlackbox, is_url, read_api_key
from ..attacks.jbda import JacobianAdversary, parse_policy, pixel_bounds, save_augmented_set
from ..defenses import WB_DEFENSES, DefenseSpec, QueryLogger, build_defense
from ..modeldir import read_params, write_params
from ..datasets import dataset_to_modelfamily, get_dataset, get_transform
from ..datasets.transforms import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD
from ..training import seed_everything
from . import settings
from .common import resolve_device
from .settings import CommonSettings, device_setting, setting

logger = logging.getLogger(__name__)

__all__ = ["run_jacobian", "JacobianSettings", "build_parser", "main", "FAMILY_NORMALIZATION"]

#: family -> (mean, std) of its Normalize transform.
FAMILY_NORMALIZATION = {"mnist": (MNIST_MEAN, MNIST_STD), "cifar": (CIFAR_MEAN, CIFAR_STD),
                        "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def run_jacobian(
    policy: str,
    victim_dir: Union[str, Path],
    defense: Optional[str],
    defense_args: Union[str, Dict[str, Any], None],
    *,
    out_dir: Union[str, Path],
    testset: str,
    queryset: str,
    model_adv: Optional[str] = None,
    pretrained: Optional[str] = None,
    budget: int = 10000,
    seedsize: int = 100,
    rho: Optional[int] = None,
    sigma: int = 3,
    kappa: Optional[int] = None,
    tau: Optional[int] = 5,
    train_epochs: int = 20,
    final_train_epochs: int = 100,
    batch_size: int = 64,
    query_batch_size: int = 64,
    train_transform: bool = False,
    device: Union[int, str, torch.device, None] = 0,
    num_workers: int = 0,
    data_root: Optional[Union[str, Path]] = None,
    seed: int = 42,
    test_subset: Optional[int] = None,
    orig_aliasing: bool = False,
    orig_jbself_store: bool = False,
    orig_clamp: bool = False,
    orig_topk_cap: bool = False,
    orig_pgd_sign: bool = False,
    save_transferset: bool = True,
    progress: bool = True,
    params: Optional[Dict[str, Any]] = None,
    api_key_file: Optional[str] = None,
) -> Dict[str, Any]:
    """Runs a Jacobian-based attack against a defended victim (see the module docs).

    Returns:
        The attack summary (:meth:`JacobianAdversary.run`) plus ``out_dir``, ``policy`` and
        ``final_checkpoint`` (the reported attacker's checkpoint path).
    """
    strategy, k = parse_policy(policy)
    if distributed.launched_with_torchrun():
        raise ValueError("the jacobian attack runs in one process; start it with python, not torchrun")
    for name, ds in (("testset", testset), ("queryset", queryset)):
        if not isinstance(ds, str) or ds not in dataset_to_modelfamily:
            raise ValueError(f"{name} must be one of {sorted(dataset_to_modelfamily)}, got {ds!r}")
    if isinstance(seedsize, bool) or not isinstance(seedsize, int) or seedsize < 1:
        raise ValueError(f"seedsize must be a positive int, got {seedsize!r}")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and not device.lstrip("-").isdigit():
        dev = torch.device(device)
    else:
        dev = resolve_device(0 if device is None else int(device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remote = is_url(str(victim_dir))
    if remote:  # the served victim: its defense, query log and seed are the server's
        if defense_args:
            raise ValueError("defense_args: the served victim's defense runs on the server; give none with a URL")
        blackbox = RemoteBlackbox(str(victim_dir), api_key=read_api_key(api_key_file) if api_key_file else None)
        if defense is not None and defense != blackbox.info["defense"]:
            raise ValueError(f"defense: the server at {victim_dir} runs {blackbox.info['defense']!r}, "
                             f"not {defense!r}")
        defense = blackbox.info["defense"]
        vparams = {"model_arch": blackbox.info["model"], "num_classes": blackbox.num_classes}
    else:
        vparams = read_params(victim_dir)
    K = int(vparams["num_classes"])
    model_adv = model_adv or vparams["model_arch"]

    seed_everything(seed)
    if remote:
        qlog, kwargs = None, {"log_prefix": "transfer"}
    else:
        spec = DefenseSpec.parse(defense, defense_args)
        qlog = QueryLogger(out_dir, prefix="transfer")
        blackbox = build_defense(spec, victim_dir=victim_dir, logger=qlog, device=dev, out_dir=out_dir,
                                 whitebox={"data_root": data_root} if defense in WB_DEFENSES else None)
        kwargs = {**spec.args, "log_prefix": "transfer"}
    if defense.endswith("_wb") and query_batch_size != 1:
        logger.info("white-box defense %s: querying one image at a time", defense)
        query_batch_size = 1

    q_family = dataset_to_modelfamily[queryset]
    q_transform = get_transform(q_family, "train" if train_transform else "test")
    qset = get_dataset(queryset, train=True, transform=q_transform, root=data_root)
    if seedsize >= budget:
        raise ValueError(f"seedsize ({seedsize}) must be smaller than budget ({budget})")
    if seedsize > len(qset):
        raise ValueError(f"seedsize ({seedsize}) exceeds the {len(qset)} images of {queryset}")
    seed_idx = np.random.choice(len(qset), seedsize, replace=False)
    x_seed = torch.stack([qset[int(i)][0] for i in seed_idx])

    t_family = dataset_to_modelfamily[testset]
    tset = get_dataset(testset, train=False, transform=get_transform(t_family, "test"), root=data_root)
    if len(tset.classes) != K:
        raise ValueError(f"testset {testset} has {len(tset.classes)} classes but the victim has K={K}")
    if test_subset is not None:
        if isinstance(test_subset, bool) or not isinstance(test_subset, int) or test_subset < 1:
            raise ValueError(f"test_subset must be a positive int or None, got {test_subset!r}")
        tset = Subset(tset, list(range(min(test_subset, len(tset)))))

    mean, std = FAMILY_NORMALIZATION[q_family]
    record = dict(params) if params is not None else {
        "policy": policy, "victim_model_dir": str(victim_dir), "defense": defense,
        "defense_args": (defense_args if isinstance(defense_args, str) or defense_args is None
                         else dict(defense_args)),
        "model_adv": model_adv, "pretrained": pretrained, "out_dir": str(out_dir), "testset": testset,
        "queryset": queryset, "batch_size": batch_size, "train_transform": train_transform, "budget": budget,
        "seedsize": seedsize, "rho": rho, "sigma": sigma, "kappa": kappa, "tau": tau,
        "train_epochs": train_epochs,
        "final_train_epochs": final_train_epochs, "query_batch_size": query_batch_size,
        "device_id": device if isinstance(device, int) else str(device), "nworkers": num_workers,
        "data_root": None if data_root is None else str(data_root), "seed": seed, "test_subset": test_subset,
        "orig_aliasing": orig_aliasing, "orig_jbself_store": orig_jbself_store, "orig_clamp": orig_clamp,
        "orig_topk_cap": orig_topk_cap, "orig_pgd_sign": orig_pgd_sign,
    }
    record.update(kwargs)
    write_params(out_dir / "params_transfer.json", record)

    adversary = JacobianAdversary(
        blackbox, policy=policy, budget=budget, model_adv_name=model_adv, modelfamily=t_family, num_classes=K,
        testset=tset, out_dir=out_dir, device=dev, model_adv_pretrained=pretrained, batch_size=batch_size,
        train_epochs=train_epochs, final_train_epochs=final_train_epochs, kappa=kappa, tau=tau, rho=rho,
        sigma=sigma,
        query_batch_size=query_batch_size, bounds=pixel_bounds(mean, std), orig_aliasing=orig_aliasing,
        orig_jbself_store=orig_jbself_store, orig_clamp=orig_clamp, orig_topk_cap=orig_topk_cap,
        orig_pgd_sign=orig_pgd_sign, num_workers=num_workers, progress=progress)
    try:
        adversary.setup(x_seed, seed_idx.tolist())
        D, _, summary = adversary.run()
    finally:
        if qlog is not None:
            qlog.close()
    if save_transferset:
        save_augmented_set(D, out_dir, mean=mean, std=std, meta={
            "policy": policy, "victim_model_dir": str(victim_dir), "defense": defense,
            "defense_args": record.get("defense_args"), "queryset": queryset, "seed": seed, "budget": budget})
    summary.update(out_dir=str(out_dir), policy=policy,
                   final_checkpoint=(summary["final"] or {}).get("checkpoint"))
    record["queries"] = summary["queries"]
    write_params(out_dir / "params_transfer.json", record)
    logger.info("%s: %d queries, |D| = %d (%d distinct images), final substitute best test acc %.2f", policy,
                summary["queries"], summary["size"], summary["unique"],
                (summary["final"] or {}).get("best_test_acc", float("nan")))
    return summary


def _opt_int(v: str) -> Optional[int]:
    return None if v.lower() in ("none", "") else int(v)


def _defense_names() -> List[str]:
    from ..defenses import DEFENSE_NAMES

    return list(DEFENSE_NAMES)


_ORIG = "restore reference bugs (fixed by default)"


@dataclass(kw_only=True)
class JacobianSettings(CommonSettings):
    """Jacobian-based attacks (JBDA, JB-self, JB-top-k) against a defended victim
    (defenses/adversary/jacobian.py)."""

    policy: str = setting(metavar="PI", help="jbda, jbself or jbtop<k> (e.g. jbtop3)")
    victim_model_dir: str = setting(metavar="VIC_DIR", help="victim folder, or a served victim's URL")
    defense: Optional[str] = setting(default=None, metavar="DEFENSE", choices=_defense_names,
                                     help="defense: %(choices)s (left out when VIC_DIR is a URL)")
    defense_args: Optional[str] = setting(default=None, metavar="DEFENSE_ARGS",
                                          help="defense arguments 'key:value,...' (none with a URL)")
    api_key_file: Optional[str] = setting("--api-key-file", default=None, metavar="FILE",
                                          help="API key of a served victim (VIC_DIR a URL)")
    model_adv: Optional[str] = setting("--model_adv", default=None, metavar="STR",
                                       help="substitute architecture (default: the victim's)")
    pretrained: Optional[str] = setting("--pretrained", default=None, metavar="STR",
                                        help="substitute initialisation")
    out_dir: str = setting("--out_dir", metavar="PATH", help="output folder")
    testset: str = setting("--testset", metavar="DSET", help="dataset of the victim")
    queryset: str = setting("--queryset", metavar="DSET", help="dataset of the seed images")
    batch_size: int = setting("--batch_size", default=64, metavar="N",
                              help="substitute training batch (default: 64)")
    train_transform: bool = setting("--train_transform", default=False,
                                    help="seed images with the train transform")
    budget: int = setting("--budget", default=10000, metavar="N", help="query limit (default: 10000)")
    seedsize: int = setting("--seedsize", default=100, metavar="N",
                            help="size of the seed set (default: 100)")
    rho: Optional[int] = setting("--rho", default=None, metavar="N", parse=_opt_int,
                                 help="number of augmentation rounds")
    sigma: int = setting("--sigma", default=3, metavar="N", help="sample --kappa rows from this round on")
    kappa: Optional[int] = setting("--kappa", default=None, metavar="N", parse=_opt_int,
                                   help="rows sampled per round")
    tau: Optional[int] = setting("--tau", default=5, metavar="N", parse=_opt_int,
                                 help="period of the step-size sign flip")
    train_epochs: int = setting("--train_epochs", default=20, metavar="N",
                                help="epochs per round (default: 20)")
    final_train_epochs: int = setting("--final_train_epochs", default=100, metavar="N",
                                      help="epochs of the final substitute (default: 100)")
    query_batch_size: int = setting("--query_batch_size", default=64, metavar="N",
                                    help="images per black-box call (default: 64; the reference used 1)")
    test_subset: Optional[int] = setting("--test_subset", default=None, metavar="N",
                                         help="test on the first N test images only")
    device_id: int = device_setting()
    nworkers: int = setting("-w", "--nworkers", default=10, metavar="N",
                            help="DataLoader worker processes (default: 10)")
    orig_aliasing: bool = setting("--orig_aliasing", default=False, group=_ORIG,
                                  help="augment D in place (D stays at the seed images, duplicated)")
    orig_jbself_store: bool = setting("--orig_jbself_store", default=False, group=_ORIG,
                                      help="jbself: store x+delta with the label of x-delta")
    orig_clamp: bool = setting("--orig_clamp", default=False, group=_ORIG,
                               help="FGSM clamps to [0,1] in normalised units; PGD does not clamp")
    orig_topk_cap: bool = setting("--orig_topk_cap", default=False, group=_ORIG,
                                  help="jbtop: budget cap divides by 3 instead of k")
    orig_pgd_sign: bool = setting("--orig_pgd_sign", default=False, group=_ORIG,
                                  help="jbtop: clamp(-lambda, lambda) even for lambda < 0")

    def run(self) -> Dict[str, Any]:
        """:func:`run_jacobian` with these settings (recorded as ``params_transfer.json``)."""
        return run_jacobian(
            self.policy, self.victim_model_dir, self.defense, self.defense_args, out_dir=self.out_dir,
            testset=self.testset, queryset=self.queryset, model_adv=self.model_adv,
            pretrained=self.pretrained, budget=self.budget, seedsize=self.seedsize, rho=self.rho,
            sigma=self.sigma, kappa=self.kappa,
            tau=self.tau, train_epochs=self.train_epochs, final_train_epochs=self.final_train_epochs,
            batch_size=self.batch_size, query_batch_size=self.query_batch_size,
            train_transform=self.train_transform, device=self.device_id, num_workers=self.nworkers,
            data_root=self.data_root, seed=self.seed, test_subset=self.test_subset,
            orig_aliasing=self.orig_aliasing, orig_jbself_store=self.orig_jbself_store,
            orig_clamp=self.orig_clamp, orig_topk_cap=self.orig_topk_cap, orig_pgd_sign=self.orig_pgd_sign,
            progress=not self.no_progress, params=self.params(), api_key_file=self.api_key_file,
        )


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    return settings.build_parser(JacobianSettings, prog=prog)


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    return settings.run_step(JacobianSettings, argv, prog=prog)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
