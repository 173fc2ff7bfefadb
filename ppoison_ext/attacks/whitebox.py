"""Deprecated location of the white-box defenses: use :mod:`ppoison_ext.defenses.whitebox`
and :func:`ppoison_ext.defenses.build_defense`."""

import warnings

from ..defenses.factory import make_wb_defense
from ..defenses.whitebox import (ADV_OPTIMIZERS, ONLINE_COLUMNS, ONLINE_LOG, WB_DEFENSES, WhiteboxDefense,
                                 make_adv_optimizer)

warnings.warn("ppoison_ext.attacks.whitebox is deprecated; import from ppoison_ext.defenses.whitebox",
              DeprecationWarning, stacklevel=2)

__all__ = ["WhiteboxDefense", "make_wb_defense", "make_adv_optimizer", "WB_DEFENSES", "ONLINE_LOG",
           "ONLINE_COLUMNS", "ADV_OPTIMIZERS"]
