"""A defended victim served over HTTP, as a black box every attack accepts.

:class:`RemoteBlackbox` is a callable x → y′ (float32 ``[B, K]``) like a local
:class:`~ppoison_ext.defenses.Defense`: ``KnockoffNets().build_transferset(RemoteBlackbox(url,
api_key=k), queryset)`` steals from a served victim. Inputs and answers travel as float32 npy, so
a remote query returns exactly the bits the server's defense released. Unlike a local defense, it
cannot be reseeded, never shows the undefended y, and every call is charged to the API key's
budget (:class:`BudgetExhausted` when it is spent).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..checks import int_arg
from .wire import NPY, decode_npy, encode_npy

__all__ = ["RemoteBlackbox", "RemoteError", "BudgetExhausted", "is_url", "read_api_key"]


class RemoteError(RuntimeError):
    """The server refused a request; ``status`` is its HTTP status, the message its reason."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class BudgetExhausted(RemoteError):
    """HTTP 429: the API key's query budget is spent."""


def is_url(value: Any) -> bool:
    """Whether ``value`` names a served victim (``http://`` or ``https://``) rather than a folder."""
    return isinstance(value, str) and value.split("://", 1)[0].lower() in ("http", "https") and "://" in value


def read_api_key(path: Union[str, Path]) -> str:
    """The API key in ``path`` (its first non-empty line, whitespace stripped)."""
    for line in Path(path).read_text().splitlines():
        if line.strip():
            return line.strip()
    raise ValueError(f"api key file {path} is empty")


def _checked(response):
    """``response`` when it is a 200, else the server's refusal as a :class:`RemoteError`."""
    if response.status_code == 200:
        return response
    try:
        body = response.json()
        reason = str(body.get("detail", body))
    except ValueError:
        reason = response.text[:500]
    raise (BudgetExhausted if response.status_code == 429 else RemoteError)(response.status_code, reason)


class RemoteBlackbox:
    """The defended victim behind ``url`` (a ``ppoison serve`` process or a ``create_app`` app).

    ``api_key`` is sent as ``Authorization: Bearer <key>``; ``timeout`` is in seconds per HTTP
    request; ``max_request_images`` (default: the server's limit) splits a larger batch into
    several requests, in order. ``info`` holds the ``/v1/info`` answer, ``num_classes`` its K,
    ``call_count`` the images answered so far.

    Example:
        >>> bb = RemoteBlackbox("http://127.0.0.1:8000", api_key=read_api_key("key.txt"))
        >>> y_prime = bb(x)          # x: float32 [B, C, H, W]; y_prime: [B, K]
    """

    def __init__(self, url: str, *, api_key: Optional[str] = None, timeout: float = 60.0,
                 max_request_images: Optional[int] = None):
        try:
            import httpx
        except ImportError as err:  # pragma: no cover - depends on the installation
            raise ImportError("RemoteBlackbox needs httpx: pip install 'ppoison_ext[serve]'") from err
        if not is_url(url):
            raise ValueError(f"url must start with http:// or https://, got {url!r}")
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._lock = threading.Lock()
        self.call_count = 0
        self.info: Dict[str, Any] = self._get("/v1/info")
        self.num_classes = int(self.info["num_classes"])
        self.input_shape = tuple(int(v) for v in self.info["input_shape"])
        self.max_request_images = int(self.info.get("max_request_images", 256))
        if max_request_images is not None:
            self.max_request_images = min(self.max_request_images,
                                          int_arg(max_request_images, "max_request_images"))

    def _get(self, path: str) -> Dict[str, Any]:
        return _checked(self._client.get(path)).json()

    def _post(self, x: np.ndarray) -> np.ndarray:
        r = _checked(self._client.post("/v1/predict", content=encode_npy(x),
                                       headers={"Content-Type": NPY, "Accept": NPY}))
        y = decode_npy(r.content)
        if y.dtype != np.float32 or y.shape != (x.shape[0], self.num_classes):
            raise RemoteError(r.status_code, f"answer of dtype {y.dtype} and shape {y.shape}, expected float32 "
                                             f"{(x.shape[0], self.num_classes)}")
        return y

    def __call__(self, x: Union[Tensor, np.ndarray]) -> Tensor:
        """Released posteriors y′ float32 ``[B, K]`` for inputs ``x`` ``[B, *input_shape]`` (on
        ``x``'s device when it is a tensor)."""
        device = x.device if isinstance(x, Tensor) else torch.device("cpu")
        arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim != 1 + len(self.input_shape):
            raise ValueError(f"x must be [B, {', '.join(map(str, self.input_shape))}], got shape {arr.shape}")
        parts = []
        with self._lock:
            for lo in range(0, arr.shape[0], self.max_request_images):
                chunk = arr[lo:lo + self.max_request_images]
                parts.append(self._post(chunk))
                self.call_count += chunk.shape[0]
        y = np.concatenate(parts) if parts else np.zeros((0, self.num_classes), dtype=np.float32)
        return torch.from_numpy(y).to(device)

    def health(self) -> Dict[str, Any]:
        """The server's ``/v1/health`` answer."""
        return self._get("/v1/health")

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "RemoteBlackbox":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteBlackbox({self.url!r}, num_classes={self.num_classes}, defense={self.info.get('defense')!r})"
