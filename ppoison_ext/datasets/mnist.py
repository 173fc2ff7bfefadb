"""MNIST-like datasets: MNIST, FashionMNIST, KMNIST, EMNIST (balanced), EMNISTLetters, notMNIST.

Files are read with :func:`read_idx` (plain or ``.gz``) from, for a data root ``R`` and dataset ``Name``:

1. ``R/Name/raw/``              (torchvision's layout: ``torchvision.datasets.Name(root=R)``)
2. ``R/<ko>/Name/raw/``         (Knockoff Nets' layout, e.g. ``R/mnist/MNIST/raw/``)
3. ``R/Name/`` and ``R/<ko>/``  (the files directly in the folder)

plus a ``gzip/`` sub-folder of each (how the EMNIST archive unpacks). A ``partial/`` folder beside
``raw/`` may hold declared prefixes ``<file>.gz.first<N>bytes`` (the embedded FashionMNIST); they are used
only when no complete images file is found, and the dataset then has ``is_partial = True``.
"""
from __future__ import annotations

import re
import string
import struct
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._common import (ArrayDataset, DatasetIntegrityError, PathLike, check_embedded, check_train, is_embedded,
                      not_found, root_placeholder, search_roots, verify_default)

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

_PARTIAL_RE = re.compile(r"\.first\d+bytes$")


def _gunzip(raw: bytes, path: Path, allow_truncated: bool) -> Tuple[bytes, bool]:
    """Decompress every gzip member; returns (bytes, truncated)."""
    out = []
    while raw:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out.append(d.decompress(raw))
        except zlib.error as e:
            raise DatasetIntegrityError(f"{path}: not a valid gzip file ({e})") from None
        if not d.eof:
            if allow_truncated:
                return b"".join(out), True
            raise DatasetIntegrityError(f"{path}: gzip stream is truncated (incomplete download?)")
        raw = d.unused_data.lstrip(b"\x00")
    return b"".join(out), False


def read_idx(path: PathLike, magic: int) -> Tuple[np.ndarray, bool]:
    """Read a uint8 IDX file; returns ``(array, truncated)``.

    ``magic`` is 2051 for images (``N×H×W``) or 2049 for labels (``N``). The magic number, the number
    of dimensions and the byte count are checked. Only a declared prefix (``*.first<N>bytes``) may be
    truncated: the array then holds its complete leading records and ``truncated`` is True.
    """
    p = Path(path)
    buf = p.read_bytes()
    truncated = bool(_PARTIAL_RE.search(p.name))  # a declared prefix of a larger file
    if buf[:2] == b"\x1f\x8b" or ".gz" in p.suffixes:
        buf, truncated = _gunzip(buf, p, allow_truncated=truncated)
    if len(buf) < 4:
        raise DatasetIntegrityError(f"{p}: too short for an IDX header")
    (got,) = struct.unpack(">I", buf[:4])
    if got != magic:
        raise DatasetIntegrityError(f"{p}: bad IDX magic number {got}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise DatasetIntegrityError(f"{p}: truncated IDX header")
    dims = struct.unpack(">" + "I" * ndim, buf[4:header])
    record = int(np.prod(dims[1:], dtype=np.int64)) if ndim > 1 else 1
    body = len(buf) - header
    if truncated:
        n = min(dims[0], body // record)
    else:
        n = dims[0]
        if body != n * record:
            raise DatasetIntegrityError(
                f"{p}: header says {dims} ({header + n * record} bytes) but the file has {len(buf)} bytes")
    arr = np.frombuffer(buf, dtype=np.uint8, count=n * record, offset=header).reshape((n,) + tuple(dims[1:]))
    return arr, truncated


_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _emnist_files(split: str) -> Dict[bool, Tuple[str, str]]:
    return {t: (f"emnist-{split}-{s}-images-idx3-ubyte", f"emnist-{split}-{s}-labels-idx1-ubyte")
            for t, s in ((True, "train"), (False, "test"))}


class _MNISTLike(ArrayDataset):
    """Base class; subclasses set the class attributes below."""

    name = "MNISTLike"
    folder_names: Sequence[str] = ()     # torchvision / Knockoff class-name folders, first is canonical
    ko_folder = ""                       # Knockoff Nets' folder under its data root
    files: Dict[bool, Tuple[str, str]] = _MNIST_FILES
    classes_list: Sequence[str] = ()
    url = ""
    transpose = False                    # EMNIST: stored transposed
    embedded_ok = False

    def __init__(self, root: Optional[PathLike] = None, train: bool = True,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None,
                 verify: Optional[bool] = None) -> None:
        train = check_train(train, self.name)
        verify = verify_default(verify)
        images_path, labels_path, found_root = self._locate(root, train)
        for p in (images_path, labels_path):
            if verify and is_embedded(p):
                check_embedded(p, self.name)
        images, truncated = read_idx(images_path, IDX_IMAGES_MAGIC)
        labels, _ = read_idx(labels_path, IDX_LABELS_MAGIC)
        if truncated:
            labels = labels[: len(images)]
        if len(labels) != len(images):
            raise DatasetIntegrityError(f"{self.name}: {len(images)} images in {images_path} but "
                                        f"{len(labels)} labels in {labels_path}")
        if self.transpose:
            images = images.transpose(0, 2, 1)
        labels = self._fix_labels(labels, labels_path)
        super().__init__(np.array(images, dtype=np.uint8, copy=True, order="C"), labels.tolist(),
                         self.classes_list, train, transform, target_transform, root=found_root)
        self.images_file = str(images_path)
        self.labels_file = str(labels_path)
        self.is_partial = bool(truncated)

    def _fix_labels(self, labels: np.ndarray, path: Path) -> np.ndarray:
        return labels.astype(np.int64)

    def _candidate_dirs(self, root: Path) -> List[Path]:
        bases = [root / n for n in self.folder_names]
        if self.ko_folder:
            bases += [root / self.ko_folder / n for n in self.folder_names]
        dirs: List[Path] = []
        for b in bases:
            dirs += [b / "raw", b / "raw" / "gzip"]
        for b in bases + ([root / self.ko_folder] if self.ko_folder else []):
            dirs += [b, b / "gzip"]
        return list(dict.fromkeys(dirs))

    @staticmethod
    def _find_file(d: Path, fname: str) -> Optional[Path]:
        return next((c for c in (d / fname, d / (fname + ".gz")) if c.is_file()), None)

    @staticmethod
    def _find_partial(d: Path, fname: str) -> Optional[Path]:
        pdir = d.parent / "partial" if d.name == "raw" else d / "partial"
        if not pdir.is_dir():
            return None
        for pat in (fname + ".gz.first*bytes", fname + ".first*bytes"):
            hits = sorted(pdir.glob(pat))
            if hits:
                return hits[0]
        return None

    def _locate(self, root: Optional[PathLike], train: bool) -> Tuple[Path, Path, Path]:
        """``(images file, labels file, data root they were found under)``."""
        img_name, lbl_name = self.files[train]
        roots = search_roots(root, self.embedded_ok)
        for r in roots:
            dirs = self._candidate_dirs(r)
            fallback = None
            for d in dirs:
                labels = self._find_file(d, lbl_name)
                if labels is None:
                    continue
                images = self._find_file(d, img_name)
                if images is not None:
                    return images, labels, r
                partial = self._find_partial(d, img_name)
                if partial is not None and fallback is None:
                    fallback = (partial, labels, r)
            if fallback is not None:
                return fallback
        where = f"{root_placeholder(root)}/{self.folder_names[0]}/raw/"
        what = f"{img_name}.gz and {lbl_name}.gz (or the uncompressed files)"
        raise not_found(self.name, [str(r) for r in roots], where, what, self.url, root)


class MNIST(_MNISTLike):
    """MNIST (LeCun et al.), 10 digits. Ships with the package (all 70,000 images)."""

    name = "MNIST"
    folder_names = ("MNIST",)
    ko_folder = "mnist"
    classes_list = ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six",
                    "7 - seven", "8 - eight", "9 - nine")
    url = "http://yann.lecun.com/exdb/mnist/"
    embedded_ok = True


class FashionMNIST(_MNISTLike):
    """Fashion-MNIST (Zalando). The embedded copy is partial (1,813 train / 1,770 test images)."""

    name = "FashionMNIST"
    folder_names = ("FashionMNIST",)
    ko_folder = "mnist_fashion"
    classes_list = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                    "Bag", "Ankle boot")
    url = "https://github.com/zalandoresearch/fashion-mnist"
    embedded_ok = True


