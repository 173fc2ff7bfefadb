"""The weight-initialization schemes of the bearpaw CIFAR models."""

from __future__ import annotations

import math

from torch import nn


def he_conv_unit_bn_(model: nn.Module, *, zero_linear_bias: bool = False) -> None:
    """bearpaw's init: conv weights N(0, 2/(k·k·C_out)), BN weight 1 and bias 0.

    Conv biases and Linear layers keep PyTorch's default init, except that
    ``zero_linear_bias`` zeroes Linear biases (the WideResNet variant).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)
