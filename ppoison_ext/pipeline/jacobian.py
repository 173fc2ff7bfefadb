"""Jacobian-based attacks: ``ppoison jacobian POLICY VIC_DIR DEFENSE DEFENSE_ARGS --model_adv ARCH
--out_dir D --testset T --queryset Q``.

POLICY is ``jbda``, ``jbself`` or ``jbtop<k>`` (:mod:`ppoison_ext.attacks.jbda`). The seed set is
``--seedsize`` images of the query set drawn after seeding with ``--seed``; the substitute is tested
on ``--testset`` after every epoch. Writes ``checkpoint.<queries>.pth.tar`` /
``train.<queries>.log.tsv`` per substitute training (the last, ``.<budget>``, is the reported
attacker), ``params_transfer.json``, the defense's logs, and the final set D as a transfer set plus
``jbda_images.pt``. VIC_DIR may be a ``ppoison serve`` URL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from .. import distributed
from ..attacks.jbda import JacobianAdversary, parse_policy, pixel_bounds, save_augmented_set
from ..checks import int_arg
from ..client import is_url
from ..datasets import dataset_to_modelfamily, get_dataset, get_transform
from ..datasets.transforms import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD
from ..defenses import DEFENSE_NAMES, WB_DEFENSES, DefenseSpec, QueryLogger
from ..devices import as_device
from ..modeldir import read_params, write_params
from ..training import seed_everything
from .common import check_dataset, first_n, local_blackbox, remote_blackbox
from .settings import CommonSettings, device_setting, entry_points, jsonable, setting

logger = logging.getLogger(__name__)

__all__ = ["run_jacobian", "JacobianSettings", "build_parser", "main", "FAMILY_NORMALIZATION"]

#: family -> (mean, std) of its Normalize transform.
FAMILY_NORMALIZATION = {"mnist": (MNIST_MEAN, MNIST_STD), "cifar": (CIFAR_MEAN, CIFAR_STD),
                        "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def run_jacobian(*args: Any, **kwargs: Any) -> Dict[str, Any]:
    """Runs a Jacobian-based attack: ``JacobianSettings.of(*args, **kwargs).run()``."""
    return JacobianSettings.of(*args, **kwargs).run()


def _opt_int(v: str) -> Optional[int]:
    return None if v.lower() in ("none", "") else int(v)


_ORIG = "restore original bugs (fixed by default)"


@dataclass(kw_only=True)
class JacobianSettings(CommonSettings):
    """Jacobian-based attacks (JBDA, JB-self, JB-top-k) against a defended victim."""

    call_defaults = {"nworkers": 0}

    policy: str = setting(metavar="PI", help="jbda, jbself or jbtop<k> (e.g. jbtop3)")
    victim_model_dir: str = setting(metavar="VIC_DIR", help="victim folder, or a served victim's URL")
    defense: Optional[str] = setting(default=None, metavar="DEFENSE", choices=DEFENSE_NAMES,
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
    batch_size: int = setting("--batch_size", default=64, metavar="N", help="substitute batch (64)")
    train_transform: bool = setting("--train_transform", default=False, help="augment the seed images")
    budget: int = setting("--budget", default=10000, metavar="N", help="query limit (default: 10000)")
    seedsize: int = setting("--seedsize", default=100, metavar="N", help="seed set size (100)")
    rho: Optional[int] = setting("--rho", default=None, metavar="N", parse=_opt_int,
                                 help="number of augmentation rounds")
    sigma: int = setting("--sigma", default=3, metavar="N", help="sample --kappa rows from this round on")
    kappa: Optional[int] = setting("--kappa", default=None, parse=_opt_int, help="rows sampled per round")
    tau: Optional[int] = setting("--tau", default=5, metavar="N", parse=_opt_int,
                                 help="period of the step-size sign flip")
    train_epochs: int = setting("--train_epochs", default=20, metavar="N", help="epochs per round (20)")
    final_train_epochs: int = setting("--final_train_epochs", default=100, metavar="N",
                                      help="epochs of the final substitute (default: 100)")
    query_batch_size: int = setting("--query_batch_size", default=64, metavar="N",
                                    help="images per black-box call (default: 64)")
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
        """The attack's summary plus ``out_dir``, ``policy`` and ``final_checkpoint``."""
        parse_policy(self.policy)
        if distributed.launched_with_torchrun():
            raise ValueError("the jacobian attack runs in one process; start it with python, not torchrun")
        check_dataset(self.testset, "testset")
        check_dataset(self.queryset, "queryset")
        seedsize, budget = self.seedsize, self.budget
        int_arg(seedsize, "seedsize")
        dev = as_device(self.device_id)
        out_dir = Path(self.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        victim_dir, defense = self.victim_model_dir, self.defense
        seed_everything(self.seed)
        if is_url(str(victim_dir)):
            blackbox, defense, vparams = remote_blackbox(victim_dir, defense, self.defense_args, self.api_key_file)
            qlog, kwargs = None, {"log_prefix": "transfer"}
        else:
            vparams = read_params(victim_dir)
            spec = DefenseSpec.parse(defense, self.defense_args)
            qlog = QueryLogger(out_dir, prefix="transfer")
            blackbox = local_blackbox(spec, victim_dir, qlog, dev, out_dir, self.data_root)
            kwargs = {**spec.args, "log_prefix": "transfer"}
        K = int(vparams["num_classes"])
        query_batch_size = self.query_batch_size
        if defense in WB_DEFENSES and query_batch_size != 1:  # their online attacker learns from every query
            logger.info("white-box defense %s: querying one image at a time", defense)
            query_batch_size = 1

        q_family = dataset_to_modelfamily[self.queryset]
        q_transform = get_transform(q_family, "train" if self.train_transform else "test")
        qset = get_dataset(self.queryset, train=True, transform=q_transform, root=self.data_root)
        if seedsize >= budget:
            raise ValueError(f"seedsize ({seedsize}) must be smaller than budget ({budget})")
        if seedsize > len(qset):
            raise ValueError(f"seedsize ({seedsize}) exceeds the {len(qset)} images of {self.queryset}")
        seed_idx = np.random.choice(len(qset), seedsize, replace=False)
        x_seed = torch.stack([qset[int(i)][0] for i in seed_idx])

        t_family = dataset_to_modelfamily[self.testset]
        tset = get_dataset(self.testset, train=False, transform=get_transform(t_family, "test"), root=self.data_root)
        if len(tset.classes) != K:
            raise ValueError(f"testset {self.testset} has {len(tset.classes)} classes but the victim has K={K}")
        tset = first_n(tset, self.test_subset)

        mean, std = FAMILY_NORMALIZATION[q_family]
        record = {**self.params(), **{k: jsonable(v) for k, v in kwargs.items()}}
        write_params(out_dir / "params_transfer.json", record)

        adversary = JacobianAdversary(
            blackbox, policy=self.policy, budget=budget, model_adv_name=self.model_adv or vparams["model_arch"],
            modelfamily=t_family, num_classes=K, testset=tset, out_dir=out_dir, device=dev,
            model_adv_pretrained=self.pretrained, batch_size=self.batch_size, train_epochs=self.train_epochs,
            final_train_epochs=self.final_train_epochs, kappa=self.kappa, tau=self.tau, rho=self.rho,
            sigma=self.sigma, query_batch_size=query_batch_size, bounds=pixel_bounds(mean, std),
            orig_aliasing=self.orig_aliasing, orig_jbself_store=self.orig_jbself_store, orig_clamp=self.orig_clamp,
            orig_topk_cap=self.orig_topk_cap, orig_pgd_sign=self.orig_pgd_sign, num_workers=self.nworkers,
            progress=not self.no_progress)
        try:
            adversary.setup(x_seed, seed_idx.tolist())
            D, _, summary = adversary.run()
        finally:
            if qlog is not None:
                qlog.close()
        save_augmented_set(D, out_dir, mean=mean, std=std, meta={
            "policy": self.policy, "victim_model_dir": str(victim_dir), "defense": defense,
            "defense_args": record.get("defense_args"), "queryset": self.queryset, "seed": self.seed,
            "budget": budget})
        summary.update(out_dir=str(out_dir), policy=self.policy,
                       final_checkpoint=(summary["final"] or {}).get("checkpoint"))
        record["queries"] = summary["queries"]
        write_params(out_dir / "params_transfer.json", record)
        logger.info("%s: %d queries, |D| = %d (%d distinct images), final substitute best test acc %.2f",
                    self.policy, summary["queries"], summary["size"], summary["unique"],
                    (summary["final"] or {}).get("best_test_acc", float("nan")))
        return summary


build_parser, main = entry_points(JacobianSettings)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
