"""CIFAR-10, CIFAR-100 and SVHN (the ``cifar`` family's array datasets).

CIFAR is read from either official version, searched under ``R/cifar10/``, ``R/CIFAR10/`` and ``R/``
(``cifar100`` likewise):

* python version (``cifar-10-batches-py/``, ``cifar-100-python/``): the pickles are read with a restricted
  unpickler that can rebuild numpy arrays and nothing else, so a crafted file cannot run code;
* binary version (``cifar-10-batches-bin/``, ``cifar-100-binary/``).

With ``verify`` on (default, unless ``PPOISON_SKIP_MD5=1``) the python-version files and the SVHN ``.mat``
files are checked against the official md5 values (the binary version has no published per-file md5).
"""
from __future__ import annotations

import codecs
import functools
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._common import (ArrayDataset, DatasetIntegrityError, PathLike, check_md5, check_train, not_found,
                      root_placeholder, search_roots, verify_default)


_LATIN1 = {"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "iso_8859_1", "l1"}


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles of numpy arrays carry their bytes as `_codecs.encode(<str>, 'latin1')`.
    if encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, "latin1", errors)


@functools.cache
def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: Dict[Tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays; any other global raises."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed in dataset pickles")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids in dataset pickles")


def safe_pickle_load(path: PathLike) -> Any:
    """Load a dataset pickle (latin1 strings, as CIFAR's Python-2 pickles need) without running code."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{path}: {e}") from None


def _str_keys(d: Any, path: Path) -> Dict[str, Any]:
    if not isinstance(d, dict):
        raise DatasetIntegrityError(f"{path}: expected a dict, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in d.items()}


class _CIFARBase(ArrayDataset):
    name = "CIFAR"
    folders: Sequence[str] = ()
    py_dir = ""
    py_train: Sequence[Tuple[str, str]] = ()
    py_test: Sequence[Tuple[str, str]] = ()
    py_meta: Tuple[str, str, str] = ("", "", "")     # file, key, md5
    py_label_key = ""
    bin_dir = ""
    bin_train: Sequence[str] = ()
    bin_test: Sequence[str] = ()
    bin_meta = ""
    bin_label_offset = 0      # byte of the (fine) label in each record
    bin_header = 1            # label bytes before the 3072 pixel bytes
    default_classes: Optional[Sequence[str]] = None
    url = "https://www.cs.toronto.edu/~kriz/cifar.html"

    def __init__(self, root: Optional[PathLike] = None, train: bool = True,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None,
                 verify: Optional[bool] = None) -> None:
        train = check_train(train, self.name)
        verify = verify_default(verify)
        fmt, folder, found_root = self._locate(root)
        if fmt == "python":
            data, labels, classes = self._load_python(folder, train, verify)
        else:
            data, labels, classes = self._load_binary(folder, train)
        super().__init__(data, labels, classes, train, transform, target_transform, root=found_root)
        self.format = fmt
        self.folder = str(folder)

    def _locate(self, root: Optional[PathLike]) -> Tuple[str, Path, Path]:
        """``(format, folder, data root)`` of the first complete copy found."""
        roots = search_roots(root, embedded_ok=False)
        py_names = [f for f, _ in tuple(self.py_train) + tuple(self.py_test)] + [self.py_meta[0]]
        bin_names = list(self.bin_train) + list(self.bin_test)
        for r in roots:
            for base in [r / f for f in self.folders] + [r]:
                if self._complete(base / self.py_dir, py_names):
                    return "python", base / self.py_dir, r
                if self._complete(base / self.bin_dir, bin_names):
                    return "binary", base / self.bin_dir, r
        where = f"{root_placeholder(root)}/{self.folders[0]}/"
        what = (f"the extracted python version ({self.py_dir}/ with {', '.join(py_names)}) or binary "
                f"version ({self.bin_dir}/ with {', '.join(bin_names)})")
        raise not_found(self.name, roots, where, what, self.url, root)

    @staticmethod
    def _complete(d: Path, names: Sequence[str]) -> bool:
        return d.is_dir() and all((d / n).is_file() for n in names)

    def _load_python(self, d: Path, train: bool, verify: bool) -> Tuple[np.ndarray, List[int], List[str]]:
        files = self.py_train if train else self.py_test
        meta_file, meta_key, meta_md5 = self.py_meta
        if verify:
            for fname, md5 in list(files) + [(meta_file, meta_md5)]:
                check_md5(d / fname, md5, self.name)
        chunks, labels = [], []
        for fname, _ in files:
            p = d / fname
            entry = _str_keys(safe_pickle_load(p), p)
            arr = entry.get("data")
            lab = entry.get(self.py_label_key, entry.get("labels"))
            if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 2
                    and arr.shape[1] == 3072):
                raise DatasetIntegrityError(f"{p}: 'data' must be a uint8 N×3072 array")
            if lab is None or len(lab) != len(arr):
                raise DatasetIntegrityError(f"{p}: missing or mis-sized '{self.py_label_key}'")
            chunks.append(arr)
            labels += [int(x) for x in lab]
        meta = _str_keys(safe_pickle_load(d / meta_file), d / meta_file)
        classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in meta[meta_key]]
        data = np.concatenate(chunks).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return data, labels, classes

    def _load_binary(self, d: Path, train: bool) -> Tuple[np.ndarray, List[int], List[str]]:
        rec = self.bin_header + 3072
        chunks = []
        for fname in (self.bin_train if train else self.bin_test):
            raw = np.fromfile(d / fname, dtype=np.uint8)
            if raw.size % rec:
                raise DatasetIntegrityError(f"{d / fname}: size {raw.size} is not a multiple of {rec}")
            chunks.append(raw.reshape(-1, rec))
        recs = np.concatenate(chunks)
        labels = recs[:, self.bin_label_offset].astype(np.int64).tolist()
        data = recs[:, self.bin_header:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        meta = d / self.bin_meta
        if meta.is_file():
            classes = [ln.strip() for ln in meta.read_text(encoding="latin1").splitlines() if ln.strip()]
        elif self.default_classes is not None:
            classes = list(self.default_classes)
        else:
            raise FileNotFoundError(f"{self.name}: {meta} is missing (class names)")
        return data, labels, classes


class CIFAR10(_CIFARBase):
    """CIFAR-10 (python or binary version), 50,000 train / 10,000 test images, ``.data`` N×32×32×3."""

    name = "CIFAR10"
    folders = ("cifar10", "CIFAR10")
    py_dir = "cifar-10-batches-py"
    py_train = (("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"))
    py_test = (("test_batch", "40351d587109b95175f43aff81a1287e"),)
    py_meta = ("batches.meta", "label_names", "5ff9c542aee3614f3951f8cda6e48888")
    py_label_key = "labels"
    bin_dir = "cifar-10-batches-bin"
    bin_train = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
    bin_test = ("test_batch.bin",)
    bin_meta = "batches.meta.txt"
    default_classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                       "truck")


class CIFAR100(_CIFARBase):
    """CIFAR-100 with the 100 fine labels (python or binary version)."""

    name = "CIFAR100"
    folders = ("cifar100", "CIFAR100")
    py_dir = "cifar-100-python"
    py_train = (("train", "16019d7e3df5f24257cddd939b257f8d"),)
    py_test = (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),)
    py_meta = ("meta", "fine_label_names", "7973b15100ade9c7d40fb424638fde48")
    py_label_key = "fine_labels"
    bin_dir = "cifar-100-binary"
    bin_train = ("train.bin",)
    bin_test = ("test.bin",)
    bin_meta = "fine_label_names.txt"
    bin_label_offset = 1
    bin_header = 2


_SVHN_MD5 = {
    "train": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test": "eb5a983be6a315427106f1b164d9cef3",
    "extra": "a93ce644f1a588dc4d68dda5feec44a7",
}


def _loadmat(path: Path) -> Dict[str, Any]:
    try:
        import scipy.io as sio
    except ImportError:
        raise ImportError(f"SVHN: reading {path} needs scipy (scipy.io.loadmat); install it with "
                          "`pip install scipy`") from None
    return sio.loadmat(str(path))


class SVHN(ArrayDataset):
    """SVHN cropped digits (``{train,test,extra}_32x32.mat``), labels 0..9 (the files' 10 means 0).

    ``train`` is a bool (True → 'train', False → 'test') or one of 'train', 'test', 'extra'.
    ``.data`` is N×32×32×3 and ``.classes`` is ``['0', ..., '9']`` (torchvision's SVHN has neither).
    """

    name = "SVHN"
    folders = ("svhn", "SVHN")
    url = "http://ufldl.stanford.edu/housenumbers/"

    def __init__(self, root: Optional[PathLike] = None, train: Any = True,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None,
                 verify: Optional[bool] = None) -> None:
        train = check_train(train, self.name, strings=("train", "test", "extra"))
        split = train if isinstance(train, str) else ("train" if train else "test")
        verify = verify_default(verify)
        fname = f"{split}_32x32.mat"
        roots = search_roots(root, embedded_ok=False)
        path, found_root = None, None
        for r in roots:
            bases = [r / f for f in self.folders] + [r]
            path = next((b / fname for b in bases if (b / fname).is_file()), None)
            if path is not None:
                found_root = r
                break
        if path is None:
            raise not_found(self.name, roots, f"{root_placeholder(root)}/{self.folders[0]}/", fname, self.url,
                            root)
        if verify:
            check_md5(path, _SVHN_MD5[split], self.name)
        mat = _loadmat(path)
        X, y = mat.get("X"), mat.get("y")
        if not isinstance(X, np.ndarray) or X.ndim != 4 or X.shape[2] != 3 or y is None:
            raise DatasetIntegrityError(f"{path}: expected 'X' 32×32×3×N and 'y'")
        labels = np.asarray(y, dtype=np.int64).reshape(-1)
        labels = np.where(labels == 10, 0, labels)
        data = np.asarray(X, dtype=np.uint8).transpose(3, 0, 1, 2)
        super().__init__(data, labels.tolist(), [str(i) for i in range(10)], train, transform,
                         target_transform, root=found_root)
        self.split = split
        self.file = str(path)
