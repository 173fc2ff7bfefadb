"""SEAT (Zhang, Chen, Wagner, AISec 2021) per key, as its first author's research code computes it:
a similarity encoder f (the victim's architecture with its last Linear layer removed, trained so
that an image and a random transform of it encode close and two images far apart); a query is
*similar* when the mean L2 distance from f(x) to its k nearest earlier encodings of the key is
below ``thresh``; every ``num_clusters``-th similar query raises an alarm and clears the key's
history, which is also cleared at ``memory_capacity`` encodings. A key is flagged from its first
alarm on (SEAT cancels such accounts).

Per query: warm-up (no score) while the history holds fewer than k encodings and no block of
``buffer_size`` has been moved to memory; the score is the k-NN mean distance; the query then joins
the history.

Differs from the original: per-key state; the threshold's percentile is taken over a random subset
of the training encodings (``calib_rows``), not all of them.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from ..checks import int_arg
from ..datasets.transforms import MNIST_MEAN, MNIST_STD
from ..models import example_input, last_linear_name
from ..training import Steps, fit
from .base import Detector, KeyState, Rows, nearest_candidates, pairwise_earlier

__all__ = ["SEAT", "encoder_of", "random_transform", "train_encoder"]

MARGIN = math.sqrt(10.0)


def encoder_of(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose last Linear layer is the identity: its input is the encoding."""
    enc = copy.deepcopy(model)
    enc.set_submodule(last_linear_name(model), nn.Identity())
    return enc


def random_transform(x: Tensor, g: torch.Generator, mean=MNIST_MEAN, std=MNIST_STD) -> Tensor:
    """One random transform per image of a normalised batch, on its [0, 1] pixels: with p = 2/8
    additive noise (Gaussian σ 0.095 or uniform ±0.064), else one of rotation ±15°, translation
    5 %, scale ±17 %, a resized crop (scale [0.96, 1]), brightness 0.09, contrast 0.55."""
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    out = []
    for img in x.cpu() * s + m:
        u = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
        kind = int(torch.randint(8, (), generator=g))
        H, W = img.shape[-2:]
        if kind == 0:
            img = img + 0.095 * torch.randn(img.shape, generator=g)
        elif kind == 1:
            img = img + (torch.rand(img.shape, generator=g) * 2 - 1) * 0.064
        elif kind == 2:
            img = TF.rotate(img, u(-15, 15))
        elif kind == 3:
            img = TF.affine(img, angle=0.0, translate=[round(u(-.05, .05) * W), round(u(-.05, .05) * H)],
                            scale=1.0, shear=[0.0])
        elif kind == 4:
            img = TF.affine(img, angle=0.0, translate=[0, 0], scale=u(0.83, 1.17), shear=[0.0])
        elif kind == 5:
            side = math.sqrt(u(0.96, 1.0))
            h, w = round(side * H), round(side * W)
            top = int(torch.randint(H - h + 1, (), generator=g))
            left = int(torch.randint(W - w + 1, (), generator=g))
            img = TF.resized_crop(img, top, left, h, w, [H, W], antialias=True)
        elif kind == 6:
            img = TF.adjust_brightness(img, u(0.91, 1.09))
        else:
            img = TF.adjust_contrast(img, u(0.45, 1.55))
        out.append(img.clamp(0, 1))
    return ((torch.stack(out) - m) / s).to(x.device)


