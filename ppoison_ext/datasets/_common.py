"""Shared plumbing of the dataset layer: data roots, md5 checks, argument checks, base classes.

Nothing here prints, downloads or writes into a data folder.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

PathLike = Union[str, "os.PathLike[str]"]

ENV_DATA_ROOT = "PPOISON_DATA"
ENV_SKIP_MD5 = "PPOISON_SKIP_MD5"

#: Folder shipped inside the package with MNIST, notMNIST (test part) and a partial FashionMNIST.
EMBEDDED_ROOT = Path(__file__).resolve().parent.parent / "embedded_data"

#: The datasets the embedded folder can serve.
EMBEDDED_DATASETS = ("MNIST", "FashionMNIST", "notMNIST")


class DatasetIntegrityError(RuntimeError):
    """A dataset file exists but is not what it should be (md5 mismatch, bad header, truncated)."""


def embedded_root() -> Path:
    """The package's own data folder (read-only; never written to)."""
    return EMBEDDED_ROOT


def _env_root() -> Optional[Path]:
    env = os.environ.get(ENV_DATA_ROOT, "").strip()
    return Path(env).expanduser() if env else None


def data_root(root: Optional[PathLike] = None) -> Path:
    """The data root a loader looks in first: ``root``, else ``$PPOISON_DATA``, else the embedded
    folder."""
    if root is not None:
        return Path(os.fspath(root)).expanduser()
    return _env_root() or EMBEDDED_ROOT


def search_roots(root: Optional[PathLike], embedded_ok: bool) -> List[Path]:
    """Roots searched, in order: an explicit ``root`` alone; else ``$PPOISON_DATA`` (if set) and, for
    the datasets that ship with the package, the embedded folder."""
    if root is not None:
        return [data_root(root)]
    env = _env_root()
    return [env, EMBEDDED_ROOT] if env and embedded_ok else [env or EMBEDDED_ROOT]


def is_embedded(path: Path) -> bool:
    try:
        Path(path).resolve().relative_to(EMBEDDED_ROOT)
    except ValueError:
        return False
    return True


def root_placeholder(root: Optional[PathLike]) -> str:
    """How to spell the user's data root in an error message when none was given."""
    if root is not None:
        return str(data_root(root))
    env = _env_root()
    return str(env) if env else "$" + ENV_DATA_ROOT


def not_found(name: str, searched: Iterable[PathLike], where: str, what: str, url: str,
              root: Optional[PathLike]) -> FileNotFoundError:
    """Build the FileNotFoundError every loader raises for missing data."""
    searched = [str(s) for s in searched]
    msg = [f"{name}: dataset not found. Searched: {', '.join(searched)}."]
    msg.append(f"Put {what} into {where}.")
    if root is None and _env_root() is None:
        msg.append(f"No data root is configured: pass root=<folder> or set {ENV_DATA_ROOT}=<folder> "
                   f"(the package's embedded folder only holds {', '.join(EMBEDDED_DATASETS)}).")
    if url:
        msg.append(f"Source: {url} (ppoison_ext never downloads).")
    return FileNotFoundError(" ".join(msg))


_MD5_LOCK = threading.Lock()
_MD5_CACHE: Dict[Tuple[str, int, int], str] = {}
_EMBEDDED_SUMS: Optional[Dict[str, str]] = None


def verify_default(verify: Optional[bool]) -> bool:
    """``verify=None`` means: verify unless ``PPOISON_SKIP_MD5`` is set to a true value."""
    if verify is not None:
        if not isinstance(verify, (bool, np.bool_)):
            raise TypeError(f"verify must be a bool or None, got {type(verify).__name__}")
        return bool(verify)
    return os.environ.get(ENV_SKIP_MD5, "").strip().lower() not in ("1", "true", "yes", "on")


