"""The defended black box (a victim model whose posteriors are perturbed before release), and
the registry that names every defense with its ``defense_args`` keys."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import int_arg, type_arg
from ..modeldir import load_model_dir
from .querylog import QueryLogger

__all__ = ["Defense", "DefenseOutput", "DefenseEntry", "REGISTRY", "register", "build_registered", "boolean",
           "optional_str"]


def boolean(v: str) -> bool:
    """A ``defense_args`` boolean: True/False/true/false/1/0."""
    low = v.lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise ValueError("expected a boolean (True/False/true/false/1/0)")


def optional_str(v: str) -> Optional[str]:
    """A ``defense_args`` string where ``None``/``none``/empty means None."""
    return None if v in ("None", "none", "") else v


#: keys every defense accepts and ignores (command lines pass them to every defense)
COMMON_KEYS: Dict[str, Callable[[str], Any]] = {"out_path": str, "log_prefix": str}


class DefenseEntry(NamedTuple):
    """A registered name: its class, its keys' parsers, the required key and an example."""

    cls: type
    keys: Dict[str, Callable[[str], Any]]
    needs: Optional[str] = None
    example: Optional[str] = None


#: defense name -> entry, in registration order (the order ``ppoison_ext.defenses`` imports them)
REGISTRY: Dict[str, DefenseEntry] = {}


def register(*names: str, needs: Optional[str] = None, example: Optional[str] = None,
             **keys: Callable[[str], Any]) -> Callable[[type], type]:
    """Class decorator: registers the defense under ``names`` with its ``defense_args`` keys'
    parsers; ``needs``: the required key (``example`` shows it in the error)."""
    def decorate(cls: type) -> type:
        for name in names:
            if name in REGISTRY:
                raise ValueError(f"defense {name!r} is registered twice")
            REGISTRY[name] = DefenseEntry(cls, {**keys, **COMMON_KEYS}, needs, example or f"{needs}:0.5")
        return cls
    return decorate


def build_registered(name: str, model: nn.Module, args: Dict[str, Any], **context: Any) -> "Defense":
    """Builds the defense registered as ``name`` from parsed arguments (no common keys)."""
    entry = REGISTRY[name]
    if entry.needs is not None and entry.needs not in args:
        raise ValueError(f"defense {name} needs {entry.needs} (e.g. '{entry.example}')")
    return entry.cls.from_args(name, model, dict(args), **context)


def load_model_arg(path, key: str, device, checkpoint_names: Sequence[str] = ("checkpoint.pth.tar",
                                                                             "model_best.pth.tar")) -> nn.Module:
    """The model folder given as the defense argument ``key``, on ``device``, in eval mode."""
    if not Path(path).is_dir():
        raise ValueError(f"{key} must be a model directory (params.json + checkpoint), got {path}")
    return load_model_dir(path, device=device, checkpoint_names=checkpoint_names)[0]


def proxy_arg(args: Dict[str, Any], proxy: Optional[nn.Module], model: nn.Module, device, what: str = "proxy",
              train: bool = False) -> Optional[nn.Module]:
    """``proxy=``, or the model folder ``model_adv_proxy:DIR`` popped from ``args`` (not both),
    loaded in train mode when ``train``."""
    path = args.pop("model_adv_proxy", None)
    if path is None:
        return proxy
    if proxy is not None:
        raise ValueError(f"give the {what} either as model_adv_proxy in defense_args or as proxy=, not both")
    return load_model_arg(path, "model_adv_proxy", device or next(model.parameters()).device).train(train)


class DefenseOutput(NamedTuple):
    """What a defense computed for one batch: the released y_prime and undefended y [B, K], an
    objective per query [B] (MAD's angular objective and its surrogate; else None), and a
    watermark's label per query [B] int64 (−1: not marked; None: no watermark)."""

    y_prime: Tensor
    y: Tensor
    obj: Optional[Tensor] = None
    sobj: Optional[Tensor] = None
    marks: Optional[Tensor] = None


