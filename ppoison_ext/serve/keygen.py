"""``ppoison serve-keygen KEY_ID --key-file F [--budget N]``: a new API key for ``ppoison serve``.

Appends ``KEY_ID SHA256_HEX [BUDGET]`` to the key file (which the server reads with
``--api-keys``) and prints the key once, on stdout: only its hash is stored.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .auth import append_key

__all__ = ["main"]


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("key_id", help="name of the key (ledger, metrics, log folder)")
    parser.add_argument("--key-file", required=True, help="the server's --api-keys file (appended)")
    parser.add_argument("--budget", type=int, default=None, help="this key's query budget")
    args = parser.parse_args(argv)
    try:
        key = append_key(args.key_file, args.key_id, args.budget)
    except ValueError as err:
        sys.stderr.write(f"{parser.prog}: {err}\n")
        return 2
    sys.stdout.write(key + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
