#!/usr/bin/env python
"""`python tools/train_victim.py ...`: the same step as `ppoison train-victim ...` (ppoison_ext.pipeline.victim)."""

import sys
from pathlib import Path

try:
    import ppoison_ext  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppoison_ext.pipeline.victim import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
