"""ppoison_ext: the Prediction Poisoning (MAD) defense and model-stealing attacks, with
native C++/CUDA kernels for PyTorch."""

from . import ops, reference
from ._native import native_info

__version__ = "0.1.0"

__all__ = ["ops", "reference", "native_info", "__version__"]
