"""Ceilings of the host side of a load, one GPU: where a byte can go from the page cache to the device.

Measures, on files whose pages are in the page cache:
- host memory copy bandwidth (torch, N threads) and pinned-buffer allocation speed;
- page-cache reads into pinned buffers, by threads and chunk size;
- the bounce pipeline the ``fast`` executor uses (read into a pinned buffer, one host-to-device
  copy per chunk, double-buffered, one stream per thread), by threads and chunk size;
- zero-copy: the file mapped read-only, its pages registered with CUDA
  (``cudaHostRegister`` with the read-only flag) and copied to the device straight from the
  page cache, whole-file and per chunk, with the registration cost on its own;
- pinned host-to-device copy alone.

Only torch is needed (no SGLang). Example (device)::

    python3 bench/host_path_bench.py --gb 8 --out $OUT/host_path.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

import torch

MiB = 1 << 20
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly
PROT_READ = 1
MAP_SHARED = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout[-4000:]
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"<{exc}>"


def system_info() -> Dict:
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "lscpu": _sh("lscpu | egrep 'Model name|Socket|NUMA|L3|L2|Thread|Core'"),
        "numa_nodes": _sh("ls /sys/devices/system/node | grep node"),
        "thp": _sh("cat /sys/kernel/mm/transparent_hugepage/enabled"),
        "cmdline": _sh("cat /proc/cmdline; ls /sys/class/iommu"),
        "meminfo": _sh("egrep 'MemTotal|MemFree|Cached|Hugepages' /proc/meminfo"),
        "topo": _sh("nvidia-smi topo -m"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def make_files(directory: str, total_bytes: int, files: int) -> List[str]:
    os.makedirs(directory, exist_ok=True)
    block = torch.randint(0, 256, (64 * MiB,), dtype=torch.uint8).numpy().tobytes()
    per = total_bytes // files // (64 * MiB) * (64 * MiB)
    paths = []
    for i in range(files):
        path = os.path.join(directory, f"part{i}.bin")
        if not (os.path.exists(path) and os.path.getsize(path) == per):
            with open(path, "wb") as f:
                for _ in range(per // len(block)):
                    f.write(block)
        paths.append(path)
    return paths


def chunk_list(paths: List[str], chunk: int):
    out = []
    for p in paths:
        size = os.path.getsize(p)
        for off in range(0, size, chunk):
            out.append((p, off, min(chunk, size - off)))
    return out


def timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memcpy_bandwidth(threads: int, nbytes: int) -> Dict:
    torch.set_num_threads(threads)
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    s = timed(lambda: dst.copy_(src), 3)
    return {"threads": threads, "bytes": nbytes, "seconds": s, "copy_gbps": nbytes / s / 1e9}


def pin_speed(nbytes: int) -> Dict:
    t0 = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    t_alloc = time.perf_counter() - t0
    plain = torch.ones(nbytes, dtype=torch.uint8)
    cudart = torch.cuda.cudart()
    t0 = time.perf_counter()
    err = cudart.cudaHostRegister(plain.data_ptr(), nbytes, 0)
    t_reg = time.perf_counter() - t0
    t0 = time.perf_counter()
    if int(err) == 0:
        cudart.cudaHostUnregister(plain.data_ptr())
    t_unreg = time.perf_counter() - t0
    del buf
    return {
        "bytes": nbytes,
        "pin_memory_alloc_s": t_alloc,
        "pin_memory_alloc_gbps": nbytes / t_alloc / 1e9,
        "register_touched_anonymous_s": t_reg,
        "register_error": int(err),
        "register_gbps": nbytes / t_reg / 1e9,
        "unregister_s": t_unreg,
    }


class Pool:
    """One pinned slab, sliced into per-thread buffers for every configuration."""

    def __init__(self, nbytes: int):
        t0 = time.perf_counter()
        self.slab = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        self.alloc_s = time.perf_counter() - t0

    def buffers(self, threads: int, nbuf: int, chunk: int):
        need = threads * nbuf * chunk
        assert need <= self.slab.numel(), (threads, nbuf, chunk)
        return [[self.slab.narrow(0, (t * nbuf + i) * chunk, chunk) for i in range(nbuf)] for t in range(threads)]


def _preadinto(fd: int, buf: torch.Tensor, off: int, n: int) -> None:
    view = memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")
    done = 0
    while done < n:
        got = os.preadv(fd, [view[done:]], off + done)
        if got <= 0:
            raise OSError("short read")
        done += got


def read_only(paths, threads: int, chunk: int, pool: Pool) -> Dict:
    chunks = chunk_list(paths, chunk)
    bufs = pool.buffers(threads, 1, chunk)
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    total = sum(c[2] for c in chunks)

    def run():
        def task(t):
            for p, off, n in chunks[t::threads]:
                _preadinto(fds[p], bufs[t][0], off, n)
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(task, range(threads)))

    s = timed(run)
    for fd in fds.values():
        os.close(fd)
    return {"threads": threads, "chunk_mib": chunk // MiB, "bytes": total, "seconds": s, "gbps": total / s / 1e9}


def bounce(paths, threads: int, chunk: int, nbuf: int, pool: Pool, device_dst: torch.Tensor, blocking: bool = False) -> Dict:
    chunks = chunk_list(paths, chunk)
    bufs = pool.buffers(threads, nbuf, chunk)
    streams = [torch.cuda.Stream() for _ in range(threads)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    bases = {}
    pos = 0
    for p in paths:
        bases[p] = pos
        pos += os.path.getsize(p)
    total = sum(c[2] for c in chunks)
    read_s = [0.0] * threads
    wait_s = [0.0] * threads

    def run():
        def task(t):
            events = [None] * nbuf
            for k, (p, off, n) in enumerate(chunks[t::threads]):
                i = k % nbuf
                t0 = time.perf_counter()
                if events[i] is not None:
                    events[i].synchronize()
                t1 = time.perf_counter()
                _preadinto(fds[p], bufs[t][i], off, n)
                t2 = time.perf_counter()
                wait_s[t] += t1 - t0
                read_s[t] += t2 - t1
                with torch.cuda.stream(streams[t]):
                    device_dst.narrow(0, bases[p] + off, n).copy_(bufs[t][i].narrow(0, 0, n), non_blocking=True)
                    ev = torch.cuda.Event(blocking=blocking)
                    ev.record(streams[t])
                events[i] = ev
            streams[t].synchronize()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(task, range(threads)))

    s = timed(run)
    for fd in fds.values():
        os.close(fd)
    return {
        "threads": threads, "chunk_mib": chunk // MiB, "buffers": nbuf, "bytes": total, "seconds": s,
        "gbps": total / s / 1e9,
        "read_s_per_thread_2runs": sum(read_s) / threads, "wait_s_per_thread_2runs": sum(wait_s) / threads,
    }


def _map(path: str):
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    addr = _libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
    os.close(fd)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return addr, size


def _host_tensor(addr: int, n: int) -> torch.Tensor:
    # Read-only memory: the tensor is only ever the source of a copy.
    return torch.frombuffer((ctypes.c_char * n).from_address(addr), dtype=torch.uint8)


def zero_copy_whole(paths, threads: int, chunk: int, device_dst: torch.Tensor, flags: int) -> Dict:
    cudart = torch.cuda.cudart()
    maps = [(_map(p), p) for p in paths]
    streams = [torch.cuda.Stream() for _ in range(threads)]
    out = {"threads": threads, "chunk_mib": chunk // MiB, "flags": flags}
    t0 = time.perf_counter()
    errs = [int(cudart.cudaHostRegister(addr, size, flags)) for (addr, size), _ in maps]
    out["register_s"] = time.perf_counter() - t0
    out["register_errors"] = errs
    total = sum(size for (addr, size), _ in maps)
    out["bytes"] = total
    out["register_gbps"] = total / out["register_s"] / 1e9
    if any(errs):
        for (addr, size), _ in maps:
            _libc.munmap(addr, size)
        return out
    work = []
    base = 0
    for (addr, size), _ in maps:
        for off in range(0, size, chunk):
            work.append((addr + off, base + off, min(chunk, size - off)))
        base += size

    def run():
        def task(t):
            with torch.cuda.stream(streams[t]):
                for a, d, n in work[t::threads]:
                    device_dst.narrow(0, d, n).copy_(_host_tensor(a, n), non_blocking=True)
            streams[t].synchronize()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(task, range(threads)))

    out["copy_s"] = timed(run)
    out["copy_gbps"] = total / out["copy_s"] / 1e9
    t0 = time.perf_counter()
    for (addr, size), _ in maps:
        cudart.cudaHostUnregister(addr)
    out["unregister_s"] = time.perf_counter() - t0
    for (addr, size), _ in maps:
        _libc.munmap(addr, size)
    out["end_to_end_gbps"] = total / (out["register_s"] + out["copy_s"] + out["unregister_s"]) / 1e9
    return out


def zero_copy_chunks(paths, threads: int, chunk: int, device_dst: torch.Tensor, flags: int) -> Dict:
    """Register, copy and unregister chunk by chunk (what an update would do per file range)."""
    cudart = torch.cuda.cudart()
    maps = [(_map(p), p) for p in paths]
    streams = [torch.cuda.Stream() for _ in range(threads)]
    work = []
    base = 0
    for (addr, size), _ in maps:
        for off in range(0, size, chunk):
            work.append((addr + off, base + off, min(chunk, size - off)))
        base += size
    total = sum(w[2] for w in work)
    reg_s = [0.0] * threads
    errors: List[int] = []
    lock = threading.Lock()

    def run():
        def task(t):
            pending = []
            for a, d, n in work[t::threads]:
                t0 = time.perf_counter()
                err = int(cudart.cudaHostRegister(a, n, flags))
                reg_s[t] += time.perf_counter() - t0
                if err:
                    with lock:
                        errors.append(err)
                    return
                with torch.cuda.stream(streams[t]):
                    device_dst.narrow(0, d, n).copy_(_host_tensor(a, n), non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record(streams[t])
                pending.append((ev, a))
                while len(pending) > 2:
                    ev0, a0 = pending.pop(0)
                    ev0.synchronize()
                    cudart.cudaHostUnregister(a0)
            for ev0, a0 in pending:
                ev0.synchronize()
                cudart.cudaHostUnregister(a0)
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(task, range(threads)))

    s = timed(run)
    for (addr, size), _ in maps:
        _libc.munmap(addr, size)
    return {
        "threads": threads, "chunk_mib": chunk // MiB, "flags": flags, "bytes": total, "seconds": s,
        "gbps": total / s / 1e9, "errors": sorted(set(errors)),
        "register_s_per_thread_2runs": sum(reg_s) / threads,
    }


MADV_HUGEPAGE = 14
MADV_POPULATE_READ = 22
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _pieces(maps, piece: int):
    out = []
    for addr, size in maps:
        for off in range(0, size, piece):
            out.append((addr + off, off, min(piece, size - off), addr))
    return out


def register_parallel(paths, threads: int, piece: int, populate: bool, device_dst: torch.Tensor, copy_streams: int = 4) -> Dict:
    """Map the files, (populate,) register ``piece``-sized ranges from ``threads`` threads at
    once, copy everything to the device, unregister in parallel: each phase timed alone; then
    the same with registration and copies overlapped (each thread registers a piece and
    queues its copy at once)."""
    cudart = torch.cuda.cudart()
    out = {"threads": threads, "piece_mib": piece // MiB, "populate": populate}
    maps = [_map(p) for p in paths]
    bases = {}
    pos = 0
    for addr, size in maps:
        bases[addr] = pos
        pos += size
    pieces = _pieces(maps, piece)
    total = sum(p[2] for p in pieces)
    out["bytes"] = total
    pool = ThreadPoolExecutor(threads)

    def each(fn):
        t0 = time.perf_counter()
        res = list(pool.map(lambda t: [fn(p) for p in pieces[t::threads]], range(threads)))
        return time.perf_counter() - t0, [x for r in res for x in r]

    if populate:
        out["populate_s"], errs = each(lambda p: _libc.madvise(p[0], p[2], MADV_POPULATE_READ))
        out["populate_errors"] = sorted(set(errs))
    out["register_s"], errs = each(lambda p: int(cudart.cudaHostRegister(p[0], p[2], CUDA_HOST_REGISTER_READ_ONLY)))
    out["register_errors"] = sorted(set(errs))
    out["register_gbps"] = total / out["register_s"] / 1e9
    if any(errs):
        pool.shutdown()
        return out
    streams = [torch.cuda.Stream() for _ in range(copy_streams)]
    t0 = time.perf_counter()
    for i, (a, off, n, base) in enumerate(pieces):
        with torch.cuda.stream(streams[i % copy_streams]):
            device_dst.narrow(0, bases[base] + off, n).copy_(_host_tensor(a, n), non_blocking=True)
    torch.cuda.synchronize()
    out["copy_s"] = time.perf_counter() - t0
    out["copy_gbps"] = total / out["copy_s"] / 1e9
    out["unregister_s"], _ = each(lambda p: cudart.cudaHostUnregister(p[0]))
    # Overlapped: register and queue the copy piece by piece, in every thread.
    tstreams = [torch.cuda.Stream() for _ in range(threads)]

    def reg_copy(t):
        with torch.cuda.stream(tstreams[t]):
            for a, off, n, base in pieces[t::threads]:
                cudart.cudaHostRegister(a, n, CUDA_HOST_REGISTER_READ_ONLY)
                device_dst.narrow(0, bases[base] + off, n).copy_(_host_tensor(a, n), non_blocking=True)
        tstreams[t].synchronize()

    t0 = time.perf_counter()
    list(pool.map(reg_copy, range(threads)))
    out["overlapped_s"] = time.perf_counter() - t0
    out["overlapped_gbps"] = total / out["overlapped_s"] / 1e9
    out["overlapped_unregister_s"], _ = each(lambda p: cudart.cudaHostUnregister(p[0]))
    pool.shutdown()
    for addr, size in maps:
        _libc.munmap(addr, size)
    return out


def pin_variants(nbytes: int, threads: int) -> Dict:
    """Ways to get pinned staging memory at start-up: pin_memory vs register of plain memory."""
    cudart = torch.cuda.cudart()
    out = {"bytes": nbytes, "threads": threads}
    for huge in (False, True):
        key = "huge" if huge else "small"
        t0 = time.perf_counter()
        raw = torch.empty(nbytes + (2 << 20), dtype=torch.uint8)
        start = (-raw.data_ptr()) % (2 << 20)
        buf = raw.narrow(0, start, nbytes)
        if huge:
            out[key + "_madvise_err"] = _libc.madvise(buf.data_ptr(), nbytes, MADV_HUGEPAGE)
        parts = buf.chunk(threads)
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda x: x.fill_(0), parts))
        out[key + "_touch_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        err = int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0))
        out[key + "_register_s"] = time.perf_counter() - t0
        out[key + "_register_err"] = err
        t0 = time.perf_counter()
        if not err:
            cudart.cudaHostUnregister(buf.data_ptr())
        out[key + "_unregister_s"] = time.perf_counter() - t0
        del raw, buf, parts
    return out


def _bounce_thread(chunks, fds, path_of, bufs, stream, device_dst: torch.Tensor, bases) -> None:
    """One bounce reader of the hybrid runs: read each ``(mapping, offset, n)`` chunk into one of
    its two pinned buffers, copy it to the device on its stream, double-buffered."""
    events = [None, None]
    for k, (base, off, n) in enumerate(chunks):
        i = k % 2
        if events[i] is not None:
            events[i].synchronize()
        _preadinto(fds[path_of[base]], bufs[i], off, n)
        with torch.cuda.stream(stream):
            device_dst.narrow(0, bases[base] + off, n).copy_(bufs[i].narrow(0, 0, n), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(stream)
        events[i] = ev
    stream.synchronize()


def hybrid(paths, threads: int, chunk: int, fraction: float, piece: int, zc_threads: int, pool: Pool, device_dst: torch.Tensor) -> Dict:
    """Part of the bytes (every piece whose running share is below ``fraction``) copied
    zero-copy from registered page cache by ``zc_threads`` threads, the rest by the bounce
    pipeline (``threads`` readers, 2 pinned buffers of ``chunk`` each), all at once."""
    cudart = torch.cuda.cudart()
    maps = [_map(p) for p in paths]
    bases, pos = {}, 0
    for addr, size in maps:
        bases[addr] = pos
        pos += size
    zc, rest = [], []
    taken = 0.0
    for i, pc in enumerate(_pieces(maps, piece)):
        if taken < fraction * (i + 1):
            zc.append(pc)
            taken += 1
        else:
            rest.append(pc)
    path_of = {addr: p for (addr, _), p in zip(maps, paths)}
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    chunks = []
    for a, off, n, base in rest:
        for o in range(0, n, chunk):
            chunks.append((base, off + o, min(chunk, n - o)))
    bufs = pool.buffers(threads, 2, chunk)
    streams = [torch.cuda.Stream() for _ in range(threads + zc_threads)]
    total = sum(p[2] for p in zc) + sum(c[2] for c in chunks)

    def bounce_task(t):
        _bounce_thread(chunks[t::threads], fds, path_of, bufs[t], streams[t], device_dst, bases)

    def zc_task(z):
        s = streams[threads + z]
        with torch.cuda.stream(s):
            for a, off, n, base in zc[z::zc_threads]:
                cudart.cudaHostRegister(a, n, CUDA_HOST_REGISTER_READ_ONLY)
                device_dst.narrow(0, bases[base] + off, n).copy_(_host_tensor(a, n), non_blocking=True)
        s.synchronize()

    with ThreadPoolExecutor(threads + zc_threads) as ex:
        t0 = time.perf_counter()
        futs = [ex.submit(zc_task, z) for z in range(zc_threads)] + [ex.submit(bounce_task, t) for t in range(threads)]
        for f in futs:
            f.result()
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        list(ex.map(lambda pc: cudart.cudaHostUnregister(pc[0]), zc))
        unreg = time.perf_counter() - t1
    for fd in fds.values():
        os.close(fd)
    for addr, size in maps:
        _libc.munmap(addr, size)
    return {"threads": threads, "chunk_mib": chunk // MiB, "fraction": fraction, "piece_mib": piece // MiB,
            "zc_threads": zc_threads, "bytes": total, "zc_bytes": sum(p[2] for p in zc), "seconds": wall,
            "gbps": total / wall / 1e9, "unregister_s": unreg, "with_unregister_gbps": total / (wall + unreg) / 1e9}


def bounce_switch(paths, threads: int, chunk: int, pool: Pool, device_dst: torch.Tensor, switch_s: float, blocking: bool) -> Dict:
    """The bounce pipeline with another interpreter switch interval and/or blocking events
    (is the per-chunk cost of small chunks the GIL hand-over or spinning event waits?)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    try:
        r = bounce(paths, threads, chunk, 2, pool, device_dst, blocking=blocking)
    finally:
        sys.setswitchinterval(old)
    r.update(switch_s=switch_s, blocking=blocking)
    return r


