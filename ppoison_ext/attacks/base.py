"""The attack contract: every model-stealing attack builds a transfer set from a black box.

An attack is built with keyword arguments (its hyperparameters, validated at construction)
and has one verb, :meth:`Attack.build_transferset` ``(blackbox, queryset, out_dir=None)``:
it queries the black box (any callable x → released posteriors [B, K]) and returns the
:class:`~ppoison_ext.attacks.transferset.TransferSet` it stored in ``out_dir``. Training a
surrogate on it is a separate step (``ppoison train-attacker``).
"""

from __future__ import annotations

import abc
import tempfile
from pathlib import Path
from typing import Any, Tuple, Union

from .transferset import TransferSet

__all__ = ["Attack"]


class Attack(abc.ABC):
    """Base class of the attacks: ``attack.build_transferset(blackbox, queryset, out_dir)`` (or
    ``attack(...)``); ``attack_params`` lists the hyperparameters ``repr`` prints."""

    attack_params: Tuple[str, ...] = ()

    @abc.abstractmethod
    def build_transferset(self, blackbox: Any, queryset: Any, out_dir: Union[str, Path, None] = None,
                          **kwargs: Any) -> TransferSet:
        """Queries ``blackbox`` with the attacker's data ``queryset`` and stores the transfer set
        in ``out_dir`` (a new temporary folder when None); returns it."""

    def __call__(self, blackbox: Any, queryset: Any, out_dir: Union[str, Path, None] = None,
                 **kwargs: Any) -> TransferSet:
        return self.build_transferset(blackbox, queryset, out_dir, **kwargs)

    @staticmethod
    def output_folder(out_dir: Union[str, Path, None]) -> Path:
        """``out_dir`` as a created folder, or a new temporary one."""
        if out_dir is None:
            return Path(tempfile.mkdtemp(prefix="ppoison-transferset-"))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.attack_params)})"