class Defense(nn.Module):
    """Base class: wraps a victim ``model``; ``defense(x)`` returns the released posteriors
    [B, K] for a batch x of whatever the victim takes.

    Subclasses implement :meth:`defend`. The victim is put in eval mode and queried under
    ``no_grad``; ``defense.train()``/``eval()`` never switch the wrapped models.
    :meth:`perturb` also returns the undefended y (and objective values), counts queries and
    feeds the optional :class:`QueryLogger`; without a logger a defense does no I/O.
    Subclasses that draw random numbers call :meth:`_init_seed` and draw from :meth:`_generator`.
    """

    def __init__(self, model: nn.Module, *, logger: Optional[QueryLogger] = None):
        super().__init__()
        type_arg(model, "model", nn.Module, "a torch.nn.Module")
        type_arg(logger, "logger", QueryLogger, "a QueryLogger", optional=True)
        self.model = model.eval()
        self.logger = logger
        self.call_count = 0
        self._count_lock = threading.Lock()

    @classmethod
    def from_args(cls, name: str, model: nn.Module, args: Dict[str, Any], *, logger=None, **context: Any):
        """Builds the defense registered as ``name`` from its parsed ``defense_args``; ``context``
        holds ``proxy``, ``device``, ``out_dir`` and ``whitebox`` for those that use them."""
        return cls(model, logger=logger, **args)

    def train(self, mode: bool = True) -> "Defense":
        self.training = mode  # the victim stays in eval mode, the proxy as the caller set it
        return self

    def victim_probs(self, x: Tensor) -> Tensor:
        """Undefended posteriors softmax(model(x)) [B, K]."""
        with torch.no_grad():
            return F.softmax(self.model(x), dim=1)

    def _init_seed(self, seed: Optional[int]) -> None:
        self.seed = int_arg(seed, "seed", low=None, optional=True)
        self._generators: Dict[str, torch.Generator] = {}

    def _generator(self, device: Optional[torch.device] = None) -> Optional[torch.Generator]:
        """This defense's stream on ``device`` (None: a CPU stream), started from ``seed`` at its
        first use; None when unseeded (draws then come from torch's global RNG)."""
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device or "cpu").manual_seed(self.seed)
        return self._generators[key]

    def reseed(self, seed: Optional[int]) -> None:
        """Restarts the defense's own random stream from ``seed`` (when :attr:`reseedable`)."""
        if self.reseedable:
            self.seed = seed
            self._generators = {}

    # capabilities, read by the factory, server, grid and thieves (subclasses override them)
    @property
    def batch_independent(self) -> bool:
        """Whether each row's answer depends on that row alone (and the defense's seed and
        state), bit for bit: the server may then batch rows of different requests together."""
        return False

    @property
    def keeps_top1(self) -> bool:
        """Whether every answer keeps the victim's top-1 class (its first argmax)."""
        return False

    @property
    def reseedable(self) -> bool:
        """Whether :meth:`reseed` restarts a random stream this defense draws from."""
        return False

    @property
    def stateful(self) -> bool:
        """Whether answers depend on earlier queries (state that :meth:`get_state` returns)."""
        return False

    def get_state(self) -> dict:
        """The state answers depend on, as tensors and plain values (``{}`` when stateless)."""
        return {}

    def set_state(self, state: dict) -> None:
        """Restores what :meth:`get_state` returned (``{}``: the state before any query)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")

    def resume_state(self) -> dict:
        """:meth:`get_state`, under the name of the resume API."""
        return self.get_state()

    def load_resume_state(self, state: Optional[dict]) -> None:
        """:meth:`set_state`; None restores the state before any query."""
        self.set_state(state or {})

    def defend(self, x: Tensor, y: Tensor) -> DefenseOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def _answer(self, x: Tensor) -> DefenseOutput:
        """The answer to a batch (run under ``no_grad``, before counting and logging)."""
        return self.defend(x, self.victim_probs(x))

    def _after_answer(self, x: Tensor, out: DefenseOutput) -> DefenseOutput:
        """Called with each counted and logged answer; returns what :meth:`perturb` returns."""
        return out

    def _count(self, n: int) -> None:
        with self._count_lock:
            self.call_count += n

    def perturb(self, x: Tensor) -> DefenseOutput:
        """Runs the defense on a batch and returns everything it computed."""
        type_arg(x, "x", Tensor, "a torch.Tensor")
        with torch.no_grad():
            out = self._answer(x)
        self._count(out.y.shape[0])
        if self.logger is not None:
            self.logger.log(out.y, out.y_prime, out.obj, out.sobj)
        return self._after_answer(x, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.perturb(x).y_prime

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())

    #: the attributes :meth:`hparams` reports, in order
    hparam_names: Tuple[str, ...] = ()

    def hparams(self) -> dict:
        """The defense's settings, as ``repr`` shows them."""
        return {name: getattr(self, name) for name in self.hparam_names}
