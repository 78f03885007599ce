"""Cold reads of a checkpoint, read in several patterns side by side: which one the disk likes.

    python3 bench/cold_read_bench.py --dir /var/tmp/sglang-fastload-bench/moe [--repeats 2]
        [--patterns queue-64x8,queue-6x16,dealt-6x16,ranges-6x16,dealt-6x16-seq,dealt-6x16-ownfd]

Every pattern reads every ``*.safetensors`` file of ``--dir`` once, from a dropped page cache
(``gpu_bench.drop_page_cache``: fadvise DONTNEED, then drop_caches as root), with ``preadv``
into one reused buffer per thread. A pattern is ``KIND-MiBxTHREADS[-OPTION...]``:

- ``queue``: the threads take pieces of MiB in file order from one shared queue (how
  ``gpu_bench``'s cold-read ceiling reads: ``queue-64x8``).
- ``dealt``: the pieces in file order dealt round-robin, thread k reading pieces k, k + T,
  k + 2T, ... (the loader's ``SGLANG_FASTLOAD_DEAL_CHUNKS=round-robin``).
- ``ranges``: thread k reading the k-th contiguous run of pieces (the loader's default).
  Both split the pieces with the loader's own ``binding.deal``.
- ``-seq``: ``posix_fadvise(SEQUENTIAL)`` on every file descriptor first.
- ``-ownfd``: every thread opens the files itself (its own read-ahead state per file).

The order of the patterns rotates between repeats. Output: GB/s per pattern and repeat, the
median, and the ratio to the first pattern's median; ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from sglang_fastload import constants  # noqa: E402
from sglang_fastload.loader.binding import Chunk, deal  # noqa: E402
from sglang_fastload.loader.staging import read_exact  # noqa: E402

MIB = 1 << 20
Piece = Tuple[str, int, int]  # (path, offset, bytes)


def parse_pattern(text: str) -> Dict[str, object]:
    """``"dealt-6x16-seq"`` -> kind, piece bytes, threads and options."""
    kind, size, *options = text.split("-")
    mib, threads = size.split("x")
    if kind not in ("queue", "dealt", "ranges") or set(options) - {"seq", "ownfd"}:
        raise ValueError(f"unknown pattern {text!r}")
    if kind == "queue" and options:
        raise ValueError(f"{text!r}: queue takes no options (it is gpu_bench.raw_read)")
    return {"kind": kind, "piece": int(float(mib) * MIB), "threads": int(threads), "options": set(options)}


def split_pieces(pieces: Sequence[Piece], threads: int, kind: str) -> List[List[Piece]]:
    """Each thread's pieces, in the order it reads them, dealt as the loader deals chunks."""
    how = constants.DEAL_ROUND_ROBIN if kind == "dealt" else constants.DEAL_RUNS
    chunks = [Chunk(path, [], n) for path, _, n in pieces]
    where = {id(c): piece for c, piece in zip(chunks, pieces)}
    return [[where[id(c)] for c in run] for run in deal(chunks, threads, how)]


def read_lists(paths: Sequence[str], lists: List[List[Piece]], piece: int, options: set) -> Dict[str, float]:
    """Read every thread's pieces with ``preadv`` (one thread per list); bytes and seconds."""
    shared = None if "ownfd" in options else {p: os.open(p, os.O_RDONLY) for p in paths}
    done = [0] * len(lists)
    start = threading.Barrier(len(lists) + 1)

    def thread(k: int) -> None:
        fds = shared if shared is not None else {p: os.open(p, os.O_RDONLY) for p in paths}
        try:
            if "seq" in options:
                for fd in fds.values():
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            view = memoryview(bytearray(piece))
            start.wait()
            for path, offset, n in lists[k]:
                read_exact(fds[path], view[:n], offset, path)
                done[k] += n
        finally:
            if shared is None:
                for fd in fds.values():
                    os.close(fd)

    try:
        with ThreadPoolExecutor(max_workers=len(lists)) as pool:
            futures = [pool.submit(thread, k) for k in range(len(lists))]
            start.wait()
            t0 = time.perf_counter()
            for f in futures:
                f.result()
            seconds = time.perf_counter() - t0
    finally:
        for fd in (shared or {}).values():
            os.close(fd)
    return {"bytes": sum(done), "seconds": seconds}


def run_pattern(paths: Sequence[str], text: str) -> Dict[str, object]:
    """Drop the files from the page cache, then read them all in pattern ``text``."""
    spec = parse_pattern(text)
    drop = gb.drop_page_cache(paths)
    if spec["kind"] == "queue":
        r = gb.raw_read(paths, spec["threads"], chunk=spec["piece"])
        nbytes, seconds = r["bytes"], r["seconds"]
    else:
        pieces = gb._read_chunks(paths, None, spec["piece"])
        r = read_lists(paths, split_pieces(pieces, spec["threads"], spec["kind"]), spec["piece"], spec["options"])
        nbytes, seconds = r["bytes"], r["seconds"]
    return {"pattern": text, "bytes": nbytes, "seconds": round(seconds, 3), "gbps": round(nbytes / seconds / gb.GB, 3),
            "resident_after_drop": drop["resident_after_drop"], "drop_note": drop["note"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="checkpoint directory (its *.safetensors are read)")
    p.add_argument("--patterns", default="queue-64x8,queue-6x16,dealt-6x16,ranges-6x16,dealt-6x16-seq,dealt-6x16-ownfd")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "cold_read_bench.json"))
    args = p.parse_args(argv)
    patterns = [x for x in args.patterns.split(",") if x]
    for text in patterns:
        parse_pattern(text)  # fail before reading anything
    paths = sorted(glob.glob(os.path.join(args.dir, "*.safetensors")))
    if not paths:
        p.error(f"no *.safetensors in {args.dir}")
    gb.log(f"{len(paths)} files, {sum(map(os.path.getsize, paths)) / gb.GB:.2f} GB; patterns {patterns}")
    rows = []
    for rep in range(args.repeats):
        turn = rep % len(patterns)
        for text in patterns[turn:] + patterns[:turn]:
            row = run_pattern(paths, text)
            row["repeat"] = rep
            rows.append(row)
            gb.log(f"{text:22s} repeat {rep}: {row['gbps']:.3f} GB/s ({row['seconds']:.2f} s; resident after drop {row['resident_after_drop']})")
    medians = {t: statistics.median(r["gbps"] for r in rows if r["pattern"] == t) for t in patterns}
    reference = medians[patterns[0]]
    print(f"\n| pattern | GB/s (median of {args.repeats}) | × {patterns[0]} |\n|---|---|---|")
    for t in patterns:
        print(f"| {t} | {medians[t]:.3f} | {medians[t] / reference:.2f} |")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(["python3", "bench/cold_read_bench.py", *(argv or sys.argv[1:])]),
                   "files": [os.path.basename(x) for x in paths], "rows": rows, "medians": medians}, f, indent=1)
    gb.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
