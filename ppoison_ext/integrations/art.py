"""The defended victim as an estimator of the Adversarial Robustness Toolbox (ART 1.20.1;
``pip install 'ppoison_ext[art]'``), so ART's extraction attacks run against it unchanged.

* :class:`DefendedClassifier` — a local :class:`~ppoison_ext.defenses.Defense` as an ART
  ``PyTorchClassifier`` whose model *is* the defense (not an ART ``Postprocessor``, which never
  sees the query x that MAD's perturbation needs): ``predict(x)`` returns the released
  posteriors y′. It is predict-only, which is all ART's extraction attacks (``KnockoffNets``,
  ``CopycatCNN``) ask of a victim.
* :class:`RemoteClassifier` — a served victim as an ART ``BlackBoxClassifier`` calling
  :class:`~ppoison_ext.client.RemoteBlackbox` (every call is charged to the API key's budget).
* :func:`thief_classifier` and :class:`SoftCrossEntropyLoss` — the thief's side.

Soft labels: ``KnockoffNets(..., use_probability=True)`` passes the victim's posteriors
``[N, K]`` to ``thieved_classifier.fit`` (one-hot argmax without it). ART 1.20.1's
``reduce_labels`` keeps them as probabilities for ``nn.CrossEntropyLoss`` unless every entry is
an integer, but takes their argmax for ``nn.NLLLoss``, ``nn.MultiMarginLoss`` and the BCE losses:
such a thief learns from the top-1 label only, which MAD under ``oracle:argmax`` never changes.
:class:`SoftCrossEntropyLoss` is none of these (ART hands it the targets untouched) and computes
−Σₖ yₖ log softmax(z)ₖ, whatever an ART version does with its known losses.

Example:
    >>> from art.attacks.extraction import KnockoffNets
    >>> victim = DefendedClassifier.from_dir("models/victim/MNIST-lenet", "mad",
    ...                                      "epsilon:1.0,oracle:argmax,model_adv_proxy:models/proxy")
    >>> thief = thief_classifier(get_net("lenet", "mnist", num_classes=10), input_shape=(1, 28, 28),
    ...                          nb_classes=10)
    >>> attack = KnockoffNets(victim, batch_size_fit=64, batch_size_query=64, nb_epochs=10,
    ...                       nb_stolen=5000, use_probability=True)
    >>> stolen = attack.extract(x_queries, thieved_classifier=thief)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from art.estimators.classification import BlackBoxClassifier, PyTorchClassifier
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError("ppoison_ext.integrations.art needs the Adversarial Robustness Toolbox: "
                      "pip install 'ppoison_ext[art]'") from err

from ..checks import type_arg
from ..client import RemoteBlackbox
from ..defenses import Defense, build_defense
from ..models import INPUT_SIZES
from ..modeldir import dataset_name, modelfamily_for_dataset, read_params

__all__ = ["DefendedClassifier", "RemoteClassifier", "SoftCrossEntropyLoss", "thief_classifier"]


def _device_type(module: nn.Module) -> str:
    p = next(iter(module.parameters()), None)
    return "gpu" if p is not None and p.device.type == "cuda" else "cpu"


class SoftCrossEntropyLoss(nn.Module):
    """Cross-entropy against soft labels: mean over the batch of −Σₖ yₖ log softmax(z)ₖ.

    Its gradient with respect to the logits z is (softmax(z) − y) / B: the thief is pulled
    toward the released posteriors themselves, not toward their argmax.

    Shape:
        logits: ``[B, K]``; target: ``[B, K]`` probabilities (each row summing to 1), or
        ``[B]`` / ``[B, 1]`` class indices (taken as one-hot). Returns a scalar.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, K], got shape {tuple(logits.shape)}")
        if target.dim() == 2 and target.shape[1] == 1:
            target = target[:, 0]
        if target.dim() == 1:
            target = F.one_hot(target.long(), logits.shape[1])
        if target.shape != logits.shape:
            raise ValueError(f"target must be [B, K] = {tuple(logits.shape)} or [B], got {tuple(target.shape)}")
        return -(target.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def thief_classifier(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *,
                     input_shape: Sequence[int], nb_classes: int, lr: float = 0.01, momentum: float = 0.5,
                     clip_values: Optional[Tuple[float, float]] = None, **kwargs: Any) -> PyTorchClassifier:
    """An ART ``PyTorchClassifier`` for the thief (``model`` returns logits) that trains with
    :class:`SoftCrossEntropyLoss`, so ``fit(x, y)`` with ``y`` ``[N, K]`` posteriors trains on
    exactly those posteriors. ``optimizer`` defaults to ``SGD(model.parameters(), lr, momentum)``;
    further keywords go to ``PyTorchClassifier``.
    """
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    kwargs.setdefault("device_type", _device_type(model))
    return PyTorchClassifier(model=model, loss=SoftCrossEntropyLoss(), optimizer=optimizer,
                             input_shape=tuple(input_shape), nb_classes=int(nb_classes), clip_values=clip_values,
                             **kwargs)


class DefendedClassifier(PyTorchClassifier):
    """A local defended victim as an ART classifier: ``predict(x)`` → the defense's released
    posteriors y′ ``[N, K]`` (float32 probabilities).

    ``input_shape`` is C×H×W of the (already normalized) inputs; ``nb_classes`` defaults to the
    victim's last Linear layer's ``out_features``, ``device_type`` to where the defense's
    parameters are. The model is left as the defense set it (the victim in eval mode, MAD's
    proxy as built): ART's ``predict`` calls ``train(False)`` on the wrapper, which a ``Defense``
    does not pass on to its models. Gradients and ``fit`` raise ``NotImplementedError``.
    """

    def __init__(self, defense: Defense, *, input_shape: Sequence[int], nb_classes: Optional[int] = None,
                 clip_values: Optional[Tuple[float, float]] = None, device_type: Optional[str] = None,
                 **kwargs: Any):
        type_arg(defense, "defense", Defense, "a ppoison_ext Defense")
        if nb_classes is None:
            heads = [m for m in defense.model.modules() if isinstance(m, nn.Linear)]
            if not heads:
                raise ValueError("nb_classes: the victim has no Linear head to read K from; give it")
            nb_classes = heads[-1].out_features
        self.defense = defense
        super().__init__(model=defense, loss=SoftCrossEntropyLoss(), input_shape=tuple(input_shape),
                         nb_classes=int(nb_classes), clip_values=clip_values,
                         device_type=device_type or _device_type(defense), **kwargs)

    @classmethod
    def from_dir(cls, victim_dir, defense: str = "none", defense_args: Union[str, dict, None] = None, *,
                 device: Union[str, torch.device] = "cpu", **kwargs: Any) -> "DefendedClassifier":
        """The victim in ``victim_dir`` behind ``build_defense(defense, defense_args)``; the input
        shape and K come from its ``params.json``."""
        params = read_params(victim_dir)
        family = modelfamily_for_dataset(dataset_name(params))
        bb = build_defense(defense, defense_args, victim_dir=victim_dir, device=device)
        return cls(bb, input_shape=INPUT_SIZES[family], nb_classes=int(params["num_classes"]), **kwargs)

    def loss_gradient(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("the defended victim is a black box: its released posteriors (MAD: an "
                                  "oracle and a projection under no_grad) have no gradient, and it is not "
                                  "trained through ART")

    class_gradient = fit = loss_gradient


class RemoteClassifier(BlackBoxClassifier):
    """A served victim (``ppoison serve``) as an ART ``BlackBoxClassifier``: ``predict(x)``
    sends ``x`` (float32 ``[N, C, H, W]``, in the victim's normalized input space) through
    :class:`~ppoison_ext.client.RemoteBlackbox` and returns the released posteriors.

    ``url`` is the server's base URL or a :class:`~ppoison_ext.client.RemoteBlackbox`; ``api_key``
    and further keywords go to ``RemoteBlackbox``. The input shape and K come from ``/v1/info``.
    ART's ``predict`` batches by its ``batch_size`` (128 by default); larger batches than the
    server takes per request are split by the client. Budget exhaustion raises
    :class:`~ppoison_ext.client.BudgetExhausted` out of ``predict``.
    """

    def __init__(self, url: Union[str, RemoteBlackbox], *, api_key: Optional[str] = None,
                 clip_values: Optional[Tuple[float, float]] = None, **kwargs: Any):
        self.blackbox = url if isinstance(url, RemoteBlackbox) else RemoteBlackbox(url, api_key=api_key, **kwargs)
        super().__init__(self._predict, input_shape=tuple(self.blackbox.input_shape),
                         nb_classes=self.blackbox.num_classes, clip_values=clip_values)

    def _predict(self, x: np.ndarray) -> np.ndarray:
        return self.blackbox(np.asarray(x, dtype=np.float32)).numpy()

    def close(self) -> None:
        self.blackbox.close()

    def __enter__(self) -> "RemoteClassifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
