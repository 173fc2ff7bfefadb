"""Deprecated location of the JBDA family: use :mod:`ppoison_ext.attacks.jbda`."""

import warnings

from .jbda import *  # noqa: F401,F403
from .jbda import __all__  # noqa: F401

warnings.warn("ppoison_ext.attacks.jacobian is deprecated; import from ppoison_ext.attacks.jbda",
              DeprecationWarning, stacklevel=2)
