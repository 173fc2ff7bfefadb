"""The defended victim as an estimator of the Adversarial Robustness Toolbox (ART 1.20.1;
``pip install 'ppoison_ext[art]'``), so ART's extraction attacks run against it unchanged.

* :class:`DefendedClassifier` — a local defense (any :class:`~ppoison_ext.defenses.Defense`,
  MAD included) as an ART ``PyTorchClassifier`` whose model *is* the defense: ``predict(x)``
  returns the released posteriors y′ (probabilities, not logits).
* :class:`RemoteClassifier` — a served victim (``ppoison serve``) as an ART
  ``BlackBoxClassifier`` whose predict function is a
  :class:`~ppoison_ext.client.RemoteBlackbox` (every call is charged to the API key's budget).
* :class:`SoftCrossEntropyLoss` and :func:`thief_classifier` — the thief's side: a
  ``PyTorchClassifier`` that trains on the posteriors it is given.

Why MAD is not an ART ``Postprocessor``: ART's post-processing defences
(``art.defences.postprocessor``, e.g. ``ReverseSigmoid``) are called as ``postprocessor(preds)``
and see only the victim's posteriors, never the query x. MAD needs x: its perturbation follows
the proxy's gradient ∇_w log p(y | x) of that very query. So the defense wraps the model
instead, and ART sees the defended model.

No autograd through the defense: MAD's released y′ comes out of a combinatorial oracle and a
projection under ``no_grad`` (the victim is a black box), so ``loss_gradient`` /
``class_gradient`` / ``fit`` of :class:`DefendedClassifier` raise ``NotImplementedError``;
only ``predict`` is offered — which is all ART's extraction attacks (``KnockoffNets``,
``CopycatCNN``) ask of a victim.

Soft labels: ``KnockoffNets(..., use_probability=True)`` passes the victim's ``predict``
output (the posteriors, ``[N, K]``) to ``thieved_classifier.fit``; with the default
``use_probability=False`` it passes their one-hot argmax. ``PyTorchClassifier.fit`` then runs
``reduce_labels``: for ``nn.CrossEntropyLoss`` ART 1.20.1 keeps ``[N, K]`` targets as
probabilities unless *every* entry of the whole array is an integer (one-hot labels become
indices, which is the same loss); for ``nn.NLLLoss``, ``nn.MultiMarginLoss`` (and BCE losses)
it takes the argmax — a thief trained with those silently learns from the top-1 label only,
and MAD's perturbation (which keeps the top-1 under ``oracle:argmax``) never reaches it.
:class:`SoftCrossEntropyLoss` is not an ``nn.CrossEntropyLoss`` (ART then hands it the
targets untouched) and computes the soft-label cross-entropy −Σₖ yₖ log softmax(z)ₖ, so what
the thief trains on does not depend on how an ART version sorts its losses.

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

from ..client import RemoteBlackbox
from ..defenses import Defense, build_defense
from ..modeldir import dataset_name, modelfamily_for_dataset, read_params

__all__ = ["DefendedClassifier", "RemoteClassifier", "SoftCrossEntropyLoss", "thief_classifier",
           "FAMILY_INPUT_SHAPE"]

#: model family → C×H×W of its inputs after the test transform (as ``ppoison serve`` expects)
FAMILY_INPUT_SHAPE = {"mnist": (1, 28, 28), "cifar": (3, 32, 32), "imagenet": (3, 224, 224)}


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
    exactly those posteriors.

    Args:
        model: the thief's network (logits out).
        optimizer: default ``SGD(model.parameters(), lr, momentum)``.
        input_shape, nb_classes, clip_values: as ART's; further keywords go to ``PyTorchClassifier``.
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

    Args:
        defense: a :class:`~ppoison_ext.defenses.Defense` (``build_defense(...)``).
        input_shape: C×H×W of the (already normalized) inputs the victim takes.
        nb_classes: K (default: the victim's last layer's ``out_features`` where it has one).
        clip_values: ART's ``(min, max)`` of the input features, for attacks that perturb x.
        device_type: ``"cpu"`` or ``"gpu"`` (default: where the defense's parameters are).

    The model is left as the defense set it (the victim in eval mode, MAD's proxy as built):
    ART's ``predict`` calls ``train(False)`` on the wrapper, which a ``Defense`` does not pass
    on to its models. Gradients and ``fit`` raise ``NotImplementedError`` (see the module docs).
    """

    def __init__(self, defense: Defense, *, input_shape: Sequence[int], nb_classes: Optional[int] = None,
                 clip_values: Optional[Tuple[float, float]] = None, device_type: Optional[str] = None,
                 **kwargs: Any):
        if not isinstance(defense, Defense):
            raise TypeError(f"defense must be a ppoison_ext Defense, got {type(defense).__name__}")
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
        if family not in FAMILY_INPUT_SHAPE:
            raise ValueError(f"no input shape known for model family {family!r}")
        bb = build_defense(defense, defense_args, victim_dir=victim_dir, device=device)
        kwargs.setdefault("device_type", "gpu" if torch.device(device).type == "cuda" else "cpu")
        return cls(bb, input_shape=FAMILY_INPUT_SHAPE[family], nb_classes=int(params["num_classes"]), **kwargs)

    def _no_gradient(self, what: str):
        raise NotImplementedError(f"{what}: the defended victim is a black box; its released posteriors "
                                  f"(MAD: an oracle and a projection under no_grad) have no gradient, and it "
                                  f"is not trained through ART")

    def loss_gradient(self, *args: Any, **kwargs: Any):
        self._no_gradient("loss_gradient")

    def class_gradient(self, *args: Any, **kwargs: Any):
        self._no_gradient("class_gradient")

    def fit(self, *args: Any, **kwargs: Any):
        self._no_gradient("fit")


class RemoteClassifier(BlackBoxClassifier):
    """A served victim (``ppoison serve``) as an ART ``BlackBoxClassifier``: ``predict(x)``
    sends ``x`` (float32 ``[N, C, H, W]``, in the victim's normalized input space) through
    :class:`~ppoison_ext.client.RemoteBlackbox` and returns the released posteriors.

    Args:
        url: the server's base URL, or a :class:`~ppoison_ext.client.RemoteBlackbox`.
        api_key: sent as ``Authorization: Bearer <key>``; further keywords go to ``RemoteBlackbox``.
        clip_values: ART's ``(min, max)`` of the input features (optional).

    The input shape and K come from the server's ``/v1/info``. ART's ``predict`` batches by
    its ``batch_size`` (128 by default); larger batches than the server takes per request are
    split by the client. Budget exhaustion raises
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
