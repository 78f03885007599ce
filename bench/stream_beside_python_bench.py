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

The loop (``--loops``) is pure-Python dictionary work (``dict``) or, as in a replay, views
and copies of meta tensors under a recording dispatch mode (``torch``: every operator
releases and retakes the interpreter lock, as the replay's do); its slowdown factor is
(time beside the stream) / (time alone), the loop alone timed right before each pair
(``--repeats`` pairs, medians).
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
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from host_path_bench import make_files  # noqa: E402
from sglang_fastload.loader import cuda_runtime  # noqa: E402
from sglang_fastload.loader.staging import read_exact, reserve, workers_for  # noqa: E402

MIB = 1 << 20


def python_loop(n: int) -> float:
    """Interpreter-bound work (dictionary updates and attribute-free arithmetic)."""
    t0 = time.perf_counter()
    d = {}
    for i in range(n):
        d[i & 1023] = d.get((i * 7) & 1023, 0) + i
    return time.perf_counter() - t0


class _CountingMode(TorchDispatchMode):
    """Runs every operator, counting copies (the replay's recorder, without its bookkeeping)."""

    copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.copies += 1
            return args[0]
        return func(*args, **(kwargs or {}))


def torch_loop(n: int) -> float:
    """Replay-like work: ``n`` narrow + copy pairs of meta tensors under a dispatch mode."""
    src = torch.empty(64, 256, device="meta")
    dst = torch.empty(128, 256, device="meta")
    t0 = time.perf_counter()
    with _CountingMode():
        for i in range(n):
            dst.narrow(0, i & 63, 64).copy_(src)
    return time.perf_counter() - t0


LOOPS = {"dict": (python_loop, 1_500_000), "torch": (torch_loop, 10_000)}


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
    """The loader's own readers (``staging.Worker``: two pinned buffers each, their events, a
    stream; kept between calls), queueing copies through the CUDA runtime."""
    rt = cuda_runtime.runtime()
    fd = os.open(path, os.O_RDONLY)
    take = _taker(size, piece)
    workers = workers_for(dst.device, threads, piece)
    reserve(workers, [(piece, 0)] * threads)

    def reader(k: int) -> None:
        worker = workers[k]
        worker.runtime = rt
        turn = 0
        with torch.cuda.stream(worker.stream):
            for off, n in iter(take, None):
                worker.wait(turn)
                read_exact(fd, worker.buffer_bytes(turn)[:n], off, path)
                rt.copy_to_device(dst.data_ptr() + off, worker.buffers[turn].data_ptr(), n, worker.stream_handle)
                worker.mark_in_use(turn)
                turn ^= 1
        worker.finish()

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
    p.add_argument("--dir", default="/var/tmp/stream-beside-python", help="where the file is written (once)")
    p.add_argument("--loops", default="dict", help="comma-separated of " + ",".join(LOOPS))
    p.add_argument("--loop-scale", type=float, default=1.0, help="times each loop's default iterations")
    p.add_argument("--ways", default="pinned:16x6,pinned:4x6,pinned:2x6,pageable:4x64,pageable:8x64,pageable:2x256,pageable:4x256")
    p.add_argument("--switch-interval", type=float, default=0.0005)
    p.add_argument("--repeats", type=int, default=3, help="pairs (loop alone, then beside the stream) per way; medians")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "stream-beside-python.json"))
    args = p.parse_args(argv)
    (path,) = make_files(args.dir, int(args.gb * 1e9), 1)
    size = os.path.getsize(path)
    with open(path, "rb") as f:  # warm the page cache (a piece at a time: the file may be large)
        while f.read(256 * MIB):
            pass
    torch.cuda.init()
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    sys.setswitchinterval(args.switch_interval)
    rows = []
    for loop_kind, way in itertools.product(args.loops.split(","), args.ways.split(",")):
        loop, iterations = LOOPS[loop_kind]
        iterations = int(iterations * args.loop_scale)
        kind, shape = way.split(":")
        threads, piece = (int(x) for x in shape.split("x"))
        run = stream_pinned if kind == "pinned" else stream_pageable
        run(path, size, dst, threads, piece * MIB)  # warm-up (buffers, mappings)
        samples = []
        for _ in range(args.repeats):
            # The loop alone right before each pair (the CPU's clock moves between ways).
            alone = statistics.median(loop(iterations) for _ in range(3))
            t0 = time.perf_counter()
            run(path, size, dst, threads, piece * MIB)
            torch.cuda.synchronize()
            stream_alone = time.perf_counter() - t0
            done = {}
            th = threading.Thread(target=lambda: done.update(loop=loop(iterations)))
            t0 = time.perf_counter()
            th.start()
            run(path, size, dst, threads, piece * MIB)
            torch.cuda.synchronize()
            stream_beside = time.perf_counter() - t0
            th.join()
            samples.append((alone, done["loop"], stream_alone, stream_beside))
        alone, beside, s_alone, s_beside = (statistics.median(x[i] for x in samples) for i in range(4))
        row = dict(loop=loop_kind, way=way, repeats=args.repeats, stream_alone_gbps=round(size / s_alone / 1e9, 2),
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
