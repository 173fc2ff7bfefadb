"""Transfer sets: the (query, defended posterior) pairs an attacker collects.

Stored in a folder as append-only files, so that building one can be killed at any
moment and resumed with no query lost or repeated, and nothing is ever unpickled:

* ``transferset.json``      — description: ``num_classes``, ``kind`` (``images``: raw uint8
  pixels; ``paths``: image file paths), ``image_shape``, plus what the builder records.
* ``transferset.y.f32``     — little-endian float32 rows [N, K]: the released posteriors.
* ``transferset.index.i64`` — int64 [N]: the query-set index of each query.
* ``transferset.x.u8``      — uint8 [N, *image_shape] (``images``), or
  ``transferset.paths.txt`` — one path per line (``paths``).

A batch is committed when its ``y`` rows are written (the other files first); anything beyond
the complete ``y`` rows (a batch cut off by a crash) is dropped on load and truncated on resume.
:func:`export_pickle` also writes ``transferset.pickle`` on request.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..fileio import AppendFile, atomic_write, atomic_write_json, truncate_file

__all__ = ["TransferSetWriter", "TransferSet", "load_transferset", "export_pickle", "TransferSetError"]

META = "transferset.json"
Y_FILE, INDEX_FILE = "transferset.y.f32", "transferset.index.i64"
X_FILE, PATHS_FILE = "transferset.x.u8", "transferset.paths.txt"


class TransferSetError(ValueError):
    """A transfer-set folder is missing, malformed, or does not fit its use."""


def _read_meta(folder: Path) -> Dict[str, Any]:
    path = folder / META
    if not path.exists():
        raise TransferSetError(f"{path}: no transfer set here (missing {META})")
    try:
        meta = json.loads(path.read_text())
        K = int(meta["num_classes"])
        kind = meta["kind"]
    except (ValueError, KeyError, TypeError) as err:
        raise TransferSetError(f"{path}: malformed transfer-set description ({err})") from err
    if K < 2 or kind not in ("images", "paths"):
        raise TransferSetError(f"{path}: num_classes must be >= 2 and kind 'images' or 'paths', "
                               f"got {K}, {kind!r}")
    if kind == "images" and not isinstance(meta.get("image_shape"), list):
        raise TransferSetError(f"{path}: kind 'images' needs image_shape")
    return meta


def _count_rows(path: Path, row_bytes: int) -> int:
    return path.stat().st_size // row_bytes if path.exists() else 0


def _read_paths(path: Path, n: int) -> List[str]:
    if not path.exists():
        return []
    return path.read_text().split("\n")[:-1][:n]  # the last element follows the last newline


def _committed(folder: Path, K: int, kind: str, x_bytes: int) -> int:
    """The number of queries every file of the folder holds completely."""
    n = min(_count_rows(folder / Y_FILE, 4 * K), _count_rows(folder / INDEX_FILE, 8))
    if kind == "images":
        return min(n, _count_rows(folder / X_FILE, x_bytes))
    return min(n, len(_read_paths(folder / PATHS_FILE, n)))


class TransferSetWriter:
    """Appends queries to a transfer-set folder (created); with ``resume``, continues the one
    there (its ``num_classes``, ``kind`` and ``image_shape`` must agree), else starts over.
    ``append`` one batch at a time, then ``close`` (or use it as a context manager)."""

    def __init__(self, folder, *, num_classes: int, kind: str = "images",
                 image_shape: Optional[Sequence[int]] = None, meta: Optional[Dict[str, Any]] = None,
                 resume: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if kind not in ("images", "paths"):
            raise ValueError(f"kind must be 'images' or 'paths', got {kind!r}")
        if kind == "images" and image_shape is None:
            raise ValueError("kind 'images' needs image_shape")
        self.K, self.kind = int(num_classes), kind
        self.image_shape = [int(s) for s in image_shape] if image_shape is not None else None
        self._x_bytes = int(np.prod(self.image_shape)) if self.image_shape else 0
        desc = dict(meta or {})
        desc.update(num_classes=self.K, kind=kind, image_shape=self.image_shape, format_version=1)
        if resume and (self.folder / META).exists():
            old = _read_meta(self.folder)
            for key in ("num_classes", "kind", "image_shape"):
                if old.get(key) != desc.get(key):
                    raise TransferSetError(f"{self.folder / META}: cannot resume, {key} is {old.get(key)!r} "
                                           f"there but {desc.get(key)!r} here")
            self.done = n = _committed(self.folder, self.K, kind, self._x_bytes)
            for name, row_bytes in ((Y_FILE, 4 * self.K), (INDEX_FILE, 8), (X_FILE, self._x_bytes)):
                truncate_file(self.folder / name, n * row_bytes)
            if kind == "paths":
                paths = _read_paths(self.folder / PATHS_FILE, n)
                (self.folder / PATHS_FILE).write_text("".join(s + "\n" for s in paths))
        else:
            for name in (META, Y_FILE, INDEX_FILE, X_FILE, PATHS_FILE):
                (self.folder / name).unlink(missing_ok=True)
            atomic_write_json(self.folder / META, desc)
            self.done = 0
        self._files = {}

    def _write(self, name: str, data: bytes) -> None:
        self._files.setdefault(name, AppendFile(self.folder / name)).append(data)

    def append(self, indices: Union[Tensor, Sequence[int]], x: Union[np.ndarray, Sequence[str]],
               y: Tensor) -> None:
        """Stores one batch: query-set indices [B], raw uint8 images [B, *shape] or paths, y′ [B, K]."""
        idx = np.asarray(torch.as_tensor(indices).cpu(), dtype="<i8").reshape(-1)
        yv = y.detach().float().cpu().numpy().astype("<f4", copy=False)
        B = idx.shape[0]
        if yv.shape != (B, self.K):
            raise ValueError(f"y must be [{B}, {self.K}], got {list(yv.shape)}")
        if self.kind == "images":
            xv = np.ascontiguousarray(np.asarray(x, dtype=np.uint8))
            if list(xv.shape) != [B] + self.image_shape:
                shape = ", ".join(map(str, self.image_shape))
                raise ValueError(f"x must be uint8 [{B}, {shape}], got {list(xv.shape)}")
            self._write(X_FILE, xv.tobytes())
        else:
            paths = [str(p) for p in x]
            if len(paths) != B or any("\n" in p for p in paths):
                raise ValueError(f"x must be {B} paths without newlines")
            self._write(PATHS_FILE, "".join(p + "\n" for p in paths).encode())
        self._write(INDEX_FILE, idx.tobytes())
        self._write(Y_FILE, yv.tobytes())  # committed once y is written
        self.done += B

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __enter__(self) -> "TransferSetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _TransferDataset(Dataset):
    def __init__(self, ts: "TransferSet", n: int, transform, argmaxed: bool):
        self.ts, self.n, self.transform = ts, n, transform
        y = ts.y[:n]
        self.targets = torch.nn.functional.one_hot(y.argmax(1), ts.num_classes).float() if argmaxed else y

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = self.ts.image(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class TransferSet:
    """A loaded transfer set (read-only): ``y`` float32 [N, K] released posteriors in query order,
    ``indices`` int64 [N] query-set indices, ``images`` a uint8 [N, *shape] memory map (``kind ==
    "images"``) or ``paths`` a list of N paths (``kind == "paths"``), the other None, ``meta``
    the description dict."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = _read_meta(self.folder)
        self.num_classes = int(self.meta["num_classes"])
        self.kind = self.meta["kind"]
        K = self.num_classes
        y_path = self.folder / Y_FILE
        if not y_path.exists():
            raise TransferSetError(f"{y_path}: missing (the transfer set holds no queries)")
        shape = [int(s) for s in self.meta["image_shape"]] if self.kind == "images" else []
        self.n = n = _committed(self.folder, K, self.kind, int(np.prod(shape)))
        self.images = self.paths = None
        if self.kind == "paths":
            self.paths = _read_paths(self.folder / PATHS_FILE, n)
        elif n:
            self.images = np.memmap(self.folder / X_FILE, dtype=np.uint8, mode="r", shape=tuple([n] + shape))
        else:
            self.images = np.zeros([0] + shape, dtype=np.uint8)
        ys = np.fromfile(y_path, dtype="<f4", count=n * K).reshape(n, K)
        self.y = torch.from_numpy(ys.copy())
        self.indices = torch.from_numpy(np.fromfile(self.folder / INDEX_FILE, dtype="<i8", count=n).copy())
        if not torch.isfinite(self.y).all():
            raise TransferSetError(f"{y_path}: contains NaN or Inf posteriors")

    def __len__(self) -> int:
        return self.n

    def image(self, i: int) -> Image.Image:
        """Query i as a PIL image (as torchvision datasets hand images to transforms)."""
        if self.kind == "paths":
            with open(self.paths[i], "rb") as f:
                return Image.open(f).convert("RGB")
        arr = np.asarray(self.images[i])
        return Image.fromarray(arr, mode="L" if arr.ndim == 2 else None)

    def dataset(self, transform=None, n: Optional[int] = None, argmaxed: bool = False) -> Dataset:
        """The first ``n`` queries (all if None) as a Dataset of (transformed image, target [K])."""
        n = self.n if n is None else int(n)
        if n < 0 or n > self.n:
            raise TransferSetError(f"{self.folder}: asked for {n} queries, the transfer set holds {self.n}")
        return _TransferDataset(self, n, transform, argmaxed)

    def check_classes(self, num_classes: int, what: str = "the test set") -> None:
        if num_classes != self.num_classes:
            raise TransferSetError(f"{self.folder / META}: the transfer set has K={self.num_classes} classes "
                                   f"but {what} has {num_classes}; it was built for another victim")


def load_transferset(folder) -> TransferSet:
    """Loads the transfer set in ``folder`` (see module docs)."""
    return TransferSet(folder)


def export_pickle(folder, path=None) -> Path:
    """Writes ``transferset.pickle``: a list of (raw image or path, FloatTensor y)."""
    ts = load_transferset(folder)
    path = Path(path) if path is not None else ts.folder / "transferset.pickle"
    items = [(ts.paths[i] if ts.kind == "paths" else np.array(ts.images[i]), ts.y[i].clone())
             for i in range(len(ts))]
    return atomic_write(path, lambda f: pickle.dump(items, f))
