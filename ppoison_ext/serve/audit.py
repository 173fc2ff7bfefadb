"""``ppoison serve-audit LOG_DIR``: per API key of a ``ppoison serve --log-dir`` folder, the queries
answered and the detector's view (queries it saw, flag, the query at which the key was first
flagged, the last score), from ``ledger.sqlite``; ``--json`` for machine reading."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["audit", "main"]


def audit(log_dir) -> List[Dict]:
    """One row per key: ``key_id, queries, detector_queries, flagged, flagged_since, last_score``."""
    path = Path(log_dir) / "ledger.sqlite"
    if not path.is_file():
        raise ValueError(f"log_dir: {log_dir} holds no ledger.sqlite (not a 'ppoison serve --log-dir' "
                         "folder)")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT k.key_id, k.used, d.queries, d.flag, d.flagged_at, d.score FROM keys k "
                          "LEFT JOIN detections d ON d.key_id = k.key_id ORDER BY k.key_id").fetchall()
    return [{"key_id": k, "queries": used, "detector_queries": dq,
             "flagged": None if flag is None else bool(flag), "flagged_since": at, "last_score": score}
            for k, used, dq, flag, at, score in rows]


def main(argv: Optional[List[str]] = None, *, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("log_dir", help="the server's --log-dir")
    parser.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    args = parser.parse_args(argv)
    try:
        rows = audit(args.log_dir)
    except (ValueError, sqlite3.Error) as err:
        sys.stderr.write(f"{parser.prog}: {err}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
        return 0
    cols = list(rows[0]) if rows else ["key_id", "queries", "detector_queries", "flagged", "flagged_since",
                                       "last_score"]
    cells = [cols] + [["-" if r[c] is None else f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c])
                       for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog=f"python -m {__spec__.name}"))
