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


def main(paths) -> int:
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for rank in data.get("ranks", []):  # gpu_bench_tp.py: one entry per rank
            for row in rank.get("rows", []):
                summary = row.get("fast_summary")
                if summary:
                    print(f"{os.path.basename(path)} rank {row['rank']} {row['contender']} {row['phase']}/{row['cache']} "
                          f"read/copy {summary['copy_seconds']:.3f} s, plan {summary.get('plan_source')}, "
                          f"phases {summary.get('copy_phases')}")
        for model, mdata in data.get("models", {}).items():
            for name, cdata in mdata.get("contenders", {}).items():
                for step in cdata.get("steps", []):
                    summary = step.get("fast_summary")
                    if summary:
                        print(f"{os.path.basename(path)} {model} {name} {step['phase']}/{step['cache']} "
                              f"read/copy {summary['copy_seconds']:.3f} s, plan {summary.get('plan_source')}, "
                              f"phases {summary.get('copy_phases')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