class KMNIST(_MNISTLike):
    """Kuzushiji-MNIST, 10 classes."""

    name = "KMNIST"
    folder_names = ("KMNIST",)
    ko_folder = "kmnist"
    classes_list = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    url = "https://github.com/rois-codh/kmnist"


_EMNIST_MERGED = set("cijklmopsuvwxyz")
_EMNIST_BALANCED = sorted(set(string.digits + string.ascii_letters) - _EMNIST_MERGED)


class EMNIST(_MNISTLike):
    """EMNIST ``balanced`` split (47 classes). Images are transposed back to upright."""

    name = "EMNIST"
    folder_names = ("EMNIST",)
    ko_folder = "emnist"
    files = _emnist_files("balanced")
    classes_list = tuple(_EMNIST_BALANCED)
    url = "https://www.nist.gov/itl/products-and-services/emnist-dataset"
    transpose = True


class EMNISTLetters(_MNISTLike):
    """EMNIST ``letters`` split: 26 classes ``a``..``z``.

    The files label the letters 1..26; they are shifted to 0..25 so that the labels index ``classes``.
    """

    name = "EMNISTLetters"
    folder_names = ("EMNIST", "EMNISTLetters")
    ko_folder = "emnist"
    files = _emnist_files("letters")
    classes_list = tuple(string.ascii_lowercase)
    url = "https://www.nist.gov/itl/products-and-services/emnist-dataset"
    transpose = True

    def _fix_labels(self, labels: np.ndarray, path: Path) -> np.ndarray:
        labels = labels.astype(np.int64)
        if labels.size == 0:
            return labels
        lo, hi = int(labels.min()), int(labels.max())
        if lo >= 1 and hi <= 26:
            return labels - 1
        if lo >= 0 and hi <= 25:
            return labels
        raise DatasetIntegrityError(f"{self.name}: labels in {path} span {lo}..{hi}; expected 1..26")


class NotMNIST(_MNISTLike):
    """notMNIST letters A..J in MNIST format; only the 10,000-image test part exists.

    ``train=True`` and ``train=False`` both return those 10,000 images: the set is only used as a thief's
    query set. Ships with the package.
    """

    name = "notMNIST"
    folder_names = ("notMNIST",)
    ko_folder = "notmnist"
    files = {True: _MNIST_FILES[False], False: _MNIST_FILES[False]}
    classes_list = tuple("ABCDEFGHIJ")
    url = "https://github.com/davidflanagan/notMNIST-to-MNIST"
    embedded_ok = True
