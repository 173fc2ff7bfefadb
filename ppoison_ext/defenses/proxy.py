"""Batched proxy forwards with per-query semantics (differences.md: Defenses, "Batched").

A proxy in train mode answering one query at a time normalises it by its own BatchNorm
statistics (instance normalisation with the BN layer's affine parameters). :class:`ProxyView`
does that in one batched forward: a structural copy of the proxy sharing its parameters and
buffers, whose BatchNorm layers normalise per sample whenever the proxy's would use batch
statistics, and whose ``nn.Linear`` layers report their inputs (thread-locally). Train/eval
flags are read from the proxy at every call.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ProxyView", "reference_jacobian_param"]


def _differ_by_row_constant(a: Tensor, b: Tensor) -> bool:
    """Whether every row of a − b is one constant, to the rounding of ``a``'s dtype."""
    d = a.double() - b.double()
    spread = d.amax(1) - d.amin(1)
    scale = b.double().abs().amax(1) + d.abs().amax(1) + 1.0
    return bool((spread <= 16 * torch.finfo(a.dtype).eps * scale).all())


def reference_jacobian_param(model: nn.Module) -> str:
    """The name of the parameter MAD's default Jacobian differentiates the NLL by: the model's
    second-to-last parameter (the last layer's weight when it has a bias)."""
    names = [n for n, _ in model.named_parameters()]
    if len(names) < 2:
        raise ValueError(f"{type(model).__name__} has {len(names)} parameter(s); MAD's default Jacobian "
                         "takes the second-to-last one, so pass jacobian='full' with jacobian_params")
    return names[-2]


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _PerSampleBatchNorm(nn.Module):
    """Wraps a BatchNorm layer; batch statistics are taken per sample."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        object.__setattr__(self, "bn", bn)
        # Shared dicts: same parameter names as the proxy (torch.func.functional_call works).
        self._parameters = bn._parameters
        self._buffers = bn._buffers

    def forward(self, x: Tensor) -> Tensor:
        bn = self.bn
        weight, bias = self._parameters.get("weight"), self._parameters.get("bias")
        rm, rv = self._buffers.get("running_mean"), self._buffers.get("running_var")
        if not (bn.training or rm is None or rv is None):  # running statistics
            return F.batch_norm(x, rm, rv, weight, bias, False, 0.0, bn.eps)
        if x.dim() == 2:
            raise ValueError(
                f"{type(bn).__name__} in train mode on [N, C] inputs has one value per channel per query, "
                "so per-query statistics do not exist. Put the proxy in eval mode."
            )
        return F.instance_norm(x, None, None, weight, bias, True, 0.0, bn.eps)


class _CaptureLinear(nn.Module):
    """Wraps an nn.Linear; records its input (and output) in thread-local storage."""

    def __init__(self, linear: nn.Linear, name: str, store: threading.local):
        super().__init__()
        self._parameters = linear._parameters  # shared, as in _PerSampleBatchNorm
        self.name = name
        object.__setattr__(self, "store", store)

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self._parameters["weight"], self._parameters.get("bias"))
        rec = getattr(self.store, "records", None)
        if rec is not None:
            rec[self.name] = (x, out)
        return out


class ProxyView(nn.Module):
    """A per-sample-semantics view of ``proxy`` (never modified) that can report its last
    Linear layer's input: ``logits, h = ProxyView(proxy).forward_with_features(x)``."""

    def __init__(self, proxy: nn.Module):
        super().__init__()
        object.__setattr__(self, "proxy", proxy)
        self._store = threading.local()
        self._pairs: List[Tuple[nn.Module, nn.Module]] = []
        object.__setattr__(self, "view", self._copy(proxy, ""))
        self.head_name: Optional[str] = None

    def _copy(self, module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, _BN_TYPES):
            return _PerSampleBatchNorm(module)
        if isinstance(module, nn.Linear):
            return _CaptureLinear(module, name, self._store)
        clone = copy.copy(module)  # shallow: shares the parameter and buffer dicts
        clone.__dict__["_modules"] = OrderedDict(
            (n, None if m is None else self._copy(m, f"{name}.{n}" if name else n))
            for n, m in module._modules.items()
        )
        self._pairs.append((module, clone))
        return clone

    def _sync_modes(self) -> None:
        for orig, clone in self._pairs:
            clone.training = orig.training

    def forward(self, x: Tensor) -> Tensor:
        self._sync_modes()
        return self.view(x)

    def _run(self, x: Tensor) -> Tuple[Tensor, Dict[str, Tuple[Tensor, Tensor]]]:
        self._sync_modes()
        self._store.records = {}
        try:
            out = self.view(x)
            return out, self._store.records
        finally:
            self._store.records = None

    @staticmethod
    def _closed_form_head(out: Tensor, recs: Dict[str, Tuple[Tensor, Tensor]]) -> Optional[str]:
        """The last called nn.Linear whose output equals ``out`` up to a per-row additive
        constant (plain logits, ``log_softmax``, ``x - logsumexp``): softmax and the NLL's
        gradient w.r.t. that layer's weight are then those of the layer's own output."""
        for name, (_, lin_out) in reversed(list(recs.items())):
            if lin_out is out:
                return name
            if out.dim() == 2 and lin_out.shape == out.shape and _differ_by_row_constant(out, lin_out):
                return name
        return None

    def features(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """The proxy's output and the input h [B, D] of its closed-form head, checked by value
        on this batch; h is None when no nn.Linear qualifies (a conv head, scaled logits)."""
        out, recs = self._run(x)
        name = self._closed_form_head(out, recs)
        if name is None:
            return out, None
        self.head_name = name
        h = recs[name][0]
        return out, h.reshape(h.shape[0], -1)

    def forward_with_features(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Logits and the input h of the final Linear layer; ValueError when the proxy's output
        is not that layer's output up to a per-row constant."""
        out, h = self.features(x)
        if h is None:
            raise ValueError(
                f"the proxy {type(self.proxy).__name__} does not return the output of an nn.Linear layer "
                "(up to a per-row constant, e.g. log_softmax) as its logits, so the closed-form last-layer "
                "Jacobian (jacobian='fc') does not apply; use jacobian='auto' or jacobian='full' "
                "(explicit per-sample Jacobians)"
            )
        return out, h

    def head(self) -> nn.Linear:
        if self.head_name is None:
            raise RuntimeError("head not found yet: call forward_with_features first")
        return self.proxy.get_submodule(self.head_name)

    def train(self, mode: bool = True) -> "ProxyView":  # the view follows the proxy's flags
        self.training = mode
        return self
