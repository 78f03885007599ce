"""Print every ``fast`` load of ``gpu_bench.py`` (or ``gpu_bench_tp.py``) JSON files with where its read/copy time went.

    python3 bench/summary_phases.py $OUT/gpu_bench.json [more.json ...]

One line per load: file, model, contender, phase/cache, read/copy seconds, where the plan
came from, and ``copy_phases`` (``ExecutionStats.phases``: set-up, threads, drain, and the
per-thread sums of reads, buffer waits, copy issue, lane registration and lane waits).
"""

from __future__ import annotations

import json
import os
import sys


def _line(path: str, label: str, phase: str, cache: str, summary: dict) -> str:
    return (f"{os.path.basename(path)} {label} {phase}/{cache} read/copy {summary['copy_seconds']:.3f} s, "
            f"plan {summary.get('plan_source')}, phases {summary.get('copy_phases')}")


def main(paths) -> int:
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for rank in data.get("ranks", []):  # gpu_bench_tp.py: one entry per rank
            for row in rank.get("rows", []):
                if row.get("fast_summary"):
                    print(_line(path, f"rank {row['rank']} {row['contender']}", row["phase"], row["cache"], row["fast_summary"]))
        for model, mdata in data.get("models", {}).items():
            for name, cdata in mdata.get("contenders", {}).items():
                for step in cdata.get("steps", []):
                    if step.get("fast_summary"):
                        print(_line(path, f"{model} {name}", step["phase"], step["cache"], step["fast_summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
