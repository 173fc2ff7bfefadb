"""The input transforms per model family (Knockoff Nets' ``modelfamily_to_transforms``)."""
from __future__ import annotations

from typing import Dict

from torchvision import transforms as T

FAMILIES = ("mnist", "cifar", "imagenet")
SPLITS = ("train", "test")

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def get_transform(family: str, split: str) -> T.Compose:
    """A new ``Compose`` for ``family`` in {'mnist', 'cifar', 'imagenet'} and ``split`` in {'train', 'test'}.

    * mnist: train = test = ToTensor, Normalize(MNIST)
    * cifar: train = RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize(CIFAR);
      test = ToTensor, Normalize(CIFAR)
    * imagenet: train = RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize(ImageNet);
      test = Resize(256), CenterCrop(224), ToTensor, Normalize(ImageNet)
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {list(FAMILIES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if family == "mnist":
        return T.Compose([T.ToTensor(), T.Normalize(MNIST_MEAN, MNIST_STD)])
    if family == "cifar":
        norm = T.Normalize(mean=CIFAR_MEAN, std=CIFAR_STD)
        if split == "train":
            return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
        return T.Compose([T.ToTensor(), norm])
    norm = T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if split == "train":
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm])


#: ``family -> {'train': Compose, 'test': Compose}`` (shared instances).
modelfamily_to_transforms: Dict[str, Dict[str, T.Compose]] = {
    fam: {split: get_transform(fam, split) for split in SPLITS} for fam in FAMILIES
}
