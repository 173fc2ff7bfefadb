"""Model-stealing attacks: Knockoff Nets (random, adaptive), Jacobian-based augmentation
(JBDA, JB-self, JB-top-k), the defense-aware attackers (Smoothing, Top-1, S4L, recovery
tables with Partial Bayes / D-DAE restorers) and transfer-set storage."""

from .aware import AWARE_SUBDIR, DefenseAware, Smoothing, Top1
from .base import Attack
from .jbda import AugmentedSet, JacobianAdversary, save_augmented_set
from .knockoff import AdaptivePolicy, KnockoffNets, random_query_order
from .recovery import RecoveryTable, build_recovery_table, dirichlet_samples
from .restorers import DDAE, PartialBayes, Restorer, hard_labels, transform_transferset
from .s4l import S4LCriterion, rotation_batch
from .shadow import load_shadow_models, train_shadow_models
from .transferset import TransferSet, TransferSetError, TransferSetWriter, export_pickle, load_transferset

__all__ = ["Attack", "KnockoffNets", "AdaptivePolicy", "random_query_order", "JacobianAdversary",
           "AugmentedSet", "save_augmented_set", "DefenseAware", "Smoothing", "Top1", "AWARE_SUBDIR",
           "RecoveryTable", "build_recovery_table", "dirichlet_samples", "Restorer", "PartialBayes", "DDAE",
           "hard_labels", "transform_transferset", "S4LCriterion", "rotation_batch", "train_shadow_models",
           "load_shadow_models", "TransferSet", "TransferSetError", "TransferSetWriter", "export_pickle",
           "load_transferset"]
