"""The ``ppoison`` command: one subcommand per pipeline step.

::

    ppoison train-victim MNIST lenet -o models/victim/MNIST-lenet-train-nodefense
    ppoison transfer random VIC_DIR mad "epsilon:0.5,objmax:True" --out_dir D --queryset EMNISTLetters
    ppoison train-attacker D lenet MNIST --budgets 50,100,500,1000

Each subcommand is ``<module>.main(argv, prog=...)`` of :data:`SUBCOMMANDS`, imported only when it
runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Tuple

__all__ = ["main", "SUBCOMMANDS", "build_parser"]

#: subcommand -> (module, one-line description)
SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    "train-victim": ("ppoison_ext.pipeline.victim", "train a victim (or a MAD proxy, or AM's defender)"),
    "transfer": ("ppoison_ext.pipeline.transfer", "query a defended victim and store the transfer set"),
    "train-attacker": ("ppoison_ext.pipeline.attacker", "train a knockoff on a transfer set through budgets"),
    "eval-bbox": ("ppoison_ext.pipeline.evaluate", "accuracy and perturbation size of a defended victim"),
    "jacobian": ("ppoison_ext.pipeline.jacobian", "Jacobian-based attacks: jbda, jbself, jbtop<k>"),
    "demo": ("ppoison_ext.pipeline.demo", "the defense/attack trade-off on the embedded MNIST data"),
    "grid": ("ppoison_ext.pipeline.grid", "an experiment grid from a TOML file"),
    "serve": ("ppoison_ext.serve.main", "serve a defended victim over HTTP"),
    "serve-keygen": ("ppoison_ext.serve.keygen", "make an API key for 'ppoison serve' (stores only its hash)"),
    "serve-audit": ("ppoison_ext.serve.audit", "per API key of a served log folder: queries, detector flag"),
    "detect-calibrate": ("ppoison_ext.pipeline.detect", "fit an extraction detector for a victim"),
    "detect-eval": ("ppoison_ext.pipeline.detect_eval", "detectors against every thief, per account"),
    "verify": ("ppoison_ext.pipeline.verify", "did a suspect model learn a served victim's watermarks?"),
    "prove-eval": ("ppoison_ext.pipeline.prove_eval", "DAWN watermarks against every thief, with innocents"),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (used for ``--help``/``--version``; subcommands parse their own flags)."""
    from . import __version__

    width = max(len(k) for k in SUBCOMMANDS)
    lines = "\n".join(f"  {name.ljust(width)}  {desc}" for name, (_, desc) in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="ppoison",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Prediction Poisoning (MAD) and model-stealing attacks: the pipeline's steps.",
        epilog=f"subcommands:\n{lines}\n\nRun 'ppoison <subcommand> --help' for a subcommand's flags.",
        usage="ppoison [-h] [--version] <subcommand> [args ...]",
    )
    parser.add_argument("--version", action="version", version=f"ppoison_ext {__version__}")
    parser.add_argument("subcommand", nargs="?", metavar="<subcommand>", choices=list(SUBCOMMANDS),
                        help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``ppoison``: runs ``ppoison <subcommand> args...``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv[:1] if argv else ["--help"])  # --help / --version exit
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
    return int(module.main(rest, prog=f"ppoison {name}") or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