def registrar_ahead(paths, piece: int, copiers: int, device_dst: torch.Tensor, fraction: float = 1.0,
                    threads: int = 0, chunk: int = 64 * MiB, pool: "Pool" = None) -> Dict:
    """Zero-copy with registration on its own thread: one thread registers ``fraction`` of the
    pieces in order and hands each to ``copiers`` threads that only queue device copies; the
    rest goes through ``threads`` bounce readers at the same time. Tells whether registering
    and copying from one thread (what ``overlapped`` measures) is what costs."""
    import queue
    cudart = torch.cuda.cudart()
    maps = [_map(p) for p in paths]
    bases, pos = {}, 0
    for addr, size in maps:
        bases[addr] = pos
        pos += size
    path_of = {addr: p for (addr, _), p in zip(maps, paths)}
    zc, rest = [], []
    for i, pc in enumerate(_pieces(maps, piece)):
        (zc if len(zc) < fraction * (i + 1) else rest).append(pc)
    chunks = [(base, off + o, min(chunk, n - o)) for a, off, n, base in rest for o in range(0, n, chunk)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    bufs = pool.buffers(threads, 2, chunk) if threads else []
    streams = [torch.cuda.Stream() for _ in range(threads + copiers)]
    total = sum(p[2] for p in zc) + sum(c[2] for c in chunks)
    q: "queue.Queue" = queue.Queue()
    reg_s = [0.0]

    def registrar():
        t0 = time.perf_counter()
        for pc in zc:
            cudart.cudaHostRegister(pc[0], pc[2], CUDA_HOST_REGISTER_READ_ONLY)
            q.put(pc)
        reg_s[0] = time.perf_counter() - t0
        for _ in range(copiers):
            q.put(None)

    def copier(c):
        s = streams[threads + c]
        with torch.cuda.stream(s):
            while True:
                pc = q.get()
                if pc is None:
                    break
                a, off, n, base = pc
                device_dst.narrow(0, bases[base] + off, n).copy_(_host_tensor(a, n), non_blocking=True)
        s.synchronize()

    def bounce_task(t):
        _bounce_thread(chunks[t::threads], fds, path_of, bufs[t], streams[t], device_dst, bases)

    with ThreadPoolExecutor(1 + copiers + threads) as ex:
        t0 = time.perf_counter()
        futs = [ex.submit(registrar)] + [ex.submit(copier, c) for c in range(copiers)]
        futs += [ex.submit(bounce_task, t) for t in range(threads)]
        for f in futs:
            f.result()
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        for pc in zc:
            cudart.cudaHostUnregister(pc[0])
        unreg = time.perf_counter() - t1
    for fd in fds.values():
        os.close(fd)
    for addr, size in maps:
        _libc.munmap(addr, size)
    return {"piece_mib": piece // MiB, "copiers": copiers, "fraction": fraction, "threads": threads,
            "chunk_mib": chunk // MiB, "bytes": total, "zc_bytes": sum(p[2] for p in zc), "seconds": wall,
            "gbps": total / wall / 1e9, "register_s": reg_s[0],
            "register_gbps": sum(p[2] for p in zc) / max(reg_s[0], 1e-9) / 1e9, "unregister_s": unreg}


def file_folios(paths) -> Dict:
    """How the kernel maps the files' page cache once populated (PMD-mapped = large folios)."""
    out = {}
    for p in paths:
        addr, size = _map(p)
        t0 = time.perf_counter()
        err = _libc.madvise(addr, size, MADV_POPULATE_READ)
        dt = time.perf_counter() - t0
        lines = []
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    inside = int(line.split("-")[0], 16) == addr
                elif inside and line.split(":")[0] in ("Rss", "FilePmdMapped", "KernelPageSize", "MMUPageSize"):
                    lines.append(line.strip())
        _libc.munmap(addr, size)
        out[os.path.basename(p)] = {"populate_s": dt, "populate_err": err, "smaps": lines}
    return out


class RegisteredSlab:
    """Staging memory as the loader makes it (huge pages, touched, ``cudaHostRegister``), when
    sglang-fastload is installed; else ``pin_memory=True`` (torch's caching host allocator)."""

    def __init__(self, nbytes: int):
        t0 = time.perf_counter()
        try:
            from sglang_fastload.loader.host_memory import pinned_empty

            self.slab = pinned_empty(nbytes)
            self.kind = "registered" if torch.cuda.is_available() else "plain"
        except ImportError:
            self.slab, self.kind = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), "pin_memory"
        self.alloc_s = time.perf_counter() - t0

    def buffers(self, threads: int, nbuf: int, chunk: int):
        assert threads * nbuf * chunk <= self.slab.numel(), (threads, nbuf, chunk)
        return [[self.slab.narrow(0, (t * nbuf + i) * chunk, chunk) for i in range(nbuf)] for t in range(threads)]


