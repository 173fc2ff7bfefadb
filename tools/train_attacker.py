#!/usr/bin/env python
"""`python tools/train_attacker.py ...`: the same step as `ppoison train-attacker ...` (ppoison_ext.pipeline.attacker)."""

import sys
from pathlib import Path

try:
    import ppoison_ext  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppoison_ext.pipeline.attacker import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
