"""Row-parallel shard gathers on one host: what each way of taking 1/N of every row costs.

A row-parallel weight (an MoE ``down_proj``: 2048 rows of 768 bf16 = 1,536 bytes) is split
by columns: TP rank r keeps bytes ``[r * 1536 / N, (r + 1) * 1536 / N)`` of every row. The
``fast`` loader gathers those runs from a read-only mapping of the file. This bench measures,
on page-cached files, with ``N`` processes of ``T`` threads each (as ``N`` ranks of one node):

- ``gather``: every process maps each file (once per pass, as a load does), and its threads
  copy their rank's runs of every row into a reused buffer (torch strided copy, one thread
  per copy, as in a server where ``torch.set_num_threads(1)``);
- ``populate``: as ``gather``, but each tensor's span is populated into the mapping first
  (``madvise(MADV_POPULATE_READ)``: one system call maps its pages instead of a fault per
  group of pages);
- ``permap``: as ``gather``, but every thread maps the files itself (its own mappings:
  threads of one process then fault pages into different mappings, not all into one);
- ``skipread``: no mapping: ``preadv`` of each tensor's rows whole, the kept run of every row
  into the buffer and the rest into one small scratch (every byte of the span crosses memory,
  no page is mapped);
- ``contiguous``: every process reads a disjoint 1/N of the same bytes with ``preadv`` into
  reused buffers (the node reads the files once; what a cooperative split would read);
- ``dma2d`` (CUDA): the device pulls every row's run out of a pinned buffer with
  ``cudaMemcpy2DAsync`` (width 1536 / N, pitch 1536), against one contiguous copy of the
  same bytes: could a rank copy its shard out of a buffer another rank filled?

Only torch is needed (sglang-fastload for the CUDA runtime binding). Example (device)::

    python3 bench/gather_bench.py --gb 8 --out $OUT/gather.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import multiprocessing as mp
import os
import sys
import threading
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

from host_path_bench import _preadinto, make_files, system_info, warm_page_cache  # noqa: E402

MiB = 1 << 20
ROW_BYTES = 1536  # one down_proj row of Qwen3-30B-A3B: 768 bf16
TENSOR_ROWS = 2048  # its hidden size
BUFFER_BYTES = 6 * MiB  # as the loader's staging buffers


def _tensors(paths: List[str]):
    """Every (file, offset) of a 3 MiB row-major "tensor" in the files."""
    span = ROW_BYTES * TENSOR_ROWS
    return [(p, off) for p in paths for off in range(0, os.path.getsize(p) - span + 1, span)]


def _on_threads(threads: int, task) -> None:
    """``task(t)`` for every ``t`` below ``threads``, each on a thread of its own, all at once."""
    pool = [threading.Thread(target=task, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()


MADV_POPULATE_READ = 22  # Linux >= 5.14; not every Python names it
IOV_MAX = 1024


def _pmd_mapped_kib(mapping: mmap.mmap) -> int:
    """How much of ``mapping`` the kernel maps with 2 MiB entries (``FilePmdMapped`` in
    /proc/self/smaps): large page-cache folios mapped whole cost one fault, not 512."""
    start = f"{ctypes.addressof(ctypes.c_char.from_buffer(mapping)):x}-"
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                inside = line.startswith(start)
            elif inside and line.startswith("FilePmdMapped:"):
                return int(line.split()[1])
    return 0


def _map_files(paths):
    maps = {p: mmap.mmap(os.open(p, os.O_RDONLY), 0, access=mmap.ACCESS_COPY) for p in paths}
    return maps, {p: torch.frombuffer(m, dtype=torch.bfloat16) for p, m in maps.items()}


def _unmap(maps, typed) -> None:
    typed.clear()
    for m in maps.values():
        m.close()


def _gather_pass(paths, rank: int, ranks: int, threads: int, populate: bool = False, per_thread: bool = False) -> int:
    """One rank's gather of its runs from every tensor; returns the bytes it kept."""
    width = ROW_BYTES // ranks // 2  # elements (bf16)
    shared = None if per_thread else _map_files(paths)
    work = _tensors(paths)
    kept = [0] * threads

    def task(t: int) -> None:
        maps, typed = shared or _map_files(paths)
        buf = torch.empty(BUFFER_BYTES // 2, dtype=torch.bfloat16)
        pos, src = 0, None
        for p, off in work[t::threads]:
            n = TENSOR_ROWS * width
            if pos + n > buf.numel():
                pos = 0
            if populate:
                maps[p].madvise(MADV_POPULATE_READ, off - off % mmap.PAGESIZE, ROW_BYTES * TENSOR_ROWS + off % mmap.PAGESIZE)
            src = typed[p].as_strided((TENSOR_ROWS, width), (ROW_BYTES // 2, 1), off // 2 + rank * width)
            buf.narrow(0, pos, n).view(TENSOR_ROWS, width).copy_(src)
            pos += n
            kept[t] += 2 * n
        if shared is None:
            del src
            _unmap(maps, typed)

    _on_threads(threads, task)
    if shared is not None:
        if rank == 0:  # once per pass: did the kernel map the files' folios whole?
            print(json.dumps({"gather_pmd_mapped_kib": sum(_pmd_mapped_kib(m) for m in shared[0].values()),
                              "file_kib": sum(len(m) for m in shared[0].values()) >> 10}), flush=True)
        _unmap(*shared)
    return sum(kept)


def _skipread_pass(paths, rank: int, ranks: int, threads: int) -> int:
    """One rank's ``preadv`` of every tensor's rows, its runs into the buffer and the rest of
    each row into a scratch row; returns the bytes it kept."""
    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    libc.preadv.restype = ctypes.c_ssize_t
    width = ROW_BYTES // ranks  # bytes
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    work = _tensors(paths)
    kept = [0] * threads
    rows_per_call = IOV_MAX // 2

    def task(t: int) -> None:
        buf = torch.empty(BUFFER_BYTES, dtype=torch.uint8)
        junk = torch.empty(ROW_BYTES, dtype=torch.uint8)
        iov = np.empty((rows_per_call, 2, 2), dtype=np.uint64)  # (row, kept/skipped, base/len)
        iov[:, 0, 1] = width
        iov[:, 1, 0] = junk.data_ptr()
        iov[:, 1, 1] = ROW_BYTES - width
        steps = np.arange(rows_per_call, dtype=np.uint64) * np.uint64(width)
        pos = 0
        for p, off in work[t::threads]:
            n = TENSOR_ROWS * width
            if pos + n > BUFFER_BYTES:
                pos = 0
            for r0 in range(0, TENSOR_ROWS, rows_per_call):
                h = min(rows_per_call, TENSOR_ROWS - r0)
                iov[:h, 0, 0] = steps[:h] + np.uint64(buf.data_ptr() + pos + r0 * width)
                count = 2 * h - 1  # the last row's tail is not read
                want = h * ROW_BYTES - (ROW_BYTES - width)
                got = libc.preadv(fds[p], iov.ctypes.data, count, off + r0 * ROW_BYTES + rank * width)
                assert got == want, (got, want, ctypes.get_errno())
            pos += n
            kept[t] += n

    _on_threads(threads, task)
    for fd in fds.values():
        os.close(fd)
    return sum(kept)


def _contiguous_pass(paths, rank: int, ranks: int, threads: int) -> int:
    """One rank's ``preadv`` of a disjoint 1/N of every file; returns the bytes it read."""
    pieces = []
    for p in paths:
        size = os.path.getsize(p)
        share = -(-size // ranks)
        lo, hi = rank * share, min(size, (rank + 1) * share)
        pieces += [(p, off, min(BUFFER_BYTES, hi - off)) for off in range(lo, hi, BUFFER_BYTES)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    done = [0] * threads

    def task(t: int) -> None:
        bufs = [torch.empty(BUFFER_BYTES, dtype=torch.uint8) for _ in range(2)]
        for k, (p, off, n) in enumerate(pieces[t::threads]):
            _preadinto(fds[p], bufs[k % 2], off, n)
            done[t] += n

    _on_threads(threads, task)
    for fd in fds.values():
        os.close(fd)
    return sum(done)


def _rank_process(kind, paths, rank, ranks, threads, repeats, barrier, results) -> None:
    torch.set_num_threads(1)  # as SGLang's ModelRunner.load_model off CPU
    fn = {"gather": _gather_pass, "populate": lambda *a: _gather_pass(*a, populate=True),
          "permap": lambda *a: _gather_pass(*a, per_thread=True),
          "skipread": _skipread_pass, "contiguous": _contiguous_pass}[kind]
    for rep in range(repeats):
        barrier.wait()
        t0 = time.perf_counter()
        nbytes = fn(paths, rank, ranks, threads)
        results.put((rep, rank, time.perf_counter() - t0, nbytes))


def node_pass(kind: str, paths, ranks: int, threads: int, repeats: int = 3) -> Dict:
    """``ranks`` processes of ``threads`` threads, each doing its rank's ``kind`` pass at once.

    Returns:
        The best repeat's slowest rank: seconds, bytes kept by the node, and GB/s of the files.
    """
    ctx = mp.get_context("fork")  # before any CUDA use in this process
    barrier, results = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=_rank_process, args=(kind, paths, r, ranks, threads, repeats, barrier, results))
             for r in range(ranks)]
    for p in procs:
        p.start()
    got = [results.get() for _ in range(ranks * repeats)]
    for p in procs:
        p.join()
    span = sum(os.path.getsize(p) for p in paths)
    best = min(max(s for rep_, _, s, _ in got if rep_ == rep) for rep in range(repeats))
    kept = sum(n for rep_, _, _, n in got if rep_ == 0)
    return {"kind": kind, "ranks": ranks, "threads": threads, "seconds": round(best, 4), "bytes_kept": kept,
            "file_bytes": span, "gbps_of_files": round(span / best / 1e9, 2), "gbps_kept": round(kept / best / 1e9, 2)}


def dma2d(nbytes: int) -> List[Dict]:
    """Pinned buffer to device: every row's 1536 / N bytes by ``cudaMemcpy2DAsync``, against one
    contiguous copy of as many bytes; rates of the bytes that reach the device."""
    from sglang_fastload.loader.cuda_runtime import runtime

    torch.zeros(1, device="cuda")
    rt = runtime()
    lib = rt.lib
    size_t, void_p = ctypes.c_size_t, ctypes.c_void_p
    lib.cudaMemcpy2DAsync.argtypes = [void_p, size_t, void_p, size_t, size_t, size_t, ctypes.c_int, void_p]
    lib.cudaMemcpy2DAsync.restype = ctypes.c_int
    rows = nbytes // ROW_BYTES
    src = torch.empty(rows * ROW_BYTES, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(rows * ROW_BYTES, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    out = []
    block = 4096  # rows per call (a 6 MiB span)
    for ranks in (1, 2, 4, 8):
        width = ROW_BYTES // ranks
        for how in ("2d", "contiguous"):
            def run():
                for r0 in range(0, rows, block):
                    h = min(block, rows - r0)
                    s = src.data_ptr() + r0 * ROW_BYTES
                    d = dst.data_ptr() + r0 * width
                    if how == "2d":
                        code = lib.cudaMemcpy2DAsync(d, width, s, ROW_BYTES, width, h, 1, stream.cuda_stream)
                    else:
                        code = lib.cudaMemcpyAsync(d, src.data_ptr() + r0 * width, width * h, 1, stream.cuda_stream)
                    assert code == 0, code
                stream.synchronize()
            run()
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - t0)
            out.append({"how": how, "ranks": ranks, "width": width, "bytes": rows * width, "seconds": round(best, 4),
                        "gbps": round(rows * width / best / 1e9, 2)})
            print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp/sglang-fastload-gather")
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--configs", default="1x16,2x8,2x4,4x4,4x2,8x2,8x4",
                    help="RANKSxTHREADS, comma-separated")
    ap.add_argument("--kinds", default="contiguous,gather,permap,populate,skipread", help="passes, comma-separated")
    ap.add_argument("--no-dma2d", action="store_true", help="skip the device's 2D copies")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    paths = make_files(args.dir, int(args.gb * 1e9), args.files)
    warm_page_cache(paths)
    res: Dict = {"command": " ".join(["python3"] + sys.argv), "node": []}
    for cfg in args.configs.split(","):
        ranks, threads = (int(x) for x in cfg.split("x"))
        for kind in args.kinds.split(","):
            row = node_pass(kind, paths, ranks, threads)
            res["node"].append(row)
            print(json.dumps(row), flush=True)
    res["system"] = system_info()  # initialises CUDA: after the forks
    if torch.cuda.is_available() and not args.no_dma2d:
        res["dma2d"] = dma2d(1 << 30)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
