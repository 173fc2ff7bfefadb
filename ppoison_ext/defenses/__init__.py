"""Defended black boxes: a victim model whose released posteriors are perturbed.

Every defense is an ``nn.Module``: ``defense(x)`` returns the released posteriors [B, K];
``defense.perturb(x)`` also returns the undefended y and MAD's objective values.
:func:`build_defense` builds any of them from a name and arguments.
"""

# The defense modules register their names when imported, in this order (that of DEFENSE_NAMES).
from .blackbox import Blackbox
from .mad import MAD
from .baselines import RandomNoise, ReverseSigmoid
from .grad2 import GRAD2, flatten_params, watermark_target
from .grad2_baselines import MADGR, RandomGR, ReverseSigmoidGR
from .modelguard import ModelGuardS, ModelGuardW
from .whitebox import WB_DEFENSES, WhiteboxDefense
from .admis import AM_VARIANTS, AdaptiveMisinformation, AMComponents
from .base import Defense, DefenseOutput
from .dawn import DAWN, new_watermark_key, read_watermark_key
from .factory import DEFENSE_KEYS, DEFENSE_NAMES, DefenseSpec, build_defense, parse_defense_args
from .proxy import ProxyView
from .querylog import QueryLogger, read_queries

__all__ = [
    "Defense", "DefenseOutput",
    "Blackbox", "MAD", "ReverseSigmoid", "RandomNoise", "WhiteboxDefense",
    "GRAD2", "MADGR", "ReverseSigmoidGR", "RandomGR", "flatten_params", "watermark_target",
    "AdaptiveMisinformation", "AMComponents", "AM_VARIANTS", "ModelGuardW", "ModelGuardS",
    "build_defense", "DefenseSpec", "parse_defense_args", "DEFENSE_NAMES", "DEFENSE_KEYS", "WB_DEFENSES",
    "QueryLogger", "read_queries", "ProxyView", "DAWN", "new_watermark_key", "read_watermark_key",
]
