"""Decoding ``POST /v1/predict`` bodies into a checked float32 batch, or an :class:`InputError`
naming the field at fault (400: cannot be decoded; 413: too many images; 422: decoded but
wrong — shape, dtype, non-finite values, wrong image size)."""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any, Callable, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..client.wire import WireError, decode_npy

__all__ = ["InputError", "parse_npy", "parse_json_images", "MAX_IMAGE_PIXELS"]

#: larger images are refused before they are decoded (decompression bombs)
MAX_IMAGE_PIXELS = 4096 * 4096


class InputError(Exception):
    """A request body the server refuses: HTTP ``status``, the ``field`` and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.status = status
        self.field = field

    def detail(self) -> dict:
        return {"detail": str(self), "field": self.field}


def _check_count(n: int, limit: int, field: str) -> None:
    if n == 0:
        raise InputError(422, field, "no images (the batch is empty)")
    if n > limit:
        raise InputError(413, field, f"{n} images, more than the server's limit of {limit} per request")


def parse_npy(body: bytes, input_shape: Sequence[int], max_images: int) -> Tensor:
    """A float32 ``[B, C, H, W]`` npy body as a tensor, checked against the victim's input shape."""
    try:
        arr = decode_npy(body)
    except WireError as err:
        raise InputError(400, "body", str(err)) from err
    if arr.dtype != np.float32:
        raise InputError(422, "body.dtype", f"must be float32 (little-endian '<f4'), got {arr.dtype.str}")
    want = tuple(int(v) for v in input_shape)
    if arr.ndim != 1 + len(want) or tuple(arr.shape[1:]) != want:
        raise InputError(422, "body.shape", f"must be [B, {', '.join(map(str, want))}], got {list(arr.shape)}")
    _check_count(arr.shape[0], max_images, "body.shape[0]")
    if not np.isfinite(arr).all():
        bad = int(np.argwhere(~np.isfinite(arr).reshape(arr.shape[0], -1).all(1))[0][0])
        raise InputError(422, "body", f"image {bad} holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(arr.astype("=f4", copy=False)))


def _decode_png(item: Any, i: int, mode: str, transform: Callable, want: Tuple[int, ...]) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    field = f"images[{i}]"
    if not isinstance(item, str):
        raise InputError(422, field, f"must be a base64 string, got {type(item).__name__}")
    try:
        raw = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InputError(400, field, f"not valid base64 ({err})") from err
    try:
        with Image.open(io.BytesIO(raw)) as img:
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise InputError(422, field, f"image of {w}x{h} pixels is larger than {MAX_IMAGE_PIXELS} pixels")
            img = img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise InputError(400, field, f"not a decodable image ({type(err).__name__}: {err})") from err
    x = transform(img)
    if tuple(x.shape) != want:
        raise InputError(422, field, f"after the test transform the image is {list(x.shape)}, the victim takes "
                                     f"{list(want)} (send {want[2]}x{want[1]} images)")
    return x


def parse_json_images(body: bytes, mode: str, transform: Callable, input_shape: Sequence[int],
                      max_images: int) -> Tensor:
    """``{"images": [base64 PNG, ...]}`` as a transformed float32 batch ``[B, C, H, W]``."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(400, "body", f"not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise InputError(422, "body", f"must be a JSON object with an 'images' list, got {type(doc).__name__}")
    if "images" not in doc:
        raise InputError(422, "images", "missing (a list of base64-encoded PNG images)")
    images = doc["images"]
    if not isinstance(images, list):
        raise InputError(422, "images", f"must be a list of base64 strings, got {type(images).__name__}")
    _check_count(len(images), max_images, "images")
    want = tuple(int(v) for v in input_shape)
    return torch.stack([_decode_png(item, i, mode, transform, want) for i, item in enumerate(images)]).float()
