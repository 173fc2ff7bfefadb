"""A small MNIST LeNet victim and a MAD proxy shared by the serve / remote / ART tests (built
once per test process, ~10 s on 2 cores)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

_CACHE = {}


def models(tmp_path_factory):
    """(victim_dir, proxy_dir): LeNet trained 1 epoch on 2000 MNIST images; the proxy is the
    original's recipe (seeded initial weights)."""
    if "dirs" not in _CACHE:
        from ppoison_ext.pipeline import victim

        root = tmp_path_factory.mktemp("serve-models")
        victim.train_victim("MNIST", "lenet", root / "victim", device=-1, epochs=1, train_subset=2000,
                            test_subset=100, lr=0.05, progress=False)
        victim.make_proxy("MNIST", "lenet", root / "proxy", device=-1, test_subset=100, progress=False)
        _CACHE["dirs"] = (root / "victim", root / "proxy")
    return _CACHE["dirs"]


def mad_args(proxy_dir: Path) -> str:
    return f"epsilon:1.0,oracle:argmax,model_adv_proxy:{proxy_dir}"


def png_b64(array_u8: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array_u8, "L").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