class _SimilaritySteps(Steps):
    """:func:`fit`'s steps for the encoder: a batch o's loss MSE(f(t), f(o)) + ReLU(m² − MSE(f(d),
    f(o))) (t a random transform of each image, d the batch rolled by one). The accuracy ``fit``
    counts on the encodings means nothing here."""

    def __init__(self, g: torch.Generator):
        super().__init__()
        self.g = g

    def loss(self, net: nn.Module, inputs: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
        fo = net(inputs)
        t = random_transform(inputs, self.g)
        return F.mse_loss(net(t), fo) + F.relu(MARGIN ** 2 - F.mse_loss(net(inputs.roll(1, 0)), fo)), fo


def train_encoder(model: nn.Module, x: Tensor, *, epochs: int = 1, batch_size: int = 32, lr: float = 1e-3,
                  seed: int = 0) -> nn.Module:
    """The similarity encoder of ``model`` trained on images ``x`` by :class:`_SimilaritySteps`
    (m = √10; MSE a mean over batch and features), Adam; it starts from the victim's weights."""
    device = next(model.parameters()).device
    enc = encoder_of(model).to(device)
    unlabelled = TensorDataset(x, torch.zeros(x.shape[0], dtype=torch.long))
    fit(enc, unlabelled, _SimilaritySteps(torch.Generator().manual_seed(seed)), epochs=epochs,
        optimizer=torch.optim.Adam(enc.parameters(), lr=lr), device=device, batch_size=batch_size, seed=seed,
        desc="similarity encoder")
    return enc.eval()


class SEAT(Detector):
    """SEAT with similarity ``encoder``, ``k`` nearest neighbours, threshold ``thresh``, an alarm
    per ``num_clusters`` similar queries, history moved to memory in blocks of ``buffer_size`` and
    cleared at ``memory_capacity``. Records: the encodings."""

    name = "seat"
    inputs_only = True

    def __init__(self, encoder: nn.Module, *, thresh: float, k: int = 1, num_clusters: int = 50,
                 buffer_size: int = 1000, memory_capacity: int = 100_000, latch: bool = True):
        super().__init__(latch=latch)
        for name, v in (("k", k), ("num_clusters", num_clusters), ("buffer_size", buffer_size),
                        ("memory_capacity", memory_capacity)):
            int_arg(v, name)
        if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or math.isnan(thresh):
            raise ValueError(f"thresh must be a number, got {thresh!r}")
        self.encoder, self.thresh, self.k = encoder.eval(), float(thresh), k
        self.num_clusters, self.buffer_size, self.memory_capacity = num_clusters, buffer_size, memory_capacity
        if any(True for _ in encoder.parameters()):  # (a parameter-free encoder: set record_width)
            with torch.no_grad():
                self.record_width = int(encoder(example_input(encoder)).flatten(1).shape[1])

    def records(self, x: Tensor, logits: Tensor, features: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encoder(x.to(next(self.encoder.parameters()).device)).flatten(1).float().cpu()

    def _piece(self, state: KeyState, records: Tensor) -> Tuple[List[float], List[bool]]:
        data = state.data
        if not data:
            data.update(hist=Rows(records.shape[1]), buffered=0, moved=0, detections=0, alarms=0)
        e = records.double()
        earlier = nearest_candidates(e, data["hist"], self.k)  # k nearest in the history before the piece
        within = pairwise_earlier(e, torch.ones(e.shape[0], e.shape[0], dtype=torch.bool))
        start, cleared = 0, False  # the piece's rows before ``start`` were cleared away
        scores, own = [], []
        for i in range(e.shape[0]):
            score = math.nan
            if data["moved"] > 0 or data["buffered"] >= self.k:  # else warm-up: no score
                dist = np.sort(np.concatenate([within[i, start:i], [] if cleared else earlier[i]]))
                score = float(dist[:self.k].mean())
            data["buffered"] += 1
            if not math.isnan(score):
                if data["buffered"] >= self.buffer_size:
                    data["moved"], data["buffered"] = data["moved"] + data["buffered"], 0
                clear = (0 if cleared else data["hist"].n) + i + 1 - start >= self.memory_capacity
                if score < self.thresh:
                    data["detections"] += 1
                    if data["detections"] % self.num_clusters == 0:
                        data["alarms"] += 1
                        clear = True
                if clear:
                    start, cleared = i + 1, True
                    data.update(buffered=0, moved=0)
            scores.append(score)
            own.append(data["alarms"] > 0)
        if cleared:
            data["hist"] = Rows(e.shape[1])
        data["hist"].extend(e[start:])
        return scores, own

    def config(self) -> Dict[str, Any]:
        return {"thresh": self.thresh, "k": self.k, "num_clusters": self.num_clusters,
                "buffer_size": self.buffer_size, "memory_capacity": self.memory_capacity, **super().config()}

    def tensors(self) -> Dict[str, Tensor]:
        return {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}

    @classmethod
    def from_saved(cls, config: Dict[str, Any], tensors: Dict[str, Tensor], model: nn.Module) -> "SEAT":
        enc = encoder_of(model)
        enc.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
        return cls(enc.to(next(model.parameters()).device), **config)

    @staticmethod
    def threshold(encoder: nn.Module, x: Tensor, k: int = 1, q: float = 0.1, block: int = 1000) -> float:
        """The ``q``-th percentile over ``x``'s images of the mean distance of each one's encoding
        to its k nearest other encodings (the original's rule: q = 0.1, i.e. the 0.001 quantile)."""
        device = next(encoder.parameters()).device
        with torch.no_grad():
            e = torch.cat([encoder(c.to(device)).flatten(1).double().cpu() for c in x.split(block)])
        knn = [torch.cdist(c, e).sort(1).values[:, 1:k + 1].mean(1) for c in e.split(block)]
        return float(torch.quantile(torch.cat(knn), q / 100.0))

    @classmethod
    def calibrate(cls, model: nn.Module, *, train_x: Tensor, fpr: float = 0.0, epochs: int = 1,
                  train_rows: int = 20_000, calib_rows: int = 10_000, seed: int = 0, k: int = 1,
                  benign: List[Tensor] = (), **_: Any) -> "SEAT":
        """Trains the encoder on ``train_rows`` random training images, then the threshold rule of
        :meth:`threshold` on ``calib_rows`` others. Uses neither ``benign`` nor ``fpr`` (the
        original's percentile rule is fixed)."""
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(train_x.shape[0], generator=g)
        enc = train_encoder(model, train_x[perm[:train_rows]], epochs=epochs, seed=seed)
        thresh = cls.threshold(enc, train_x[perm[train_rows:train_rows + calib_rows]], k=k)
        return cls(enc, thresh=thresh, k=k)
