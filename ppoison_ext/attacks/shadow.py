"""Shadow models for D-DAE: classifiers the attacker trains itself, whose outputs on its query
inputs serve as "true" posteriors of the recovery table (differences.md: Shadow models).

:func:`train_shadow_models` trains the attacker's architecture from scratch on a shadow
dataset's train split (``pool_range`` of it), cut ``split="samples"`` (default) into
``num_shadows`` disjoint shuffled shards of ``per_shadow`` images, or ``split="classes"``
giving each shadow a random subset of K classes relabelled 0…K−1 (both seeded). Each shadow is
a model folder ``<out_dir>/shadow-<i>/``; a folder already holding a finished shadow is reused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ..checks import check_choices, int_arg
from ..datasets import dataset_to_modelfamily, get_dataset, get_transform
from ..devices import as_device
from ..modeldir import load_model_dir, write_params
from ..models import get_net
from ..training import seed_everything, train_model, training_state

__all__ = ["train_shadow_models", "load_shadow_models", "shadow_folders", "SPLITS"]

logger = logging.getLogger(__name__)

SPLITS = ("samples", "classes")


class _Relabelled(Dataset):
    def __init__(self, base: Dataset, indices: np.ndarray, mapping: Optional[Dict[int, int]]):
        self.base, self.indices, self.mapping = base, indices, mapping
        labels = np.asarray(base.targets)[indices]
        self.targets = [int(mapping[int(t)]) if mapping else int(t) for t in labels]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, _ = self.base[int(self.indices[i])]
        return x, self.targets[i]


def shadow_folders(out_dir: Union[str, Path]) -> List[Path]:
    """The shadow model folders under ``out_dir`` (sub-folders named ``shadow*`` with a params.json)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and "shadow" in p.name and (p / "params.json").is_file()]
    return sorted(found, key=lambda p: (len(p.name), p.name))


def _splits(base: Dataset, K: int, num_shadows: int, per_shadow: Optional[int], split: str,
            pool_range: Optional[Tuple[int, int]], rng: np.random.Generator):
    targets = np.asarray(base.targets)
    lo, hi = pool_range if pool_range is not None else (0, len(targets))
    pool = np.arange(lo, min(hi, len(targets)))
    if split == "samples":
        pool = rng.permutation(pool)
        size = per_shadow if per_shadow is not None else len(pool) // num_shadows
        if size < 1 or size * num_shadows > len(pool):
            raise ValueError(f"cannot cut {num_shadows} disjoint shards of {size} images from a pool of "
                             f"{len(pool)}")
        return [(np.sort(pool[i * size:(i + 1) * size]), None) for i in range(num_shadows)]
    classes = np.unique(targets[pool])
    if len(classes) < K:
        raise ValueError(f"split 'classes' needs a dataset with at least K={K} classes, this one has "
                         f"{len(classes)}")
    out = []
    for _ in range(num_shadows):
        chosen = rng.choice(classes, K, replace=False)
        mapping = {int(c): j for j, c in enumerate(chosen)}
        idx = pool[np.isin(targets[pool], chosen)]
        if per_shadow is not None:
            idx = np.sort(rng.choice(idx, min(per_shadow, len(idx)), replace=False))
        out.append((idx, mapping))
    return out


def train_shadow_models(out_dir: Union[str, Path], *, dataset: str, arch: str, num_classes: int,
                        num_shadows: int = 20, epochs: int = 5, split: str = "samples",
                        per_shadow: Optional[int] = None, pool_range: Optional[Sequence[int]] = None,
                        lr: float = 0.01, momentum: float = 0.5, weight_decay: float = 5e-4, lr_step: int = 3,
                        lr_gamma: float = 0.5, batch_size: int = 64, seed: int = 42,
                        device: Union[str, torch.device] = "cpu", data_root=None,
                        progress: bool = False) -> List[Path]:
    """Trains ``num_shadows`` shadow models into ``out_dir/shadow-<i>`` (module docs) and returns
    their folders. Finished shadows are skipped, an unfinished one resumes."""
    check_choices(split=(split, SPLITS))
    int_arg(num_shadows, "num_shadows")
    if dataset not in dataset_to_modelfamily:
        raise ValueError(f"dataset: unknown {dataset!r}")
    family, device = dataset_to_modelfamily[dataset], as_device(device)
    base = get_dataset(dataset, train=True, transform=get_transform(family, "train"), root=data_root)
    rng = np.random.default_rng(seed)
    pr = tuple(int(v) for v in pool_range) if pool_range is not None else None
    parts = _splits(base, num_classes, num_shadows, per_shadow, split, pr, rng)
    out = Path(out_dir)
    folders = []
    for i, (idx, mapping) in enumerate(parts):
        folder = out / f"shadow-{i}"
        folders.append(folder)
        state = training_state(folder)
        if state is not None and state.get("epoch") == epochs and (folder / "params.json").is_file():
            continue
        seed_everything(seed + i)
        model = get_net(arch, family, num_classes=num_classes).to(device)
        train_model(model, _Relabelled(base, idx, mapping), folder, batch_size=batch_size, epochs=epochs,
                    lr=lr, momentum=momentum, weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma,
                    device=device, seed=seed + i, arch=arch, progress=progress, resume="auto",
                    num_classes=num_classes)
        params: Dict[str, Any] = {"dataset": dataset, "model_arch": arch, "num_classes": num_classes,
                                  "shadow_index": i, "split": split, "num_images": int(len(idx)),
                                  "pool_range": list(pr) if pr else None, "epochs": epochs, "lr": lr,
                                  "momentum": momentum, "weight_decay": weight_decay, "lr_step": lr_step,
                                  "lr_gamma": lr_gamma, "batch_size": batch_size, "seed": seed,
                                  "class_map": {str(k): v for k, v in mapping.items()} if mapping else None}
        write_params(folder / "params.json", params)
        logger.info("shadow %d/%d trained on %d images (%s split)", i + 1, num_shadows, len(idx), split)
    return folders


def load_shadow_models(out_dir: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                       limit: Optional[int] = None) -> List[nn.Module]:
    """The shadow models in ``out_dir`` (eval mode), at most ``limit``."""
    folders = shadow_folders(out_dir)[:limit]
    if not folders:
        raise FileNotFoundError(f"no shadow models (shadow*/params.json) in {out_dir}")
    return [load_model_dir(f, device=device)[0] for f in folders]
