"""When each file of a streamed first start lands in the scratch, and when its copies are queued.

    python3 bench/stream_timeline_bench.py --site-dir /tmp/site [--moe-layers 16 --repeats 3]

Writes (or reuses) ``gpu_bench.py``'s MoE checkpoint, then starts the model ``--repeats``
times with the start-up stream as shipped (each file's copies out of the scratch queued as it
lands) and alternately with the copies waiting for every read (``gpu_bench.py``'s
``fast-stream-copyafter``). For every start it prints, in seconds from the stream's start:
when the plan was built, when each file landed, when its copies had been queued, when the
device had finished them all, and when and how long the stream's clean-up calls ran
(``[start, seconds]``). Timing only (no poisoning, no comparison of bits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from bench import synthetic_checkpoints as sc  # noqa: E402


def instrument(box: dict):
    """Record the stream's file landings, copy queueing and end into ``box["marks"]`` (a dict
    the caller replaces before each start)."""
    from sglang_fastload.loader import scratch_copies, startup_stream

    cls = startup_stream.StartupStream
    join_readers, finish = cls._join_readers, cls.finish
    queue = scratch_copies.FileCopies.queue

    def timed_join_readers(stream):
        marks = box["marks"]
        # The first call (``fast-stream-copyafter`` calls it again once every read ended).
        marks.setdefault("plan_built", time.perf_counter() - stream.started)
        marks["t0"] = stream.started
        return join_readers(stream)

    def timed_queue(copies, runtime, handle):
        marks = box["marks"]
        t = time.perf_counter()
        queue(copies, runtime, handle)
        marks.setdefault("queued", []).append(
            (os.path.basename(copies.path), round(t - marks["t0"], 4), round(time.perf_counter() - marks["t0"], 4),
             len(copies.runs) + len(copies.dsts)))

    def timed_finish(stream, plan, params):
        marks = box["marks"]
        out = finish(stream, plan, params)
        marks["end"] = round(time.perf_counter() - stream.started, 4)
        marks["landed"] = {os.path.basename(p): round(t - stream.started, 4) for p, t in stream.landed_at.items()}
        return out

    def timed(name, call):
        def run(*a, **k):
            marks = box["marks"]
            t = time.perf_counter()
            try:
                return call(*a, **k)
            finally:
                if "t0" in marks:
                    marks.setdefault(name, []).append((round(t - marks["t0"], 4), round(time.perf_counter() - t, 4)))
        return run

    abandon = cls.abandon
    cls.abandon = timed("abandon", abandon)
    startup_stream.release_workers = timed("release_workers", startup_stream.release_workers)
    startup_stream.torch.cuda.empty_cache = timed("empty_cache", startup_stream.torch.cuda.empty_cache)
    cls._join = timed("join", cls._join)
    cls._join_readers, cls.finish = timed_join_readers, timed_finish
    scratch_copies.FileCopies.queue = timed_queue


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--site-dir", default=None)
    p.add_argument("--workdir", default="/var/tmp/sglang-fastload-bench")
    p.add_argument("--moe-layers", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gb.activate_site(args.site_dir)
    from bench import import_standins_for_bench

    import_standins_for_bench.activate()
    os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "0"
    spec = sc.moe_spec("full", layers=args.moe_layers)
    info = sc.write_checkpoint(os.path.join(args.workdir, "moe"), spec, shard_bytes=5 * gb.GB, sync=True, log=gb.log)
    gb.raw_read(info.files, 16)  # warm page cache
    session = gb.Session("cuda")
    box: dict = {}
    instrument(box)
    rows = []
    for i in range(2 * args.repeats):
        name = "fast" if i % 2 == 0 else "fast-stream-copyafter"
        cont = gb.CONTENDERS[name]
        marks = box["marks"] = {}
        _, model_config, load_config = session.configure(info.directory, cont)
        with gb.environment_of(cont):
            model, timing = session.load(model_config, load_config)
        marks.pop("t0", None)
        row = {"contender": name, "load_s": round(timing["load_s"], 4), **marks}
        rows.append(row)
        print(json.dumps(row), flush=True)
        model = None
        gb.free_memory("cuda")
    out = args.out or os.path.join(os.environ.get("OUT", "."), "stream_timeline.json")
    with open(out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
