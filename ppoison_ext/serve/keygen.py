"""``ppoison serve-keygen KEY_ID --key-file F [--budget N]``: a new API key for ``ppoison serve``;
``ppoison serve-keygen --watermark-key F``: a new watermark key (``ppoison serve --watermark-key``).

Appends ``KEY_ID SHA256_HEX [BUDGET]`` to the key file (which the server reads with
``--api-keys``) and prints the key once, on stdout: only its hash is stored. A watermark key
(256 random bits, hex) goes to a new file of mode 0600 and is not printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..defenses.dawn import new_watermark_key
from .auth import append_key

__all__ = ["main"]


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("key_id", nargs="?", help="name of the key (ledger, metrics, log folder)")
    parser.add_argument("--key-file", help="the server's --api-keys file (appended)")
    parser.add_argument("--budget", type=int, default=None, help="this key's query budget")
    parser.add_argument("--watermark-key", metavar="FILE", help="write a new watermark key to FILE instead")
    args = parser.parse_args(argv)
    if args.watermark_key is not None:
        try:
            new_watermark_key(args.watermark_key)
        except OSError as err:
            parser.error(f"--watermark-key: {err}")
        return 0
    if args.key_id is None or args.key_file is None:
        parser.error("KEY_ID and --key-file are required (or --watermark-key FILE)")
    try:
        key = append_key(args.key_file, args.key_id, args.budget)
    except ValueError as err:
        sys.stderr.write(f"{parser.prog}: {err}\n")
        return 2
    sys.stdout.write(key + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
