"""Model-stealing attacks: Knockoff Nets (random, adaptive), Jacobian-based augmentation
(JBDA, JB-self, JB-top-k) and transfer-set storage. The white-box online-attacker defenses
are in :mod:`ppoison_ext.defenses.whitebox`."""

from .base import Attack
from .jbda import AugmentedSet, JacobianAdversary, save_augmented_set
from .knockoff import AdaptivePolicy, KnockoffNets, random_query_order
from .transferset import TransferSet, TransferSetError, TransferSetWriter, export_pickle, load_transferset

__all__ = [
    # the contract
    "Attack",
    # Knockoff Nets
    "KnockoffNets", "AdaptivePolicy", "random_query_order",
    # Jacobian-based augmentation
    "JacobianAdversary", "AugmentedSet", "save_augmented_set",
    # transfer sets
    "TransferSet", "TransferSetError", "TransferSetWriter", "export_pickle", "load_transferset",
]
