"""Host-to-device streaming beside a busy interpreter: how fast, and how much it slows the Python.

    python3 bench/stream_beside_python_bench.py --gb 16 --out $OUT/stream-beside-python.json

A first start builds its plan in Python (the replay of the model's loaders) before it reads.
Reading the checkpoint to the device meanwhile (into a scratch the plan then copies from)
only pays if the readers leave the replay its speed: both share one interpreter lock. This
measures the pair: the stream's GB/s and the slowdown of a Python loop running at the same
time. It writes one page-cached file of ``--gb`` and, for each way of streaming it into one
device buffer, times the stream alone, the loop alone, and both at once:

- ``pinned TxC``: T threads, each reading C MiB pieces into its own two pinned buffers and
  queueing ``cudaMemcpyAsync`` through the CUDA runtime (as the loader's readers do);
- ``pageable TxC``: T threads, each handing torch a C MiB view of a mapping of the file
  (``copy_`` from pageable memory: the driver stages it; the interpreter lock is released
  for the whole piece).

The loop is pure-Python dictionary work; its slowdown factor is (time beside the stream) /
(time alone), the loop alone timed right before each pair (``--repeats`` pairs, medians).
``--switch-interval`` sets the interpreter's (Python's default is 0.005 s).
Needs CUDA and sglang-fastload (for the runtime binding). docs/benchmarks.md, fourteenth run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import statistics
import sys
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from sglang_fastload.loader import cuda_runtime, host_memory  # noqa: E402
from sglang_fastload.loader.staging import read_exact  # noqa: E402

MIB = 1 << 20


def python_loop(n: int) -> float:
    """Interpreter-bound work (dictionary updates and attribute-free arithmetic)."""
    t0 = time.perf_counter()
    d = {}
    for i in range(n):
        d[i & 1023] = d.get((i * 7) & 1023, 0) + i
    return time.perf_counter() - t0


_PINNED = {}  # (thread, piece) -> (stream, buffers, views, events): made once, as the loader keeps them


def _pinned(k: int, piece: int):
    key = (k, piece)
    if key not in _PINNED:
        rt = cuda_runtime.runtime()
        bufs = [host_memory.pinned_empty(piece) for _ in range(2)]
        _PINNED[key] = (torch.cuda.Stream(), bufs, [memoryview(b.numpy()) for b in bufs], [rt.new_event(), rt.new_event()])
    return _PINNED[key]


def _taker(size: int, piece: int):
    """A function handing out ``(offset, nbytes)`` pieces of the file, one per call, from any
    thread (``next`` on a count holds the interpreter lock); None when none are left."""
    counter = itertools.count()
    pieces = [(off, min(piece, size - off)) for off in range(0, size, piece)]

    def take():
        k = next(counter)
        return pieces[k] if k < len(pieces) else None

    return take


def _in_threads(reader, threads: int) -> None:
    ts = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def stream_pinned(path: str, size: int, dst: torch.Tensor, threads: int, piece: int) -> None:
    rt = cuda_runtime.runtime()
    fd = os.open(path, os.O_RDONLY)
    take = _taker(size, piece)
    kept = [_pinned(k, piece) for k in range(threads)]

    def reader(k: int) -> None:
        stream, bufs, views, events = kept[k]
        used = [False, False]
        turn = 0
        with torch.cuda.stream(stream):
            for off, n in iter(take, None):
                if used[turn] and not rt.done(events[turn]):
                    rt.wait(events[turn])
                read_exact(fd, views[turn][:n], off, path)
                rt.copy_to_device(dst.data_ptr() + off, bufs[turn].data_ptr(), n, stream.cuda_stream)
                rt.record(events[turn], stream.cuda_stream)
                used[turn] = True
                turn ^= 1
        stream.synchronize()

    _in_threads(reader, threads)
    os.close(fd)


def stream_pageable(path: str, size: int, dst: torch.Tensor, threads: int, piece: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    take = _taker(size, piece)

    def reader(k: int) -> None:
        mapping = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        host = torch.frombuffer(mapping, dtype=torch.uint8)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            for off, n in iter(take, None):
                dst.narrow(0, off, n).copy_(host.narrow(0, off, n))
        stream.synchronize()
        del host
        mapping.close()

    _in_threads(reader, threads)
    os.close(fd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=16.0)
    p.add_argument("--file", default="/var/tmp/stream-beside-python.bin")
    p.add_argument("--loop", type=int, default=1_500_000, help="iterations of the Python loop")
    p.add_argument("--ways", default="pinned:16x6,pinned:4x6,pinned:2x6,pageable:4x64,pageable:8x64,pageable:2x256,pageable:4x256")
    p.add_argument("--switch-interval", type=float, default=0.0005)
    p.add_argument("--repeats", type=int, default=3, help="pairs (loop alone, then beside the stream) per way; medians")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "stream-beside-python.json"))
    args = p.parse_args(argv)
    size = int(args.gb * 1e9) // MIB * MIB
    if not os.path.exists(args.file) or os.path.getsize(args.file) != size:
        block = os.urandom(64 * MIB)
        with open(args.file, "wb") as f:
            for _ in range(size // (64 * MIB)):
                f.write(block)
            f.write(block[: size % (64 * MIB)])
    with open(args.file, "rb") as f:  # warm the page cache
        while f.read(256 * MIB):
            pass
    torch.cuda.init()
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    sys.setswitchinterval(args.switch_interval)
    rows = []
    for way in args.ways.split(","):
        kind, shape = way.split(":")
        threads, piece = (int(x) for x in shape.split("x"))
        run = stream_pinned if kind == "pinned" else stream_pageable
        run(args.file, size, dst, threads, piece * MIB)  # warm-up (buffers, mappings)
        samples = []
        for _ in range(args.repeats):
            # The loop alone right before each pair (the CPU's clock moves between ways).
            alone = statistics.median(python_loop(args.loop) for _ in range(3))
            t0 = time.perf_counter()
            run(args.file, size, dst, threads, piece * MIB)
            torch.cuda.synchronize()
            stream_alone = time.perf_counter() - t0
            done = {}
            th = threading.Thread(target=lambda: done.update(loop=python_loop(args.loop)))
            t0 = time.perf_counter()
            th.start()
            run(args.file, size, dst, threads, piece * MIB)
            torch.cuda.synchronize()
            stream_beside = time.perf_counter() - t0
            th.join()
            samples.append((alone, done["loop"], stream_alone, stream_beside))
        alone, beside, s_alone, s_beside = (statistics.median(x[i] for x in samples) for i in range(4))
        row = dict(way=way, repeats=args.repeats, stream_alone_gbps=round(size / s_alone / 1e9, 2),
                   stream_beside_gbps=round(size / s_beside / 1e9, 2),
                   loop_alone_s=round(alone, 3), loop_beside_s=round(beside, 3),
                   loop_slowdown=round(statistics.median(x[1] / x[0] for x in samples), 2),
                   samples=[[round(v, 4) for v in x] for x in samples])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "samples"}), flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(command=" ".join(sys.argv), gb=size / 1e9, switch_interval=args.switch_interval, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
