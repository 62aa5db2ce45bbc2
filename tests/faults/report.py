"""Summarise reliability runs: ``python -m tests.faults.report LOG.jsonl`` prints the docs/reliability.md table.

Each line of the log is one scenario run written by :func:`tests.faults.common.record`
(set ``TIERMEM_RELIABILITY_LOG`` when running the suite). Rows group runs by
scenario: number of runs, pages verified and lost (summed over the runs), and
every other scalar figure as ``min–max`` over the runs (one value when they agree);
list figures (the RSS floors of a load run) are left to the text.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

__all__ = ["main", "table"]

_SKIP = {"scenario", "time", "pages_verified", "pages_lost"}


def _fmt(values: list[Any]) -> str:
    nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if len(nums) != len(values):
        return "/".join(sorted({str(v) for v in values}))
    lo, hi = min(nums), max(nums)
    show = (lambda x: f"{x:g}") if any(isinstance(v, float) for v in nums) else str
    return show(lo) if lo == hi else f"{show(lo)}–{show(hi)}"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table for ``rows`` (scenarios in first-seen order)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["scenario"]].append(r)
    out = [
        "| scenario | runs | pages verified | pages lost | figures (min–max over the runs) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, runs in groups.items():
        keys = [k for k in runs[0] if k not in _SKIP and not isinstance(runs[0][k], list | dict)]
        figures = ", ".join(f"{k} {_fmt([r.get(k) for r in runs if k in r])}" for k in keys)
        verified = sum(int(r["pages_verified"]) for r in runs)
        lost = sum(int(r["pages_lost"]) for r in runs)
        out.append(f"| {name} | {len(runs)} | {verified:,} | {lost} | {figures} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the table of one or more JSONL logs."""
    args = argv if argv is not None else sys.argv[1:]
    rows: list[dict[str, Any]] = []
    for path in args:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
