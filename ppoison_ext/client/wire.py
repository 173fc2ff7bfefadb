"""The wire format of ``ppoison serve``, shared by the server and :class:`RemoteBlackbox`.

Requests to ``POST /v1/predict`` carry either

* ``Content-Type: application/x-npy``: one ``.npy`` file (format version 1–3, no pickled
  objects) holding a float32 array ``[B, C, H, W]`` in the victim's input space (after the
  test transform), or
* ``Content-Type: application/json``: ``{"images": ["<base64 PNG>", ...]}``, decoded and
  transformed on the server with the victim family's test transform.

Answers carry the released posteriors y′ ``[B, K]`` float32, bit for bit: as an ``.npy`` body
when the request says ``Accept: application/x-npy`` (top-1 labels in the ``X-Top1`` header),
else as JSON ``{"posteriors": [[...]], "labels": [...], "num_classes": K, "request_id": ...}``
where each number is the shortest decimal that reads back to the same float32 (a float32
widened to float64 and written with ``repr`` round-trips exactly).
"""

from __future__ import annotations

import io
import math
import re

import numpy as np

__all__ = ["NPY", "JSON", "encode_npy", "decode_npy", "WireError"]

NPY = "application/x-npy"
JSON = "application/json"
# np.save's version-1.0 header of a plain little-endian C-order array, padded with spaces
_PLAIN_HEADER = re.compile(rb"\x93NUMPY\x01\x00..\{'descr': '([<|][fiub][1248])', 'fortran_order': False, "
                           rb"'shape': \(([\d, ]*)\), \} *\n", re.S)


class WireError(ValueError):
    """A body that is not a well-formed npy file."""


def encode_npy(array: np.ndarray) -> bytes:
    """``array`` as the bytes of an ``.npy`` file (little-endian, C order)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """The array of an ``.npy`` body; pickled (object) arrays are refused.

    Raises:
        WireError: not an npy file, truncated, or an object array.
    """
    if not data.startswith(b"\x93NUMPY"):
        raise WireError("not an .npy file (magic string \\x93NUMPY missing)")
    plain = _PLAIN_HEADER.match(data)  # what np.save writes: read without np.load's literal_eval
    if plain is not None:
        shape = tuple(int(v) for v in plain.group(2).split(b",") if v.strip())
        dtype = np.dtype(plain.group(1).decode())
        if 10 + int.from_bytes(data[8:10], "little") == plain.end() and \
                len(data) - plain.end() == dtype.itemsize * math.prod(shape):
            return np.frombuffer(data, dtype, offset=plain.end()).reshape(shape).copy()
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise WireError(f"unreadable .npy data: {err}") from err
