"""Datasets stored as folders of image files (one sub-folder per class), with Knockoff Nets' splits.

Scanning follows torchvision's ``ImageFolder`` (:func:`scan_image_folder`); the seeded splits index
into its sample order.

Folders under the data root ``R`` (Knockoff Nets' names) and splits:

* TinyImageNet200: ``R/tiny-imagenet-200/{train,val}``; official train / val.
* CUBS200: ``R/CUB_200_2011/images`` with ``images.txt`` and ``train_test_split.txt``; the official split.
* Caltech256: ``R/256_ObjectCategories``; ``257.clutter`` dropped; per class (seed 123) 25 test, rest train.
* Indoor67: ``R/indoor/Images`` and ``R/indoor/TestImages.txt``; listed images are test, the rest train.
* Diabetic5: ``R/diabetic_retinopathy/training_imgs``; per class (seed 123) 200 test, rest train.
* ImageNet1k: ``R/ILSVRC2012/training_imgs``; seed 123: 20 % test, 80 % train.
* ImageFolder: ``root`` itself; no split.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._common import (DatasetIntegrityError, FolderDataset, PathLike, check_train, not_found,
                      root_placeholder, search_roots)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DS_SEED = 123   # seed of every seeded split


def find_classes(directory: PathLike) -> List[str]:
    """Sorted names of the sub-folders of ``directory``."""
    with os.scandir(directory) as it:
        return sorted(e.name for e in it if e.is_dir())


def scan_image_folder(directory: PathLike, extensions: Sequence[str] = IMG_EXTENSIONS
                      ) -> Tuple[List[str], List[Tuple[str, int]]]:
    """``(classes, samples)`` in torchvision ``ImageFolder`` order: sorted class folders, each walked
    recursively (``sorted(os.walk(..., followlinks=True))``, files sorted). Empty classes are allowed."""
    directory = os.fspath(directory)
    classes = find_classes(directory)
    exts = tuple(e.lower() for e in extensions)
    samples: List[Tuple[str, int]] = []
    for idx, cls in enumerate(classes):
        for dirpath, _, fnames in sorted(os.walk(os.path.join(directory, cls), followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(exts):
                    samples.append((os.path.join(dirpath, fname), idx))
    return classes, samples


def per_class_split(targets: Sequence[int], ntest: int, seed: int = DS_SEED) -> Tuple[List[int], List[int]]:
    """The per-class split: ``(train_idxs, test_idxs)``.

    Indices are grouped by class in order of first appearance; one ``RandomState(seed)`` shuffles each
    group in turn (differences.md: seeded splits); the first ``ntest`` of each group go to test, the
    rest to train. Both lists are concatenations over the classes in that order.
    """
    rs = np.random.RandomState(seed)
    groups: Dict[int, List[int]] = {}
    for idx, t in enumerate(targets):
        groups.setdefault(t, []).append(idx)
    for idxs in groups.values():
        rs.shuffle(idxs)
    train, test = [], []
    for idxs in groups.values():
        test += idxs[:ntest]
        train += idxs[ntest:]
    return train, test


def fraction_split(n: int, test_frac: float, seed: int = DS_SEED) -> Tuple[List[int], List[int]]:
    """The ImageNet1k split: ``(train_idxs, test_idxs)``.

    ``test = RandomState(seed).choice(arange(n), int(test_frac * n), replace=False)`` in drawn order;
    ``train`` = the rest in ascending order.
    """
    rs = np.random.RandomState(seed)
    n_test = int(test_frac * n)
    test = rs.choice(np.arange(n), replace=False, size=n_test)
    mask = np.ones(n, dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask).tolist(), test.tolist()


def _find_dir(name: str, root: Optional[PathLike], rels: Sequence[str], where: str, what: str, url: str
              ) -> Tuple[Path, Path]:
    """First existing ``R/<rel>`` over the search roots: ``(folder, R)``; a miss says to put
    ``what`` into ``R/<where>/``."""
    roots = search_roots(root, embedded_ok=False)
    for r in roots:
        for rel in rels:
            if (r / rel).is_dir():
                return r / rel, r
    raise not_found(name, roots, f"{root_placeholder(root)}/{where}/", what, url, root)


def _require_file(name: str, path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {path} is missing ({what}).")
    return path


def _read_columns(path: Path, maxsplit: int = -1) -> List[List[str]]:
    """The whitespace-separated fields of each line of a text file that has at least two."""
    with open(path, "r", encoding="utf-8") as f:
        return [parts for parts in (line.strip().split(maxsplit=maxsplit) for line in f) if len(parts) >= 2]


def _scan_nonempty(name: str, directory: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{name}: folder {directory} does not exist.")
    classes, samples = scan_image_folder(directory)
    if not classes:
        raise FileNotFoundError(f"{name}: no class sub-folders in {directory}.")
    return classes, samples


class ImageFolder(FolderDataset):
    """Any folder of class sub-folders (``--root`` query sets). ``root`` is that folder.

    There is no split: ``train`` is checked but both values return every image.
    """

    name = "ImageFolder"

    def __init__(self, root: Optional[PathLike] = None, train: bool = True,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None) -> None:
        train = check_train(train, self.name)
        if root is None:
            raise ValueError("ImageFolder needs root=<folder whose sub-folders are the classes>")
        folder = Path(os.fspath(root)).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageFolder: folder {folder} does not exist. Put one sub-folder of "
                                    f"images per class into {folder}/.")
        classes, samples = _scan_nonempty(self.name, folder)
        super().__init__(samples, classes, train, transform, target_transform, root=folder)


class _SeededFolder(FolderDataset):
    """A single image folder split into train/test by seeded rules."""

    rels: Sequence[str] = ()   # folder scanned, relative to the data root (first = canonical)
    where = ""                 # folder named in the "not found" message, relative to the data root
    what = ""
    url = ""

    def __init__(self, root: Optional[PathLike] = None, train: bool = True,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None) -> None:
        train = check_train(train, self.name)
        folder, self.data_root = _find_dir(self.name, root, self.rels, self.where, self.what, self.url)
        classes, samples = _scan_nonempty(self.name, folder)
        classes, samples = self._cleanup(classes, samples)
        train_idxs, test_idxs = self._split(folder, samples)
        self.partition_to_idxs = {"train": train_idxs, "test": test_idxs}
        pruned = [samples[i] for i in (train_idxs if train else test_idxs)]
        super().__init__(pruned, classes, train, transform, target_transform, root=folder)

    def _cleanup(self, classes: List[str], samples: List[Tuple[str, int]]
                 ) -> Tuple[List[str], List[Tuple[str, int]]]:
        return classes, samples

    def _split(self, folder: Path, samples: List[Tuple[str, int]]) -> Tuple[List[int], List[int]]:
        """The per-class split with ``ntest`` test images per class."""
        return per_class_split([t for _, t in samples], self.ntest)


class Caltech256(_SeededFolder):
    """Caltech-256 without ``257.clutter`` (256 classes); per class (seed 123) 25 test images, rest train."""

    name = "Caltech256"
    rels = ("256_ObjectCategories", "caltech256/256_ObjectCategories")
    where = "256_ObjectCategories"
    what = "the class folders 001.ak47/ .. 257.clutter/ of 256_ObjectCategories.tar"
    url = "https://data.caltech.edu/records/nyy15-4j048"
    ntest = 25
    clutter = "257.clutter"

    def _cleanup(self, classes, samples):
        if self.clutter not in classes:
            return classes, samples
        drop = classes.index(self.clutter)
        keep = [c for c in classes if c != self.clutter]
        remap = {classes.index(c): i for i, c in enumerate(keep)}
        return keep, [(p, remap[t]) for p, t in samples if t != drop]


class Diabetic5(_SeededFolder):
    """Kaggle diabetic retinopathy, 5 grades; per class (seed 123) 200 test images, rest train."""

    name = "Diabetic5"
    rels = ("diabetic_retinopathy/training_imgs",)
    where = "diabetic_retinopathy/training_imgs"
    what = "the Kaggle training images sorted into one folder per grade (0/ .. 4/)"
    url = "https://www.kaggle.com/c/diabetic-retinopathy-detection"
    ntest = 200


class ImageNet1k(_SeededFolder):
    """ILSVRC-2012 training images split 80/20 (seed 123); the official validation set is not used."""

    name = "ImageNet1k"
    rels = ("ILSVRC2012/training_imgs",)
    where = "ILSVRC2012/training_imgs"
    what = "the ILSVRC2012 training images, one folder per synset (n01440764/ ...)"
    url = "https://image-net.org/download-images"
    test_frac = 0.2

    def _split(self, folder, samples):
        return fraction_split(len(samples), self.test_frac)


class Indoor67(_SeededFolder):
    """MIT Indoor-67: images listed in ``TestImages.txt`` are the test split, the rest train."""

    name = "Indoor67"
    rels = ("indoor/Images",)
    where = "indoor"
    what = "Images/ (from indoorCVPR_09.tar, one folder per class) and TestImages.txt"
    url = "https://web.mit.edu/torralba/www/indoor.html"

    def _split(self, folder, samples):
        listing = _require_file(self.name, folder.parent / "TestImages.txt", "the official test list")
        with open(listing, "r", encoding="utf-8") as f:
            test_images = {ln.strip() for ln in f if ln.strip()}
        train, test = [], []
        for idx, (path, _) in enumerate(samples):
            rel = Path(os.path.relpath(path, folder)).as_posix()
            (test if rel in test_images else train).append(idx)
        return train, test


class CUBS200(_SeededFolder):
    """CUB-200-2011 birds (200 classes) with the official ``train_test_split.txt`` (matched by file name).

    Image files not listed in ``images.txt`` are left out of both splits.
    """

    name = "CUBS200"
    rels = ("CUB_200_2011/images",)
    where = "CUB_200_2011"
    what = "images/, images.txt and train_test_split.txt (from CUB_200_2011.tgz)"
    url = "https://www.vision.caltech.edu/datasets/cub_200_2011/"

    def _split(self, folder, samples):
        base = folder.parent
        images = _read_columns(_require_file(self.name, base / "images.txt", "image id → path"))
        name_to_id = {os.path.basename(filepath): image_id for image_id, filepath in images}
        flags = _read_columns(_require_file(self.name, base / "train_test_split.txt",
                                            "image id → 1 train / 0 test"))
        id_to_train = {image_id: bool(int(flag)) for image_id, flag in flags}
        train, test = [], []
        for idx, (path, _) in enumerate(samples):
            image_id = name_to_id.get(os.path.basename(path))
            if image_id is None:
                continue
            if image_id not in id_to_train:
                raise DatasetIntegrityError(f"{self.name}: image id {image_id} ({path}) has no entry in "
                                            f"{base / 'train_test_split.txt'}")
            (train if id_to_train[image_id] else test).append(idx)
        return train, test


class TinyImageNet200(FolderDataset):
    """Tiny ImageNet (200 classes, 64×64): ``train/`` for train, ``val/`` for test.

    Both the official layout (``train/<wnid>/images/*.JPEG``; ``val/images/`` + ``val_annotations.txt``,
    regrouped by class in memory, nothing is moved) and Knockoff Nets' restructured layout
    (``val/<wnid>/*.JPEG``) work. ``classes`` are the ``words.txt`` descriptions when that file exists,
    else the wnids; ``wnids`` keeps the latter. Family ``cifar``.
    """

    name = "TinyImageNet200"
    rels = ("tiny-imagenet-200",)
    where = "tiny-imagenet-200"
    what = "train/, val/, wnids.txt and words.txt (from tiny-imagenet-200.zip)"
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

    def __init__(self, root: Optional[PathLike] = None, train: bool = True,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None) -> None:
        train = check_train(train, self.name)
        base, self.data_root = _find_dir(self.name, root, self.rels, self.where, self.what, self.url)
        if train:
            folder = base / "train"
            wnids, samples = _scan_nonempty(self.name, folder)
        else:
            folder = base / "val"
            wnids, samples = self._load_val(base, folder)
        self.wnids = list(wnids)
        classes = self._describe(base, self.wnids)
        super().__init__(samples, classes, train, transform, target_transform, root=folder)

    def _load_val(self, base: Path, folder: Path) -> Tuple[List[str], List[Tuple[str, int]]]:
        ann, images = folder / "val_annotations.txt", folder / "images"
        if not (ann.is_file() and images.is_dir()):
            return _scan_nonempty(self.name, folder)
        pairs = [(parts[0], parts[1]) for parts in _read_columns(ann)]
        if (base / "train").is_dir():
            wnids = find_classes(base / "train")
        elif (base / "wnids.txt").is_file():
            wnids = sorted(w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip())
        else:
            wnids = sorted({w for _, w in pairs})
        index = {w: i for i, w in enumerate(wnids)}
        samples = []
        for fname, wnid in pairs:
            if wnid not in index:
                raise DatasetIntegrityError(f"{self.name}: {ann} names class {wnid}, which is not among the "
                                            f"{len(wnids)} training classes")
            path = images / fname
            if fname.lower().endswith(IMG_EXTENSIONS) and path.is_file():
                samples.append((str(path), index[wnid]))
        samples.sort(key=lambda s: (s[1], os.path.basename(s[0])))
        return wnids, samples

    @staticmethod
    def _describe(base: Path, wnids: List[str]) -> List[str]:
        words = base / "words.txt"
        if not words.is_file():
            return list(wnids)
        desc = dict(_read_columns(words, maxsplit=1))
        return [desc.get(w, w) for w in wnids]
