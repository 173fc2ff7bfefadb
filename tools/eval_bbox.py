#!/usr/bin/env python
"""`python tools/eval_bbox.py ...`: the same step as `ppoison eval-bbox ...` (ppoison_ext.pipeline.evaluate)."""

import sys
from pathlib import Path

try:
    import ppoison_ext  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppoison_ext.pipeline.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
