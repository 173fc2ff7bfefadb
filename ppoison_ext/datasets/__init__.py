"""Datasets of Knockoff Nets / Prediction Poisoning, read from local files only.

Quick use::

    from ppoison_ext.datasets import get_dataset, get_transform, dataset_to_modelfamily
    fam = dataset_to_modelfamily["MNIST"]                       # 'mnist'
    ds = get_dataset("MNIST", train=False, transform=get_transform(fam, "test"))
    x, y = ds[0]                                                 # tensor 1×28×28, int

Data roots: an explicit ``root=`` is searched alone; otherwise ``$PPOISON_DATA`` is searched and, for
MNIST, FashionMNIST (partial) and notMNIST (test part), the package's embedded copy is the fallback.
Nothing is ever downloaded or written. Every dataset is a ``torch.utils.data.Dataset`` with ``classes``,
``targets`` and ``(image, int label)`` items; array datasets expose ``data`` (uint8 numpy, N×H×W or
N×H×W×3) and folder datasets ``samples`` (``[(path, label)]``), the raw material of transfer sets.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Dict, Optional, Tuple

from torch.utils.data import Dataset

from ._common import (ENV_DATA_ROOT, ENV_SKIP_MD5, ArrayDataset, DatasetIntegrityError, FolderDataset, InMemory,
                      PathLike, data_root, embedded_root, in_memory, verify_embedded_data)
from .cifar import CIFAR10, CIFAR100, SVHN, RestrictedUnpickler, safe_pickle_load
from .folders import (CUBS200, Caltech256, Diabetic5, ImageFolder, ImageNet1k, Indoor67, TinyImageNet200,
                      find_classes, fraction_split, per_class_split, scan_image_folder)
from .mnist import EMNIST, KMNIST, MNIST, EMNISTLetters, FashionMNIST, NotMNIST, read_idx
from .transforms import get_transform, modelfamily_to_transforms

#: name -> (dataset class, model family, number of classes); ImageFolder's K depends on its folder.
_TABLE: Dict[str, Tuple[type, str, Optional[int]]] = {
    "MNIST": (MNIST, "mnist", 10),
    "FashionMNIST": (FashionMNIST, "mnist", 10),
    "KMNIST": (KMNIST, "mnist", 10),
    "EMNIST": (EMNIST, "mnist", 47),
    "EMNISTLetters": (EMNISTLetters, "mnist", 26),
    "notMNIST": (NotMNIST, "mnist", 10),
    "CIFAR10": (CIFAR10, "cifar", 10),
    "CIFAR100": (CIFAR100, "cifar", 100),
    "SVHN": (SVHN, "cifar", 10),
    "TinyImageNet200": (TinyImageNet200, "cifar", 200),
    "CUBS200": (CUBS200, "imagenet", 200),
    "Caltech256": (Caltech256, "imagenet", 256),
    "Indoor67": (Indoor67, "imagenet", 67),
    "Diabetic5": (Diabetic5, "imagenet", 5),
    "ImageNet1k": (ImageNet1k, "imagenet", 1000),
    "ImageFolder": (ImageFolder, "imagenet", None),
}

#: name -> dataset class
DATASETS: Dict[str, type] = {name: cls for name, (cls, _, _) in _TABLE.items()}

#: name -> model family ('mnist', 'cifar', 'imagenet'); selects the model zoo and the transforms.
dataset_to_modelfamily: Dict[str, str] = {name: family for name, (_, family, _) in _TABLE.items()}


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in DATASETS:
        hint = ""
        if isinstance(name, str):
            close = difflib.get_close_matches(name, list(DATASETS), n=1, cutoff=0.6)
            by_case = [k for k in DATASETS if k.lower() == name.lower()]
            if by_case or close:
                hint = f" Did you mean {(by_case or close)[0]!r}?"
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}.{hint}")
    return name


def get_dataset(name: str, train: Any = True, transform: Optional[Callable] = None,
                root: Optional[PathLike] = None, **kw: Any) -> Dataset:
    """Build dataset ``name``.

    ``train`` is a bool (SVHN also takes 'train' / 'test' / 'extra'). ``root`` is the data root (for
    ``ImageFolder``: the folder of class sub-folders itself). Extra keywords go to the dataset class:
    ``target_transform`` for all, ``verify`` (md5 checks) for the MNIST-like, CIFAR and SVHN sets.
    Raises ``FileNotFoundError`` (naming the roots searched and the files expected) for missing data.
    """
    cls = DATASETS[_check_name(name)]
    return cls(root=root, train=train, transform=transform, **kw)


def num_classes(name: str, root: Optional[PathLike] = None) -> int:
    """Number of classes of ``name`` without loading it (``ImageFolder`` needs ``root``)."""
    name = _check_name(name)
    if name == "ImageFolder":
        if root is None:
            raise ValueError(
                "num_classes('ImageFolder') needs root=<folder whose sub-folders are the classes>")
        return len(find_classes(os.fspath(root)))
    return _TABLE[name][2]


__all__ = [
    "DATASETS", "dataset_to_modelfamily", "modelfamily_to_transforms", "get_dataset", "get_transform",
    "num_classes", "data_root", "embedded_root", "verify_embedded_data", "DatasetIntegrityError",
    "ENV_DATA_ROOT", "ENV_SKIP_MD5", "ArrayDataset", "FolderDataset", "InMemory", "in_memory",
    "MNIST", "FashionMNIST", "KMNIST", "EMNIST", "EMNISTLetters", "NotMNIST", "CIFAR10", "CIFAR100", "SVHN",
    "TinyImageNet200", "CUBS200", "Caltech256", "Indoor67", "Diabetic5", "ImageNet1k", "ImageFolder",
    "RestrictedUnpickler", "safe_pickle_load", "read_idx", "scan_image_folder", "find_classes",
    "per_class_split", "fraction_split",
]
