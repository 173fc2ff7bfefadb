"""A small reader for IDX files (the MNIST format), plain or gzip-compressed.

The reader never trusts the header blindly: the magic number, the number of dimensions and the byte count
are checked. Files whose name ends in ``.first<N>bytes`` are known prefixes of a gzip file (see the
embedded FashionMNIST); for those, and only those, a truncated stream is accepted and only the complete
records are decoded (the header still states the full count, so it cannot be used).
"""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path
from typing import Tuple

import numpy as np

from ._common import DatasetIntegrityError, PathLike

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension

_PARTIAL_RE = re.compile(r"\.first\d+bytes$")


def is_partial_file(path: PathLike) -> bool:
    """Whether the file is a declared prefix of a larger file (``*.first<N>bytes``)."""
    return bool(_PARTIAL_RE.search(Path(path).name))


def _is_gzip(path: Path, head: bytes) -> bool:
    return head[:2] == b"\x1f\x8b" or ".gz" in path.suffixes


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


def read_idx_bytes(path: PathLike) -> Tuple[bytes, bool]:
    """The decompressed bytes of an IDX file and whether they are a truncated prefix."""
    p = Path(path)
    raw = p.read_bytes()
    partial = is_partial_file(p)
    if _is_gzip(p, raw[:2]):
        return _gunzip(raw, p, allow_truncated=partial)
    return raw, partial


def read_idx(path: PathLike, magic: int) -> Tuple[np.ndarray, bool]:
    """Read a uint8 IDX file; returns ``(array, truncated)``.

    ``magic`` is 2051 for images (``N×H×W``) or 2049 for labels (``N``). For a declared partial file the
    array holds the complete leading records only and ``truncated`` is True.
    """
    p = Path(path)
    buf, truncated = read_idx_bytes(p)
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
