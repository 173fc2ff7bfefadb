"""The ``ppoison`` command: one subcommand per step of the reference's pipeline.

::

    ppoison train-victim MNIST lenet -o models/victim/MNIST-lenet-train-nodefense
    ppoison transfer random VIC_DIR mad "epsilon:0.5,objmax:True" --out_dir D --queryset EMNISTLetters
    ppoison train-attacker D lenet MNIST --budgets 50,100,500,1000
    ppoison eval-bbox VIC_DIR mad "epsilon:0.5,objmax:True" --out_dir D
    ppoison jacobian jbda VIC_DIR none "" --model_adv lenet --out_dir J --testset MNIST --queryset MNIST
    ppoison serve VIC_DIR --defense mad --defense-args "epsilon:1.0,oracle:argmax,model_adv_proxy:P"

Each subcommand is ``ppoison_ext.pipeline.<module>.main(argv, prog=...)`` (also runnable as
``python -m ppoison_ext.pipeline.<module>``); ``ppoison <subcommand> --help`` lists its flags,
which each step declares once in its settings dataclass (:mod:`ppoison_ext.pipeline.settings`).
Modules are imported only when their subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

__all__ = ["main", "SUBCOMMANDS", "build_parser"]

#: subcommand -> (module, one-line description)
SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    "train-victim": ("ppoison_ext.pipeline.victim",
                     "train a victim (or, with --epochs 1 --train_subset 10 --lr 0.0, a MAD proxy)"),
    "transfer": ("ppoison_ext.pipeline.transfer",
                 "query a defended victim and store the transfer set (Knockoff random/adaptive)"),
    "train-attacker": ("ppoison_ext.pipeline.attacker",
                       "train a knockoff on a transfer set through a list of budgets"),
    "eval-bbox": ("ppoison_ext.pipeline.evaluate",
                  "utility of a defended victim: accuracy and perturbation size on its test set"),
    "jacobian": ("ppoison_ext.pipeline.jacobian",
                 "Jacobian-based attacks: jbda, jbself, jbtop<k>"),
    "demo": ("ppoison_ext.pipeline.demo",
             "the main job: the defense/attack trade-off on the embedded MNIST data, with plots"),
    "grid": ("ppoison_ext.pipeline.grid",
             "an experiment grid from a TOML file (victims x attacks x defenses x settings x budgets)"),
    "serve": ("ppoison_ext.serve.main",
              "serve a defended victim over HTTP (micro-batching, API keys, budgets, per-key query logs)"),
    "serve-keygen": ("ppoison_ext.serve.keygen", "make an API key for 'ppoison serve' (stores only its hash)"),
}


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (used for ``--help``/``--version``; subcommands parse their own flags)."""
    width = max(len(k) for k in SUBCOMMANDS)
    lines = "\n".join(f"  {name.ljust(width)}  {desc}" for name, (_, desc) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="ppoison",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prediction Poisoning (MAD) and model-stealing attacks: the reference pipeline's steps.",
        epilog=f"subcommands:\n{lines}\n\nRun 'ppoison <subcommand> --help' for a subcommand's flags.",
        usage="ppoison [-h] [--version] <subcommand> [args ...]",
    )
    parser.add_argument("--version", action="version", version=f"ppoison_ext {_version()}")
    parser.add_argument("subcommand", nargs="?", metavar="<subcommand>", choices=list(SUBCOMMANDS),
                        help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``ppoison``: dispatches ``ppoison <subcommand> args...`` to the
    subcommand module's ``main(args, prog="ppoison <subcommand>")``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv[:1] if argv else ["--help"])  # --help / --version exit here
        parser.error(f"unknown option {argv[0]!r}")
    name, rest = argv[0], argv[1:]
    if name == "help":
        if rest and rest[0] in SUBCOMMANDS:
            return main([rest[0], "--help"])
        parser.print_help()
        return 0
    if name not in SUBCOMMANDS:
        parser.error(f"unknown subcommand {name!r}; choose from: {', '.join(SUBCOMMANDS)}")
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            sys.stderr.write(f"ppoison: the '{name}' subcommand is not available in this installation "
                             f"({module_name} is missing)\n")
            return 2
        raise
    entry = getattr(module, "main", None)
    if entry is None:
        sys.stderr.write(f"ppoison: {module_name} has no main(argv, prog=...) function\n")
        return 2
    return int(entry(rest, prog=f"ppoison {name}") or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
