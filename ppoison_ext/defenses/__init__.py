"""Defended black boxes: a victim model whose released posteriors are perturbed.

Every defense is an ``nn.Module``: ``defense(x)`` returns the released posteriors [B, K];
``defense.perturb(x)`` also returns the undefended y and MAD's objective values.
:func:`build_defense` builds any of them from a name and arguments.
"""

from .admis import AM_VARIANTS, AdaptiveMisinformation, AMComponents
from .base import Defense, DefenseOutput
from .baselines import RandomNoise, ReverseSigmoid
from .blackbox import Blackbox
from .grad2 import GRAD2, flatten_params, watermark_target
from .grad2_baselines import MADGR, RandomGR, ReverseSigmoidGR
from .factory import (DEFENSE_KEYS, DEFENSE_NAMES, DefenseSpec, build_defense, defense_from_dir, make_defense,
                      make_wb_defense, parse_defense_args)
from .mad import MAD
from .modelguard import ModelGuardS, ModelGuardW
from .proxy import ProxyView
from .querylog import QueryLogger, read_queries
from .whitebox import WB_DEFENSES, WhiteboxDefense

__all__ = [
    # base
    "Defense", "DefenseOutput",
    # defenses
    "Blackbox", "MAD", "ReverseSigmoid", "RandomNoise", "WhiteboxDefense",
    "GRAD2", "MADGR", "ReverseSigmoidGR", "RandomGR", "flatten_params", "watermark_target",
    "AdaptiveMisinformation", "AMComponents", "AM_VARIANTS",

    "ModelGuardW", "ModelGuardS",
    # building
    "build_defense", "DefenseSpec", "parse_defense_args", "DEFENSE_NAMES", "DEFENSE_KEYS", "WB_DEFENSES",
    # deprecated builders
    "make_defense", "defense_from_dir", "make_wb_defense",
    # logging and proxies
    "QueryLogger", "read_queries", "ProxyView",
]