def md5_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """md5 of a file, cached per process by (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _MD5_LOCK:
        hit = _MD5_CACHE.get(key)
    if hit is not None:
        return hit
    h = hashlib.md5()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    digest = h.hexdigest()
    with _MD5_LOCK:
        _MD5_CACHE[key] = digest
    return digest


def check_md5(path: PathLike, expected: str, name: str) -> None:
    got = md5_file(path)
    if got != expected:
        raise DatasetIntegrityError(
            f"{name}: md5 mismatch for {path}: expected {expected}, got {got}. The file is corrupt or not "
            f"the official one; replace it, or pass verify=False / set {ENV_SKIP_MD5}=1 to skip the check.")


def embedded_sums() -> Dict[str, str]:
    """``relative path -> md5`` from the embedded folder's MD5SUMS."""
    global _EMBEDDED_SUMS
    if _EMBEDDED_SUMS is None:
        sums: Dict[str, str] = {}
        with open(EMBEDDED_ROOT / "MD5SUMS", "r", encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    digest, rel = line.split(None, 1)
                    sums[rel.lstrip("*")] = digest
        _EMBEDDED_SUMS = sums
    return _EMBEDDED_SUMS


def check_embedded(path: Path, name: str) -> None:
    """Verify one embedded file against MD5SUMS (once per process)."""
    rel = Path(path).resolve().relative_to(EMBEDDED_ROOT).as_posix()
    expected = embedded_sums().get(rel)
    if expected is None:
        raise DatasetIntegrityError(
            f"{name}: embedded file {path} is not listed in {EMBEDDED_ROOT / 'MD5SUMS'}")
    check_md5(path, expected, name)


def verify_embedded_data() -> Dict[str, bool]:
    """Check every file listed in the embedded MD5SUMS; returns ``{relative path: ok}``."""
    return {rel: (EMBEDDED_ROOT / rel).is_file() and md5_file(EMBEDDED_ROOT / rel) == digest
            for rel, digest in embedded_sums().items()}


def check_train(train: Any, name: str, strings: Sequence[str] = ()) -> Union[bool, str]:
    """``train`` must be a bool (or, for SVHN, one of ``strings``)."""
    if isinstance(train, (bool, np.bool_)):
        return bool(train)
    if strings and isinstance(train, str):
        if train not in strings:
            raise ValueError(f"{name}: train must be a bool or one of {list(strings)}, got {train!r}")
        return train
    allowed = "a bool" + (f" or one of {list(strings)}" if strings else "")
    raise TypeError(f"{name}: train must be {allowed}, got {type(train).__name__} {train!r}")


class _ImageDataset(Dataset):
    """What the array and folder datasets share: ``classes``, ``train``, the transforms and ``root``."""

    name = "Dataset"

    def _set_meta(self, classes: Sequence[str], train: Any, transform: Optional[Callable],
                  target_transform: Optional[Callable], root: Optional[Path]) -> None:
        self.classes: List[str] = [str(c) for c in classes]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.train = train
        self.transform = transform
        self.target_transform = target_transform
        self.root = root

    def _item(self, img: Any, target: Any) -> Tuple[Any, Any]:
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return (f"{self.name}(train={self.train!r}, n={len(self)}, classes={len(self.classes)}, "
                f"root={str(self.root)!r})")


class ArrayDataset(_ImageDataset):
    """Images held in memory as uint8 arrays (``N×H×W`` grey or ``N×H×W×3`` RGB).

    ``__getitem__`` turns ``data[i]`` into a PIL image (mode ``L`` or ``RGB``, as torchvision does) and
    applies ``transform``; the label is a python int passed through ``target_transform``.
    """

    name = "ArrayDataset"

    def __init__(self, data: np.ndarray, targets: Sequence[int], classes: Sequence[str], train: Any,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None,
                 root: Optional[Path] = None) -> None:
        if data.dtype != np.uint8 or data.ndim not in (3, 4) or (data.ndim == 4 and data.shape[-1] != 3):
            raise ValueError(
                f"{self.name}: data must be uint8 N×H×W or N×H×W×3, got {data.dtype} {data.shape}")
        if len(targets) != len(data):
            raise ValueError(f"{self.name}: {len(data)} images but {len(targets)} labels")
        self.data = np.ascontiguousarray(data)
        self.targets: List[int] = [int(t) for t in targets]
        self._set_meta(classes, train, transform, target_transform, root)
        if self.targets and (min(self.targets) < 0 or max(self.targets) >= len(self.classes)):
            raise DatasetIntegrityError(
                f"{self.name}: labels span {min(self.targets)}..{max(self.targets)} but there are "
                f"{len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        return self._item(Image.fromarray(self.data[index]), self.targets[index])


def pil_loader(path: PathLike) -> Image.Image:
    """Open an image file as RGB (torchvision's ``pil_loader``)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class FolderDataset(_ImageDataset):
    """Images on disk listed in ``samples`` as ``(path, label)``, loaded lazily with :func:`pil_loader`."""

    name = "FolderDataset"

    def __init__(self, samples: List[Tuple[str, int]], classes: Sequence[str], train: Any,
                 transform: Optional[Callable] = None, target_transform: Optional[Callable] = None,
                 root: Optional[Path] = None, loader: Callable[[str], Any] = pil_loader) -> None:
        self.samples: List[Tuple[str, int]] = list(samples)
        self.imgs = self.samples
        self.targets: List[int] = [s[1] for s in self.samples]
        self._set_meta(classes, train, transform, target_transform, root)
        self.loader = loader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        path, target = self.samples[index]
        return self._item(self.loader(path), target)


class InMemory(Dataset):
    """A dataset whose items were computed once: ``dataset[i]`` for every i, stacked, with
    ``targets`` (and ``classes``) kept. Build it with :func:`in_memory`."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, classes: Optional[Sequence[str]] = None):
        self.inputs, self.targets = inputs, targets
        if classes is not None:
            self.classes = list(classes)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def in_memory(dataset: Dataset, *, max_bytes: int = 1 << 30) -> Dataset:
    """``dataset`` as an :class:`InMemory` when its transformed inputs fit in ``max_bytes``
    (estimated from the first item), else ``dataset`` itself. Only for deterministic
    transforms: random augmentations would be frozen at their first draw."""
    n = len(dataset)
    if n == 0:
        return dataset
    x0, y0 = dataset[0]
    if not isinstance(x0, torch.Tensor) or x0.element_size() * x0.numel() * n > max_bytes:
        return dataset
    pairs = [(x0, y0)] + [dataset[i] for i in range(1, n)]
    xs, ys = zip(*pairs)
    targets = torch.stack(ys) if isinstance(y0, torch.Tensor) else torch.as_tensor(ys)
    return InMemory(torch.stack(xs), targets, getattr(dataset, "classes", None))
