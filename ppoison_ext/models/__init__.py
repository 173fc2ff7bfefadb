"""Model zoo of Knockoff Nets / Prediction Poisoning, offline.

* :func:`get_net` builds ``mnist`` / ``cifar`` / ``imagenet`` family architectures
  (:data:`MODEL_NAMES`), randomly initialised, from a local checkpoint (weights copied by
  name) or with ImageNet weights read from a local file. Nothing is ever downloaded.
* :func:`last_linear` finds the ``nn.Linear`` whose output is a model's logits; MAD's
  closed-form Jacobian hooks it to read the features h.
* :func:`copy_weights_` copies tensors by name where shapes match.
"""

from . import cifar, imagenet, mnist
from .heads import classifier_head, example_input, last_linear, last_linear_name, num_classes_of
from .imagenet import find_imagenet_weights, imagenet_weight_candidates, remap_cadene_state_dict
from .zoo import DEFAULT_NUM_CLASSES, INPUT_SIZES, MODEL_FAMILIES, MODEL_NAMES, CopyReport, copy_weights_, get_net

__all__ = ["get_net", "MODEL_NAMES", "MODEL_FAMILIES", "DEFAULT_NUM_CLASSES", "INPUT_SIZES", "last_linear",
           "last_linear_name", "classifier_head", "num_classes_of", "example_input", "copy_weights_",
           "CopyReport", "find_imagenet_weights", "imagenet_weight_candidates", "remap_cadene_state_dict",
           "cifar", "imagenet", "mnist"]
