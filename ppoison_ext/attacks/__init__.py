"""Model-stealing attacks: Knockoff Nets (random, adaptive), Jacobian-based augmentation
(JBDA, JB-self, JB-top-k), the defense-aware attackers (Smoothing, Top-1, S4L, recovery
tables with Partial Bayes / D-DAE restorers) and transfer-set storage. The white-box online-attacker defenses
are in :mod:`ppoison_ext.defenses.whitebox`."""

from .aware import AWARE_SUBDIR, DefenseAware, Smoothing, Top1
from .base import Attack
from .jbda import AugmentedSet, JacobianAdversary, save_augmented_set
from .knockoff import AdaptivePolicy, KnockoffNets, random_query_order
from .recovery import RecoveryTable, build_recovery_table, dirichlet_samples
from .restorers import DDAE, PartialBayes, Restorer, hard_labels, transform_transferset
from .s4l import S4LCriterion, rotation_batch
from .shadow import load_shadow_models, train_shadow_models
from .transferset import TransferSet, TransferSetError, TransferSetWriter, export_pickle, load_transferset

__all__ = [
    # the contract
    "Attack",
    # Knockoff Nets
    "KnockoffNets", "AdaptivePolicy", "random_query_order",
    # Jacobian-based augmentation
    "JacobianAdversary", "AugmentedSet", "save_augmented_set",
    # defense-aware attacks
    "DefenseAware", "Smoothing", "Top1", "AWARE_SUBDIR", "RecoveryTable", "build_recovery_table",
    "dirichlet_samples", "Restorer", "PartialBayes", "DDAE", "hard_labels", "transform_transferset",
    "S4LCriterion", "rotation_batch", "train_shadow_models", "load_shadow_models",
    # transfer sets
    "TransferSet", "TransferSetError", "TransferSetWriter", "export_pickle", "load_transferset",
]
