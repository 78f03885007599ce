"""Parsing the fast loader's summary lines, and the demo's result tables."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import List, Optional, Sequence

# The one line the fast loader logs per load (sglang_fastload/loader/summary.py), e.g.
# "sglang-fastload: loaded /m/b: 4 files, 807 tensors (807 used here), read 209987584 of
#  210082464 bytes (0.210 GB) with 8 threads; plan 0.001 s (cached), validate 0.014 s,
#  read/copy 0.033 s, total 0.048 s, 6.37 GB/s"   (" [tp rank R/N]" follows the directory at TP>1)
SUMMARY_RE = re.compile(
    r"sglang-fastload: loaded (?P<directory>.+?)(?: \[tp rank (?P<rank>\d+)/(?P<world>\d+)\])?: "
    r"(?P<files>\d+) files, (?P<tensors>\d+) tensors \((?P<used>\d+) used here\), "
    r"read (?P<bytes_read>\d+) of (?P<checkpoint_bytes>\d+) bytes \([^)]*\) with (?P<threads>\d+) threads; "
    r"plan (?P<plan_s>[\d.]+) s \((?P<plan>cached|built|stored)\), validate (?P<validate_s>[\d.]+) s, "
    r"read/copy (?P<copy_s>[\d.]+) s, total (?P<total_s>[\d.]+) s, (?P<gbps>[\d.]+) GB/s"
)


@dataclass
class LoadLine:
    directory: str
    rank: int
    files: int
    tensors: int
    bytes_read: int
    checkpoint_bytes: int
    threads: int
    plan_s: float
    plan_cached: bool
    plan_source: str  # "cached", "stored" (read from the plan store) or "built"
    validate_s: float
    copy_s: float
    total_s: float
    gbps: float


def parse_summaries(text: str) -> List[LoadLine]:
    """Every fast-loader summary line in ``text`` (a server log, or a part of one)."""
    out = []
    for m in SUMMARY_RE.finditer(text):
        out.append(
            LoadLine(
                directory=m["directory"],
                rank=int(m["rank"] or 0),
                files=int(m["files"]),
                tensors=int(m["tensors"]),
                bytes_read=int(m["bytes_read"]),
                checkpoint_bytes=int(m["checkpoint_bytes"]),
                threads=int(m["threads"]),
                plan_s=float(m["plan_s"]),
                plan_cached=m["plan"] == "cached",
                plan_source=m["plan"],
                validate_s=float(m["validate_s"]),
                copy_s=float(m["copy_s"]),
                total_s=float(m["total_s"]),
                gbps=float(m["gbps"]),
            )
        )
    return out


def combined_copy_gbps(lines: Sequence[LoadLine]) -> Optional[float]:
    """Read/copy GB/s of one load over all its ranks: bytes of every rank / slowest rank's time."""
    if not lines:
        return None
    seconds = max(line.copy_s for line in lines)
    if seconds <= 0:
        return None
    return sum(line.bytes_read for line in lines) / seconds / 1e9


def median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """A plain-text table: left-aligned first column, the others right-aligned."""
    cols = list(zip(*([list(headers)] + [list(r) for r in rows])))
    widths = [max(len(str(c)) for c in col) for col in cols]

    def line(cells):
        parts = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            parts.append(str(cell).ljust(w) if i == 0 else str(cell).rjust(w))
        return indent + "   ".join(parts).rstrip()

    rule = indent + "   ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in rows])
