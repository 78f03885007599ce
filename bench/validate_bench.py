"""Time the per-update checks of a checkpoint directory that run before any byte is read.

Every ``fast`` update lists the shards, reads the index (its parse is memoized by content),
reads every shard header (memoized the same way) and checks that the index and the headers
agree tensor by tensor. On MoE checkpoints with tens of thousands of tensors this is part of
an update's time outside reads and copies. CPU only; prints the best of ``--repeat`` runs::

    .venv/bin/python bench/validate_bench.py /var/tmp/sglang-fastload-bench-cpu/moe
"""

from __future__ import annotations

import argparse
import json
import time

from sglang_fastload.checkpoint.checkpoint_files import check_weight_map, resolve_checkpoint_files
from sglang_fastload.checkpoint.safetensors_header import read_header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    best = {"list_and_index_ms": float("inf"), "headers_ms": float("inf"), "index_vs_headers_ms": float("inf")}
    tensors = 0
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        files = resolve_checkpoint_files(args.directory)
        t1 = time.perf_counter()
        headers = {path: read_header(path) for path in files.files}
        t2 = time.perf_counter()
        check_weight_map(files, headers)
        t3 = time.perf_counter()
        for key, seconds in zip(best, (t1 - t0, t2 - t1, t3 - t2)):
            best[key] = min(best[key], seconds * 1000)
        tensors = sum(len(h.tensors) for h in headers.values())
    print(json.dumps({"directory": args.directory, "tensors": tensors, **{k: round(v, 2) for k, v in best.items()}}))


if __name__ == "__main__":
    main()