def warm_page_cache(paths) -> None:
    """Read every file once (8 threads), so the measurements that follow start warm."""
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda p: open(p, "rb").read(), paths))


def lean_bounce(paths, threads: int, chunk: int, nbuf: int, slab: RegisteredSlab, device_dst: torch.Tensor,
                impl: str, blocking: bool = False) -> Dict:
    """The bounce pipeline with the least per-chunk work: events made once and reused, each
    thread's stream set once; ``impl`` "cudart" issues copies and events through the CUDA
    runtime directly (``sglang_fastload.loader.cuda_runtime``: the interpreter lock kept for
    both calls), "cudart-released" the same releasing it for each call, "torch" through torch.
    Small chunks keep every staging buffer in the CPU cache; is their per-chunk cost now low
    enough for that to pay?"""
    rt = None
    released = impl == "cudart-released"
    if impl.startswith("cudart"):
        from sglang_fastload.loader.cuda_runtime import runtime

        rt = runtime()
        if rt is None:
            return {"impl": impl, "error": "CUDA runtime library not found"}
    chunks = chunk_list(paths, chunk)
    bufs = slab.buffers(threads, nbuf, chunk)
    streams = [torch.cuda.Stream() for _ in range(threads)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    bases, pos = {}, 0
    for p in paths:
        bases[p] = pos
        pos += os.path.getsize(p)
    total = sum(c[2] for c in chunks)
    # Everything a chunk needs, made before the clock starts (as the loader's bound chunks).
    work = []
    for t in range(threads):
        mine = []
        for k, (p, off, n) in enumerate(chunks[t::threads]):
            i = k % nbuf
            view = memoryview((ctypes.c_char * n).from_address(bufs[t][i].data_ptr())).cast("B")
            mine.append((i, fds[p], view, off, device_dst.data_ptr() + bases[p] + off, bufs[t][i].data_ptr(), n,
                         device_dst.narrow(0, bases[p] + off, n), bufs[t][i].narrow(0, 0, n)))
        work.append(mine)
    if rt is not None:
        events = [[rt.new_event(blocking) for _ in range(nbuf)] for _ in range(threads)]
    else:
        events = [[torch.cuda.Event(blocking=blocking) for _ in range(nbuf)] for _ in range(threads)]

    def run():
        def task(t):
            stream = streams[t]
            handle = stream.cuda_stream
            evs = events[t]
            used = [False] * nbuf
            with torch.cuda.stream(stream):
                for i, fd, view, off, dst, src, n, dst_t, src_t in work[t]:
                    if used[i]:
                        rt.wait(evs[i]) if rt is not None else evs[i].synchronize()
                    done = 0
                    while done < n:
                        done += os.preadv(fd, [view[done:]], off + done)
                    if released:  # the same calls, the interpreter lock released for each
                        rt.lib.cudaMemcpyAsync(dst, src, n, 1, handle)
                        rt.lib.cudaEventRecord(evs[i], handle)
                    elif rt is not None:
                        rt.copy_to_device(dst, src, n, handle)
                        rt.record(evs[i], handle)
                    else:
                        dst_t.copy_(src_t, non_blocking=True)
                        evs[i].record(stream)
                    used[i] = True
            stream.synchronize()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(task, range(threads)))

    s = timed(run, repeats=3)
    for fd in fds.values():
        os.close(fd)
    return {"impl": impl, "threads": threads, "chunk_mib": chunk / MiB, "buffers": nbuf, "blocking": blocking,
            "slab": slab.kind, "bytes": total, "seconds": s, "gbps": total / s / 1e9}


