"""Defended black boxes: a victim model whose released posteriors are perturbed.

Every defense is an ``nn.Module``: ``defense(x)`` returns the released posteriors [B, K];
``defense.perturb(x)`` also returns the undefended y and MAD's objective values.
"""

from .args import DEFENSE_NAMES, defense_from_dir, make_defense, parse_defense_args
from .base import Defense, DefenseOutput
from .baselines import RandomNoise, ReverseSigmoid
from .blackbox import Blackbox
from .mad import MAD
from .proxy import ProxyView
from .querylog import QueryLogger, read_queries

__all__ = [
    # base
    "Defense", "DefenseOutput",
    # defenses
    "Blackbox", "MAD", "ReverseSigmoid", "RandomNoise",
    # building
    "parse_defense_args", "make_defense", "defense_from_dir", "DEFENSE_NAMES",
    # logging and proxies
    "QueryLogger", "read_queries", "ProxyView",
]
