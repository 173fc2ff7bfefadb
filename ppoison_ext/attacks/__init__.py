"""Model-stealing attacks: Knockoff Nets (random, adaptive), Jacobian-based augmentation
(JBDA, JB-self, JB-top-k), white-box online attackers, and transfer-set storage."""

from .transferset import TransferSet, TransferSetError, TransferSetWriter, export_pickle, load_transferset

__all__ = ["TransferSet", "TransferSetError", "TransferSetWriter", "export_pickle", "load_transferset"]