def read_cycling(paths, threads: int, chunk: int, nbuf: int, slab: RegisteredSlab) -> Dict:
    """Page cache into ``nbuf`` staging buffers per thread, no device copy: the reads' own rate
    when the buffers they cycle through fit the CPU cache, or not."""
    chunks = chunk_list(paths, chunk)
    bufs = slab.buffers(threads, nbuf, chunk)
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    total = sum(c[2] for c in chunks)

    def run():
        def task(t):
            for k, (p, off, n) in enumerate(chunks[t::threads]):
                _preadinto(fds[p], bufs[t][k % nbuf], off, n)
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(task, range(threads)))

    s = timed(run, repeats=3)
    for fd in fds.values():
        os.close(fd)
    return {"threads": threads, "chunk_mib": chunk / MiB, "buffers": nbuf, "slab": slab.kind, "bytes": total,
            "seconds": s, "gbps": total / s / 1e9}


def h2d(nbytes: int, streams: int, pool: Pool, device_dst: torch.Tensor) -> Dict:
    src = pool.slab.narrow(0, 0, nbytes)
    ss = [torch.cuda.Stream() for _ in range(streams)]
    part = nbytes // streams

    def run():
        for _ in range(4):
            for i, s in enumerate(ss):
                with torch.cuda.stream(s):
                    device_dst.narrow(0, i * part, part).copy_(src.narrow(0, i * part, part), non_blocking=True)
        torch.cuda.synchronize()

    s = timed(run, 3)
    return {"bytes": 4 * part * streams, "streams": streams, "seconds": s, "gbps": 4 * part * streams / s / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp/sglang-fastload-hostpath")
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--files", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer configurations (dry runs)")
    ap.add_argument("--suite", default="all", choices=["all", "zero-copy", "hybrid", "lane", "small-chunks", "depth"], help="zero-copy: registration and pinning only; lane: registration on its own thread, GIL/event costs of small chunks; small-chunks: the leanest bounce loop (torch or CUDA runtime calls) by chunk size; depth: the same loop with 2, 3 or 4 buffers per reader")
    args = ap.parse_args()
    res: Dict = {"command": " ".join(os.sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "system": system_info()}

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    def log(key, value):
        res.setdefault(key, []).append(value)
        print(key, json.dumps(value), flush=True)
        save()

    t0 = time.perf_counter()
    paths = make_files(args.dir, int(args.gb * 1e9), args.files)
    res["files"] = {"paths": paths, "bytes": sum(os.path.getsize(p) for p in paths), "write_s": time.perf_counter() - t0}
    total = res["files"]["bytes"]
    cpu = os.cpu_count() or 8
    thread_set = [t for t in (4, 8, 16) if t <= max(4, cpu)]
    chunk_set = [1, 2, 4, 8, 16, 64] if not args.quick else [4, 64]
    if args.suite == "hybrid":
        warm_page_cache(paths)
        device_dst = torch.empty(total, dtype=torch.uint8, device="cuda")
        pool = Pool(16 * 2 * 64 * MiB)
        res["pool_alloc"] = {"bytes": pool.slab.numel(), "seconds": pool.alloc_s}
        for rep in range(2):
            for t, c, f, pc, z in ((16, 64, 0.0, 256, 1), (16, 64, 0.25, 256, 1), (16, 64, 0.4, 256, 1),
                                   (16, 64, 0.5, 256, 1), (16, 64, 0.4, 256, 2), (12, 64, 0.4, 256, 1),
                                   (8, 64, 0.4, 256, 1), (16, 16, 0.4, 256, 1), (16, 64, 0.4, 64, 2),
                                   (16, 64, 0.6, 256, 2)):
                try:
                    r = hybrid(paths, t, c * MiB, f, pc * MiB, z, pool, device_dst)
                    r["rep"] = rep
                    log("hybrid", r)
                except Exception as exc:  # noqa: BLE001
                    log("hybrid", {"args": [t, c, f, pc, z], "error": repr(exc)})
        res["wall_s"] = time.perf_counter() - t0
        save()
        return
    if args.suite == "small-chunks":
        warm_page_cache(paths)
        slab = RegisteredSlab(16 * 2 * 64 * MiB)
        res["slab"] = {"kind": slab.kind, "bytes": slab.slab.numel(), "seconds": slab.alloc_s}
        sizes = (2, 4, 8, 16, 64) if not args.quick else (4, 64)
        for c in sizes:
            log("read_cycling", read_cycling(paths, 16, c * MiB, 2, slab))
        if not torch.cuda.is_available():
            print("no CUDA: host-only measurements done")
            save()
            return
        device_dst = torch.empty(total, dtype=torch.uint8, device="cuda")
        log("h2d_pinned", h2d(1 << 30, 1, Pool(1 << 30), device_dst))
        for rep in range(2):
            for impl, t, c, nbuf, blocking in (
                [("cudart", 16, c, 2, False) for c in sizes] + [("cudart-released", 16, c, 2, False) for c in sizes]
                + [("torch", 16, c, 2, False) for c in (4, 8, 64)] + [("cudart", 8, c, 2, False) for c in (4, 8)]
                + [("cudart", 12, c, 2, False) for c in (4, 8)]
            ):
                try:
                    r = lean_bounce(paths, t, c * MiB, nbuf, slab, device_dst, impl, blocking)
                    r["rep"] = rep
                    log("lean_bounce", r)
                except Exception as exc:  # noqa: BLE001 - a failed variant is a result too
                    log("lean_bounce", {"args": [impl, t, c, nbuf, blocking], "error": repr(exc)})
        res["wall_s"] = time.perf_counter() - t0
        save()
        return
    if args.suite == "depth":
        warm_page_cache(paths)
        if not torch.cuda.is_available():
            print("no CUDA: the depth suite copies to a device")
            return
        slab = RegisteredSlab(16 * 4 * 8 * MiB)
        res["slab"] = {"kind": slab.kind, "bytes": slab.slab.numel(), "seconds": slab.alloc_s}
        device_dst = torch.empty(total, dtype=torch.uint8, device="cuda")
        log("h2d_pinned", h2d(1 << 30, 1, Pool(1 << 30), device_dst))
        for rep in range(2):
            for c in (4, 6, 8):
                for nbuf in (2, 3, 4):
                    r = lean_bounce(paths, 16, c * MiB, nbuf, slab, device_dst, "cudart")
                    r["rep"] = rep
                    log("lean_bounce", r)
        res["wall_s"] = time.perf_counter() - t0
        save()
        return
    if args.suite == "lane":
        warm_page_cache(paths)
        res["folios"] = file_folios(paths)
        device_dst = torch.empty(total, dtype=torch.uint8, device="cuda")
        pool = Pool(16 * 2 * 64 * MiB)
        for rep in range(2):
            for piece, copiers, frac, t in ((256, 1, 1.0, 0), (64, 1, 1.0, 0), (256, 2, 1.0, 0), (256, 1, 0.5, 16),
                                            (256, 1, 0.6, 16), (256, 1, 0.7, 16), (64, 1, 0.6, 16), (256, 1, 0.6, 12)):
                try:
                    r = registrar_ahead(paths, piece * MiB, copiers, device_dst, frac, t, 64 * MiB, pool)
                    r["rep"] = rep
                    log("registrar_ahead", r)
                except Exception as exc:  # noqa: BLE001 - a failed variant is a result too
                    log("registrar_ahead", {"args": [piece, copiers, frac, t], "error": repr(exc)})
        for c in (4, 8, 16, 64):
            for switch_s, blocking in ((0.005, False), (0.0002, False), (0.005, True)):
                log("bounce_switch", bounce_switch(paths, 16, c * MiB, pool, device_dst, switch_s, blocking))
        res["wall_s"] = time.perf_counter() - t0
        save()
        return
    if args.suite == "zero-copy":
        warm_page_cache(paths)
        device_dst = torch.empty(total, dtype=torch.uint8, device="cuda")
        for t, piece, pop in ((1, 256, False), (4, 256, False), (8, 256, False), (16, 256, False),
                              (16, 64, False), (8, 1024, False), (8, 256, True), (16, 64, True)):
            try:
                log("register_parallel", register_parallel(paths, t, piece * MiB, pop, device_dst))
            except Exception as exc:  # noqa: BLE001
                log("register_parallel", {"threads": t, "piece_mib": piece, "error": repr(exc)})
        for t in (1, 8):
            log("pin_variants", pin_variants(2 << 30, t))
        res["wall_s"] = time.perf_counter() - t0
        save()
        return
    for t in sorted({min(cpu, 16), 8}):
        log("memcpy", memcpy_bandwidth(t, 2 << 30))
    torch.set_num_threads(cpu)
    pool = Pool(max(thread_set) * 3 * 64 * MiB)
    res["pool_alloc"] = {"bytes": pool.slab.numel(), "seconds": pool.alloc_s, "gbps": pool.slab.numel() / pool.alloc_s / 1e9}
    read_only(paths, max(thread_set), 64 * MiB, pool)  # warm the page cache
    for t in thread_set:
        for c in chunk_set:
            log("read_pinned", read_only(paths, t, c * MiB, pool))
    if not torch.cuda.is_available():
        print("no CUDA: host-only measurements done")
        return
    log("pin", pin_speed(1 << 30))
    device_dst = torch.empty(total, dtype=torch.uint8, device="cuda")
    for streams in (1, 4):
        log("h2d_pinned", h2d(1 << 30, streams, pool, device_dst))
    for t in thread_set:
        for c in chunk_set:
            log("bounce", bounce(paths, t, c * MiB, 2, pool, device_dst))
    for t, c in ((8, 4), (16, 4), (16, 8), (8, 16)):
        if t in thread_set and c in chunk_set:
            log("bounce", bounce(paths, t, c * MiB, 3, pool, device_dst))
    def attempt(key, fn, *a):
        try:
            log(key, fn(*a))
        except Exception as exc:  # noqa: BLE001 - a failed variant is a result too
            log(key, {"args": [x for x in a if isinstance(x, (int, float))], "error": repr(exc)})

    attempt("zero_copy_whole", zero_copy_whole, paths, 4, 64 * MiB, device_dst, CUDA_HOST_REGISTER_READ_ONLY)
    attempt("zero_copy_whole", zero_copy_whole, paths, 16, 16 * MiB, device_dst, CUDA_HOST_REGISTER_READ_ONLY)
    for t in (4, 8, 16):
        for c in (16, 64, 256):
            attempt("zero_copy_chunks", zero_copy_chunks, paths, t, c * MiB, device_dst, CUDA_HOST_REGISTER_READ_ONLY)
    # Last: without the read-only flag registration of a read-only mapping is expected to fail.
    attempt("zero_copy_whole", zero_copy_whole, paths, 4, 64 * MiB, device_dst, 0)
    res["wall_s"] = time.perf_counter() - t0
    save()


if __name__ == "__main__":
    main()
