"""Finding the classifier head: the ``nn.Linear`` whose output is the model's output.

MAD's closed-form Jacobian (:mod:`ppoison_ext.ops`) needs the features h entering the
proxy's last Linear layer W and relies on the logits being exactly ``W h + b``.
:func:`last_linear` checks that property by running one forward pass with hooks.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["last_linear", "last_linear_name", "classifier_head", "num_classes_of", "example_input"]


def example_input(model: nn.Module, batch_size: int = 1) -> Tensor:
    """A random input of the model's ``input_size`` (C, H, W), on its device and dtype.

    Zoo models carry ``input_size``; for other models a first ``nn.Linear`` layer gives the
    size, otherwise pass an input explicitly.
    """
    ref = next(iter(model.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    size: Optional[Sequence[int]] = getattr(model, "input_size", None)
    if size is None:
        kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        first = next((m for m in model.modules() if isinstance(m, kinds)), None)
        if isinstance(first, nn.Linear):
            size = (first.in_features,)
        else:
            raise ValueError(f"cannot guess an input size for {type(model).__name__}: it has no `input_size` "
                             "attribute; pass example_input explicitly")
    return torch.randn(batch_size, *[int(s) for s in size], device=device, dtype=dtype)


def _find(model: nn.Module, x: Optional[Tensor]) -> Tuple[str, nn.Linear]:
    cls = type(model).__name__
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{cls} has no nn.Linear layer, so its output is not the output of a last "
                         "Linear layer")
    if x is None:
        x = example_input(model)
    calls: List[Tuple[str, nn.Linear, Tensor]] = []

    def record(name: str, module: nn.Linear, _inp, out: Tensor) -> None:
        calls.append((name, module, out))

    handles = [m.register_forward_hook(functools.partial(record, name)) for name, m in linears]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    if not isinstance(out, Tensor):
        raise ValueError(f"{cls} returns a {type(out).__name__}, not a tensor of logits")
    for name, m, o in reversed(calls):
        if o is out:
            return name, m
    if out.device.type != "meta":
        # A view or copy of the Linear output (e.g. ``.view(B, K)``) still qualifies.
        for name, m, o in reversed(calls):
            if o.shape == out.shape and torch.equal(o, out):
                return name, m
    raise ValueError(f"the output of {cls} is not the output of any of its nn.Linear layers "
                     f"(last Linear called: {calls[-1][0] if calls else 'none'}); its logits are not "
                     "W·h + b of a last Linear layer, which MAD's closed-form Jacobian needs")


def last_linear(model: nn.Module, example_input: Optional[Tensor] = None) -> nn.Linear:
    """The ``nn.Linear`` layer whose output is the model's output (the logits).

    Runs one forward pass of ``example_input`` (default: a random one of ``model.input_size``)
    in eval mode without gradients (every training flag is restored afterwards) with hooks on
    every Linear layer. The layer whose output tensor *is* the returned tensor wins (or, failing
    that, one whose output equals it). Its input is the feature vector h: ``model(x) == layer(h)``.

    Raises:
        ValueError: naming the model class, when no Linear layer produces the output
            (e.g. torchvision SqueezeNet, whose head is a 1×1 convolution).
    """
    return _find(model, example_input)[1]


def last_linear_name(model: nn.Module, example_input: Optional[Tensor] = None) -> str:
    """The qualified name (as in ``named_modules()``) of :func:`last_linear`'s layer."""
    return _find(model, example_input)[0]


def classifier_head(model: nn.Module) -> Tuple[Optional[str], Optional[nn.Module]]:
    """The classifier head found without running the model: the last registered ``nn.Linear``,
    else the last ``nn.Conv2d`` (a 1×1-conv head such as SqueezeNet's); (None, None) if neither.
    :func:`last_linear` is the check that a Linear layer's output *is* the model's output."""
    for kinds in ((nn.Linear,), (nn.Conv2d,)):
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
        if found:
            return found[-1]
    return None, None


def num_classes_of(model: nn.Module) -> Optional[int]:
    """K, the output size of :func:`classifier_head`'s layer (None when there is none)."""
    _, head = classifier_head(model)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    if isinstance(head, nn.Conv2d):
        return int(head.out_channels)
    return None
