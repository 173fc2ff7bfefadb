"""Pieces shared by the pipeline steps."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch.utils.data import Dataset, Subset

from ..checks import int_arg
from ..client import RemoteBlackbox, read_api_key
from ..datasets import dataset_to_modelfamily
from ..defenses import WB_DEFENSES, Defense, DefenseSpec, QueryLogger, build_defense

__all__ = ["check_dataset", "first_n", "remote_blackbox", "local_blackbox"]


def check_dataset(name: Any, what: str) -> str:
    """``name`` if it is a known dataset, else a ValueError naming ``what``."""
    if not isinstance(name, str) or name not in dataset_to_modelfamily:
        raise ValueError(f"{what} must be one of {sorted(dataset_to_modelfamily)}, got {name!r}")
    return name


def first_n(dataset: Dataset, n: Optional[int], what: str = "test_subset") -> Dataset:
    """The first ``n`` items of ``dataset`` (all of them for None)."""
    if int_arg(n, what, optional=True) is None:
        return dataset
    return Subset(dataset, list(range(min(n, len(dataset)))))


def remote_blackbox(url: str, defense: Optional[str], defense_args: Any, api_key_file: Optional[str]
                    ) -> Tuple[RemoteBlackbox, str, Dict[str, Any]]:
    """The served victim at ``url``: the black box, its defense's name and the victim's params."""
    if defense_args:
        raise ValueError("defense_args: the served victim's defense runs on the server; give none with a URL")
    bb = RemoteBlackbox(str(url), api_key=read_api_key(api_key_file) if api_key_file else None)
    if defense is not None and defense != bb.info["defense"]:
        raise ValueError(f"defense: the server at {url} runs {bb.info['defense']!r}, not {defense!r}")
    vparams = {"model_arch": bb.info["model"], "num_classes": bb.num_classes, "dataset": bb.info.get("dataset")}
    return bb, bb.info["defense"], vparams


def local_blackbox(spec: DefenseSpec, victim_dir, qlog: QueryLogger, device, out_dir, data_root) -> Defense:
    """The defended victim in ``victim_dir``, logging its queries to ``qlog``."""
    return build_defense(spec, victim_dir=victim_dir, logger=qlog, device=device, out_dir=out_dir,
                         whitebox={"data_root": data_root} if spec.name in WB_DEFENSES else None)
