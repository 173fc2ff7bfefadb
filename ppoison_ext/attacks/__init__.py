"""Model-stealing attacks: Knockoff Nets (random, adaptive), Jacobian-based augmentation
(JBDA, JB-self, JB-top-k), white-box online attackers, and transfer-set storage."""

from .jacobian import AugmentedSet, JacobianAdversary, save_augmented_set
from .knockoff import AdaptivePolicy, KnockoffNets, random_query_order
from .transferset import TransferSet, TransferSetError, TransferSetWriter, export_pickle, load_transferset
from .whitebox import WhiteboxDefense, make_wb_defense

__all__ = [
    # Knockoff Nets
    "KnockoffNets", "AdaptivePolicy", "random_query_order",
    # Jacobian-based augmentation
    "JacobianAdversary", "AugmentedSet", "save_augmented_set",
    # white-box online attackers
    "WhiteboxDefense", "make_wb_defense",
    # transfer sets
    "TransferSet", "TransferSetError", "TransferSetWriter", "export_pickle", "load_transferset",
]
