"""MNIST-family architectures (Knockoff Nets' ``knockoff/models/mnist``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LeNet", "lenet"]


class LeNet(nn.Module):
    """The PyTorch-examples MNIST network, for 1×28×28 inputs.

    conv1(1→20, 5) → ReLU → maxpool 2 → conv2(20→50, 5) → ReLU → maxpool 2 →
    fc1(800→500) → ReLU → fc2(500→K). No batch norm, no dropout; PyTorch default init.
    The logits are the output of ``fc2``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


lenet = LeNet
