"""Load and update SGLang's real Qwen3 / Qwen3-MoE classes with each load format, on one GPU.

    python bench/gpu_bench.py                                # the default run (H200)
    python bench/gpu_bench.py --device cpu --tiny            # dry run on a CPU machine
    python bench/gpu_bench.py --models moe --contenders fast,auto --cache warm

What one run does, for each model (``--models dense,moe``):

1. writes a synthetic bf16 checkpoint shaped like the real release (Qwen3-8B in full;
   Qwen3-30B-A3B with as many of its 48 layers as disk, ``--moe-max-gb`` and GPU memory
   allow, or ``--moe-layers N``), sharded like Hugging Face (``--shard-gb``);
2. measures the ceilings on those files in the same run: page-cache reads with 1/8/16
   threads (``os.preadv`` into reused 64 MiB buffers), a cold disk read with 8 threads
   after dropping the caches, and (once, on CUDA) a 4 GiB pinned host→device copy;
3. for each contender (``--contenders``; ``auto`` = upstream's threaded default, ``auto1``
   = upstream single-threaded, ``instanttensor`` / ``fastsafetensors`` when their
   packages import, ``fast`` = this project): builds the model through SGLang's own
   ``get_model_loader(...).load_model`` (TP=1, a one-rank NCCL/gloo world, as a scheduler
   process does), then updates it through SGLang's real
   ``WeightUpdater.update_weights_from_disk`` — first and second update warm, then the
   phases in ``--cold-phases`` again after dropping the page cache;
4. checks that every parameter each contender produced is bit-identical to upstream
   ``auto``'s, on the device (``torch.equal`` on integer views, or per-parameter
   checksums computed on the device when two copies do not fit). Before a contender's
   last update its parameters are poisoned, so the check also proves that update wrote
   every element.

Writes ``--out`` (JSON, default ``$OUT/gpu_bench.json``) and a Markdown table beside it
(``gpu_bench.md``), both refreshed after every measurement, so a run stopped by a time
limit still leaves what it measured. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import dataclasses
import datetime
import gc
import json
import math
import os
import pstats
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

T0 = time.perf_counter()
GB = 1e9
GIB = 1 << 30
MIB = 1 << 20


# --------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------
def log(msg: str) -> None:
    now = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{time.perf_counter() - T0:7.1f}s {now}] {msg}", flush=True)


def elapsed() -> float:
    return time.perf_counter() - T0


# --------------------------------------------------------------------------------------
# contenders
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    load_format: str
    extra: Optional[dict] = None
    requires: Optional[str] = None  # a module that must import
    upstream_scan: bool = True  # MoE expert mapping scanned as sglang 0.5.23 does
    description: str = ""
    env: Optional[dict] = None  # environment variables set while this contender runs
    collector_running: bool = False  # fast loads leave Python's cyclic collector running (as before 2026-12-02)
    stream_copies_after_reads: bool = False  # a start-up stream's copies wait for all its reads (as before 2026-12-04)
    key_first: bool = False  # the store's whole key before building, a built plan's chunks grouped again (as before 2026-12-04, late)
    buffers_ready: bool = False  # the readers' pinned buffers made before the start, not beside the model's build


CONTENDERS: Dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("auto", "auto", description="upstream auto (threaded default, 8 threads)"),
        Contender("auto1", "auto", {"enable_multithread_load": False}, description="upstream auto, single-threaded"),
        Contender(
            "auto-idx",
            "auto",
            upstream_scan=False,
            description="auto as served with this package installed (expert-mapping index on)",
        ),
        Contender("instanttensor", "instanttensor", requires="instanttensor", description="SGLang's instanttensor format"),
        Contender(
            "instanttensor-buffered", "instanttensor", {"backend": "BUFFERED"}, requires="instanttensor",
            description="instanttensor, buffered page-cache backend",
        ),
        Contender(
            "instanttensor-mmap", "instanttensor", {"backend": "MMAP"}, requires="instanttensor",
            description="instanttensor, MMAP backend (keeps files mapped: its cold rows are not cold)",
        ),
        Contender(
            "fastsafetensors", "fastsafetensors", requires="fastsafetensors", description="SGLang's fastsafetensors format"
        ),
        Contender("fast", "fast", upstream_scan=False, description="sglang-fastload (default: 8-16 threads by CPU count, 6 MiB buffers, no zero-copy lane)"),
        Contender("fast1", "fast", {"num_threads": 1}, upstream_scan=False, description="sglang-fastload, 1 thread"),
        Contender("fast16", "fast", {"num_threads": 16}, upstream_scan=False, description="sglang-fastload, 16 threads"),
        Contender("fast8", "fast", {"num_threads": 8}, upstream_scan=False, description="sglang-fastload, 8 threads"),
        Contender("fast4", "fast", {"num_threads": 4}, upstream_scan=False, description="sglang-fastload, 4 threads"),
        Contender("fast2", "fast", {"num_threads": 2}, upstream_scan=False, description="sglang-fastload, 2 threads"),
        Contender("fast-zc0", "fast", {"zero_copy_share": 0}, upstream_scan=False, description="sglang-fastload, staging buffers only (no zero-copy lane)"),
        Contender("fast-zc35", "fast", {"zero_copy_share": 0.35}, upstream_scan=False, description="sglang-fastload, 35 % of bytes zero-copy"),
        Contender("fast-zc50", "fast", {"zero_copy_share": 0.5}, upstream_scan=False, description="sglang-fastload, 50 % of bytes zero-copy"),
        Contender("fast-zc65", "fast", {"zero_copy_share": 0.65}, upstream_scan=False, description="sglang-fastload, 65 % of bytes zero-copy"),
        Contender("fast-seg64k", "fast", {"min_segment_bytes": 64 << 10}, upstream_scan=False, description="sglang-fastload, strided runs under 64 KiB gathered"),
        Contender("fast-seg1m", "fast", {"min_segment_bytes": 1 << 20}, upstream_scan=False, description="sglang-fastload, strided runs under 1 MiB gathered"),
        Contender("fast-c4", "fast", {"chunk_mb": 4}, upstream_scan=False, description="sglang-fastload, 4 MiB buffers"),
        Contender("fast-c8", "fast", {"chunk_mb": 8}, upstream_scan=False, description="sglang-fastload, 8 MiB buffers"),
        Contender("fast-c6", "fast", {"chunk_mb": 6}, upstream_scan=False, description="sglang-fastload, 6 MiB buffers"),
        Contender("fast-c32", "fast", {"chunk_mb": 32}, upstream_scan=False, description="sglang-fastload, 32 MiB buffers"),
        Contender("fast-c16", "fast", {"chunk_mb": 16}, upstream_scan=False, description="sglang-fastload, 16 MiB buffers"),
        Contender("fast-c2", "fast", {"chunk_mb": 2}, upstream_scan=False, description="sglang-fastload, 2 MiB buffers"),
        Contender("fast-c64", "fast", {"chunk_mb": 64}, upstream_scan=False, description="sglang-fastload, 64 MiB buffers (the default before 2026-12-02)"),
        Contender(
            "fast-share", "fast", upstream_scan=False, env={"SGLANG_FASTLOAD_SHARED_SPANS": "1"},
            description="sglang-fastload, the tensor-parallel ranks of a node share the spans holding row shards",
        ),
        Contender(
            "fast-nosteal", "fast", upstream_scan=False, env={"SGLANG_FASTLOAD_STEAL_CHUNKS": "0"},
            description="sglang-fastload, every reader keeps to the chunks dealt to it (as before 2026-12-02)",
        ),
        Contender(
            "fast-roundrobin", "fast", upstream_scan=False, env={"SGLANG_FASTLOAD_DEAL_CHUNKS": "round-robin"},
            description="sglang-fastload, chunks dealt round-robin to the readers (as before 2026-12-03), not in contiguous runs",
        ),
        Contender(
            "fast-gc", "fast", upstream_scan=False, collector_running=True,
            description="sglang-fastload, Python's cyclic garbage collector left running during loads",
        ),
        Contender(
            "fast-nostream", "fast", {"startup_stream": "off"}, upstream_scan=False,
            description="sglang-fastload, a first start reads only after its plan is built (no start-up stream)",
        ),
        Contender(
            "fast-stream5ms", "fast", upstream_scan=False, env={"SGLANG_FASTLOAD_STARTUP_SWITCH_INTERVAL": "0"},
            description="sglang-fastload, start-up stream with the interpreter's own 5 ms switch interval",
        ),
        *(
            Contender(f"fast-stream{label}", "fast", upstream_scan=False, env={f"SGLANG_FASTLOAD_STARTUP_STREAM_{key}": value},
                      description=f"sglang-fastload, start-up stream with {what}")
            for label, key, value, what in (
                ("16", "READERS", "16", "16 readers while the plan is built (not half the CPUs)"),
                ("4", "READERS", "4/16", "4 readers while the plan is built, 16 after"),
                ("12", "READERS", "12/16", "12 readers while the plan is built, 16 after"),
                ("8x6", "READ_MB", "6", "the loader's 6 MiB chunks read while the plan is built"),
            )
        ),
        Contender(
            "fast-streamon", "fast", {"startup_stream": "on"}, upstream_scan=False,
            description="sglang-fastload, start-up stream for any checkpoint (few tensors too)",
        ),
        Contender(
            "fast-stream-copyafter", "fast", upstream_scan=False, stream_copies_after_reads=True,
            description="sglang-fastload, start-up stream whose copies out of the scratch wait for all of its reads",
        ),
        Contender(
            "fast-keyfirst", "fast", upstream_scan=False, key_first=True,
            description="sglang-fastload, a first start takes the plan store's whole key (source digests) before building "
                        "and groups its built plan's steps into chunks again when binding",
        ),
        Contender(
            "fast-buffersready", "fast", upstream_scan=False, buffers_ready=True,
            description="sglang-fastload, the readers' pinned buffers made and waited for before the start "
                        "(a process's first start otherwise makes them beside the model's build)",
        ),
        Contender(
            "fast-torchcopy", "fast", upstream_scan=False, env={"SGLANG_FASTLOAD_DIRECT_CUDA_CALLS": "0"},
            description="sglang-fastload, host-to-device copies queued through torch (not the CUDA runtime directly)",
        ),
    )
}
REFERENCE = "auto"


def top_functions(profiler: "cProfile.Profile", count: int = 80) -> List[Dict[str, Any]]:
    """The calling thread's functions with the most cumulative time in a profiled update
    (the reader threads are not profiled: their work shows as waiting for them)."""
    stats = pstats.Stats(profiler)
    rows = []
    for (path, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{os.path.basename(path)}:{line}({name})", "calls": calls,
                     "tottime_s": round(tottime, 5), "cumtime_s": round(cumtime, 5)})
    rows.sort(key=lambda r: -r["cumtime_s"])
    return rows[:count]


class CollectorClock:
    """When and how long Python's cyclic garbage collector ran while the clock was on.

    A collection holds the interpreter lock: every thread of the process (reader threads
    included) waits for it. Counted through ``gc.callbacks``, whichever thread collects.
    """

    def __init__(self):
        self.events: List[Tuple[float, float, int]] = []  # (start, seconds, generation)
        self._started = None

    def _callback(self, phase: str, info: Dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.events.append((self._started, time.perf_counter() - self._started, info["generation"]))
            self._started = None

    def __enter__(self) -> "CollectorClock":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self, window: Optional[Tuple[float, float]] = None) -> Dict[str, Any]:
        """Seconds and collections per generation, of the collections that began in
        ``window`` (``perf_counter`` start and end) or all of them."""
        seconds, collections = [0.0, 0.0, 0.0], [0, 0, 0]
        for start, spent, generation in self.events:
            if window is None or window[0] <= start <= window[1]:
                seconds[generation] += spent
                collections[generation] += 1
        return dict(seconds=round(sum(seconds), 4), by_generation=[round(x, 4) for x in seconds],
                    collections=collections)


def as_first_start(cont: Contender, plan_base: str) -> None:
    """Make the contender's next start-up load a first start of a fresh server process.

    Each contender gets a plan store of its own under ``plan_base`` (a contender run after
    another would otherwise find the other's stored plan) and the process forgets the
    safetensors headers it has validated (a memo any earlier load of the files filled).
    """
    os.environ["SGLANG_FASTLOAD_PLAN_DIR"] = os.path.join(plan_base, cont.name)
    if cont.load_format == "fast":
        forget_process_memos()


def forget_process_memos() -> None:
    """Forget what this process memoized about files, as a new server process starts without:
    validated safetensors headers, parsed index files, and the source-file digests of the
    plan store's key (earlier loads, the warm-up's included, filled them; a new process
    starts from those kept beside the plans)."""
    from sglang_fastload.checkpoint import checkpoint_files, safetensors_header
    from sglang_fastload.loader import plan_key, plan_store

    plan_store.wait_for_writes()  # the previous server process finished storing its plan
    with safetensors_header._MEMO_LOCK:
        safetensors_header._MEMO.clear()
        safetensors_header._memo_bytes = 0
    checkpoint_files._INDEX_MEMO.clear()
    checkpoint_files._index_memo_bytes = 0
    plan_key._FILE_DIGESTS.clear()
    plan_key._DIGESTS_FROM = None  # a new process reads the digests kept beside the plans


@contextlib.contextmanager
def environment_of(cont: Contender):
    """The contender's environment variables, set for one of its steps, then restored; for
    ``collector_running``, the loader's collector pause replaced by nothing meanwhile; for
    ``stream_copies_after_reads``, a start-up stream that copies out of its scratch only once
    every read has ended; for ``buffers_ready``, the readers' pinned buffers made (and waited
    for) first; for ``key_first``, a store that always seems to hold a plan of the
    key's prefix (so the whole key is computed before the plan is built) and plans whose
    files bring no chunks."""
    saved = {k: os.environ.get(k) for k in (cont.env or {})}
    os.environ.update(cont.env or {})
    pause = finish = None
    if cont.collector_running:
        from sglang_fastload.loader import collector_pause

        pause = collector_pause.collector_paused
        collector_pause.collector_paused = contextlib.nullcontext
    if cont.stream_copies_after_reads:
        from sglang_fastload.loader.startup_stream import StartupStream

        finish = StartupStream.finish

        def finish_after_reads(stream, plan, params):
            stream._join_readers()  # as ``finish`` does first (it does nothing when called again)
            for reader in list(stream.futures):
                reader.exception()  # waits for it, failed or not
            return finish(stream, plan, params)

        StartupStream.finish = finish_after_reads
    if cont.buffers_ready:
        import torch

        from sglang_fastload.loader import staging
        from sglang_fastload.loader.executor import DEFAULT_CHUNK_BYTES, DEFAULT_ZERO_COPY_SHARE
        from sglang_fastload.loader.fast_model_loader import default_num_threads

        if torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
            staging.prepare_in_background(device, default_num_threads(), DEFAULT_CHUNK_BYTES, DEFAULT_ZERO_COPY_SHARE)
            staging.wait_prepared(device, DEFAULT_CHUNK_BYTES)
    key_first = None
    if cont.key_first:
        from sglang_fastload.loader import plan as plan_module, plan_store

        key_first = (plan_store.any_stored, plan_module.FilePlan.chunks)
        plan_store.any_stored = lambda prefix: True

        def chunks_grouped_again(file_plan, chunk_bytes):
            return plan_module.sized_chunks(file_plan.steps, chunk_bytes)

        plan_module.FilePlan.chunks = chunks_grouped_again
    try:
        yield
    finally:
        if pause is not None:
            collector_pause.collector_paused = pause
        if finish is not None:
            from sglang_fastload.loader.startup_stream import StartupStream

            StartupStream.finish = finish
        if key_first is not None:
            from sglang_fastload.loader import plan as plan_module, plan_store

            plan_store.any_stored, plan_module.FilePlan.chunks = key_first
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def upstream_expert_scan(enabled: bool, counter: Dict[str, int]):
    """Make the overlay's Qwen3-MoE ``load_weights`` scan expert mappings as upstream does.

    The forked ``load_weights`` differs from sglang 0.5.23's only in asking an
    ``ExpertMappingIndex`` for the candidate mappings of each tensor name; upstream loops
    over all ``3 * num_experts`` mappings with a substring test, which the forked loop body
    still performs. Handing out the full list, in order, restores upstream's cost exactly.
    """
    if not enabled:
        yield
        return
    try:
        from sglang_fastload import expert_mapping
    except ImportError:
        yield
        return
    cls = expert_mapping.ExpertMappingIndex
    orig_init, orig_candidates = cls.__init__, cls.candidates

    def __init__(self, mappings):
        orig_init(self, mappings)
        self._bench_all = list(mappings)

    def candidates(self, name):
        counter["calls"] = counter.get("calls", 0) + 1
        return self._bench_all

    cls.__init__, cls.candidates = __init__, candidates
    try:
        yield
    finally:
        cls.__init__, cls.candidates = orig_init, orig_candidates


# --------------------------------------------------------------------------------------
# page cache and raw reads
# --------------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_fraction(paths: Sequence[str]) -> Optional[float]:
    """Fraction of the files' pages in the page cache (mincore on a short-lived mapping)."""
    import mmap as _mmap

    total = resident = 0
    try:
        for path in paths:
            size = os.path.getsize(path)
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = _libc.mmap(None, size, _mmap.PROT_READ, _mmap.MAP_SHARED, fd, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                try:
                    pages = (size + _PAGE - 1) // _PAGE
                    vec = (ctypes.c_ubyte * pages)()
                    if _libc.mincore(addr, size, vec) != 0:
                        return None
                    import numpy as np

                    resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
                    total += pages
                finally:
                    _libc.munmap(addr, size)
            finally:
                os.close(fd)
    except OSError:
        return None
    return resident / total if total else None


def mapped_files(paths: Sequence[str]) -> List[str]:
    """Checkpoint files this process still has mapped (/proc/self/maps)."""
    wanted = {os.path.realpath(p) for p in paths}
    found = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() in wanted:
                    found.add(parts[5].strip())
    except OSError:
        pass
    return sorted(found)


def drop_page_cache(paths: Sequence[str]) -> Dict[str, Any]:
    """Evict the files from the page cache: gc, fadvise DONTNEED, drop_caches (root)."""
    t0 = time.perf_counter()
    gc.collect()
    still_mapped = mapped_files(paths)
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    note = "drop_caches: ok"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        note = f"drop_caches not possible ({exc.strerror}); fadvise DONTNEED only"
    out = {
        "mapped_before_drop": [os.path.basename(p) for p in still_mapped],
        "resident_after_drop": resident_fraction(paths),
        "drop_s": round(time.perf_counter() - t0, 3),
        "note": note,
    }
    if still_mapped:
        log(f"WARNING: {len(still_mapped)} checkpoint files still mapped before dropping the cache")
    return out


def _read_chunks(paths: Sequence[str], max_bytes: Optional[int], chunk: int) -> List[Tuple[str, int, int]]:
    out = []
    total = 0
    for path in paths:
        size = os.path.getsize(path)
        off = 0
        while off < size:
            n = min(chunk, size - off)
            if max_bytes is not None and total + n > max_bytes:
                n = max_bytes - total
            if n <= 0:
                return out
            out.append((path, off, n))
            off += n
            total += n
    return out


def settle_page_cache(paths: Sequence[str]) -> Dict[str, float]:
    """Read the files twice (after writing them, and after a cold step), so every warm step
    finds them as warm as any other: pages read once after a drop are still on the kernel's
    inactive list, and the next read of each moves it to the active one (a cost the first
    warm reader would pay, and no later one)."""
    t0 = time.perf_counter()
    for _ in range(2):
        raw_read(paths, 16, chunk=4 * MIB)
    return {"seconds": round(time.perf_counter() - t0, 3)}


def raw_read(paths: Sequence[str], threads: int, *, max_bytes: Optional[int] = None, chunk: int = 64 * MIB) -> Dict:
    """Read the files (up to ``max_bytes``) with ``threads`` threads: ``os.preadv`` into reused buffers."""
    from sglang_fastload.loader.staging import read_exact  # the loader's own read loop

    chunks = _read_chunks(paths, max_bytes, chunk)
    buffers = []
    for _ in range(threads):
        b = bytearray(chunk)
        b[:: _PAGE] = bytes(len(range(0, chunk, _PAGE)))  # fault the pages in before timing
        buffers.append(memoryview(b))
    fds = {p: os.open(p, os.O_RDONLY) for p in {c[0] for c in chunks}}
    lock = threading.Lock()
    it = iter(chunks)
    done = [0] * threads

    def worker(k: int) -> None:
        buf = buffers[k]
        while True:
            with lock:
                item = next(it, None)
            if item is None:
                return
            path, off, n = item
            read_exact(fds[path], buf[:n], off, path)
            done[k] += n

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for f in [pool.submit(worker, k) for k in range(threads)]:
                f.result()
        seconds = time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)
    nbytes = sum(done)
    return {"threads": threads, "bytes": nbytes, "seconds": round(seconds, 4), "gbps": round(nbytes / seconds / GB, 3)}


# --------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def gpu_memory(device: str) -> Dict[str, float]:
    if device != "cuda":
        return {}
    import torch

    free, total = torch.cuda.mem_get_info()
    return {
        "allocated_gb": round(torch.cuda.memory_allocated() / GB, 2),
        "reserved_gb": round(torch.cuda.memory_reserved() / GB, 2),
        "free_gb": round(free / GB, 2),
        "total_gb": round(total / GB, 2),
    }


def h2d_pinned(nbytes: int, repeats: int = 3) -> Dict:
    """One pinned host buffer copied to the device ``repeats`` times (after one warm-up)."""
    import torch

    t0 = time.perf_counter()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    pin_s = time.perf_counter() - t0
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del host, dev
    torch.cuda.empty_cache()
    best = min(times)
    return {
        "bytes": nbytes,
        "seconds": [round(t, 4) for t in times],
        "gbps": round(nbytes / best / GB, 2),
        "gbps_median": round(nbytes / sorted(times)[len(times) // 2] / GB, 2),
        "pin_alloc_s": round(pin_s, 2),
    }


_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _int_view(t):
    import torch

    t = t.detach()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(getattr(torch, _INT_OF_SIZE[t.element_size()]))


def model_tensors(model) -> Dict[str, Any]:
    """Every parameter (duplicates included) and persistent buffer, by name."""
    import torch

    out = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    persistent = set(model.state_dict(keep_vars=True).keys())
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in persistent and name not in out and isinstance(b, torch.Tensor):
            out[name] = b
    return out


def poison(model) -> int:
    """Overwrite every parameter's bytes with 0xA5 (so an update that skips elements shows)."""
    import torch

    n = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.is_contiguous():
                p.data.view(-1).view(torch.uint8).fill_(0xA5)
                n += 1
    return n


_CHECK_CHUNK = 1 << 26


def checksums(model) -> Dict[str, Tuple]:
    """Per tensor, two int64 sums computed on the device: of the bits, and position-weighted.

    Integer addition wraps modulo 2**64, so the sums do not depend on reduction order.
    """
    import torch

    out = {}
    for name, t in model_tensors(model).items():
        v = _int_view(t).contiguous().reshape(-1)
        s1 = torch.zeros((), dtype=torch.int64, device=v.device)
        s2 = torch.zeros((), dtype=torch.int64, device=v.device)
        for start in range(0, v.numel(), _CHECK_CHUNK):
            c = v[start : start + _CHECK_CHUNK].to(torch.int64)
            idx = torch.arange(start, start + c.numel(), dtype=torch.int64, device=v.device)
            w = (idx * 2654435761) % 4294967291 + 1
            s1 += c.sum()
            s2 += (c * w).sum()
        out[name] = (int(s1), int(s2), tuple(t.shape), str(t.dtype))
    return out


def save_reference_checksums(directory: str, key: str, model, overlay: Optional[dict]) -> str:
    """Write ``checksums(model)`` of the reference (``auto``) after its last step to
    ``directory/<key>.json``, for a run in another process to compare with
    (``--reference-checksums``): run this one with ``SGLANG_FASTLOAD=0`` for upstream's own SGLang."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{key}.json")
    sums = {name: [s1, s2, list(shape), dtype] for name, (s1, s2, shape, dtype) in checksums(model).items()}
    with open(path, "w") as f:
        json.dump({"overlay": overlay, "checksums": sums}, f)
    return path


def load_reference_checksums(directory: str, key: str) -> Dict[str, Tuple]:
    """The checksums ``save_reference_checksums`` wrote for model ``key``, as ``checksums`` returns them.

    Raises:
        SystemExit: the file is missing, or was written by a process that ran the overlay.
    """
    path = os.path.join(directory, f"{key}.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise SystemExit(f"--reference-checksums: cannot read {path}: {exc}") from None
    if (data.get("overlay") or {}).get("active"):
        raise SystemExit(f"--reference-checksums: {path} was written with the overlay active, not by upstream's own SGLang")
    return {name: (s1, s2, tuple(shape), dtype) for name, (s1, s2, shape, dtype) in data["checksums"].items()}


def compare_models(ref, other, *, limit: int = 20) -> Dict:
    """torch.equal on integer views, tensor by tensor, on the device (nothing copied)."""
    import torch

    a, b = model_tensors(ref), model_tensors(other)
    diffs = [f"missing in {REFERENCE}: {n}" for n in sorted(set(b) - set(a))]
    diffs += [f"missing in contender: {n}" for n in sorted(set(a) - set(b))]
    compared = 0
    nbytes = 0
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape):
            diffs.append(f"{name}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            continue
        compared += 1
        nbytes += x.numel() * x.element_size()
        if not torch.equal(_int_view(x), _int_view(y)):
            ndiff = int((_int_view(x) != _int_view(y)).sum())
            diffs.append(f"{name}: {ndiff} of {x.numel()} elements differ")
    return {"method": "direct", "equal": not diffs, "tensors": compared, "bytes": nbytes, "diffs": diffs[:limit], "ndiffs": len(diffs)}


def compare_checksums(ref: Dict[str, Tuple], other: Dict[str, Tuple], *, limit: int = 20) -> Dict:
    diffs = [f"missing in {REFERENCE}: {n}" for n in sorted(set(other) - set(ref))]
    diffs += [f"missing in contender: {n}" for n in sorted(set(ref) - set(other))]
    for name in sorted(set(ref) & set(other)):
        if ref[name] != other[name]:
            diffs.append(f"{name}: checksum {other[name][:2]} vs {ref[name][:2]} ({other[name][2:]} vs {ref[name][2:]})")
    return {
        "method": "checksum",
        "equal": not diffs,
        "tensors": len(set(ref) & set(other)),
        "diffs": diffs[:limit],
        "ndiffs": len(diffs),
    }


# --------------------------------------------------------------------------------------
# SGLang in-process (one rank, TP=1), as the scheduler builds it
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Session:
    """Imports SGLang once, owns the one-rank process group, builds and updates models."""

    def __init__(self, device: str, rank: int = 0, world: int = 1, shared_gpu: bool = False, ep: int = 1):
        self.device = device
        self.rank, self.world = rank, world  # tensor-parallel rank and size (one GPU each)
        self.ep = ep  # expert-parallel size (SGLang's --ep-size: MoE experts split among the ranks)
        # shared_gpu: every rank on GPU 0, groups over gloo without PyNccl (NCCL refuses two
        # ranks on one GPU; loading needs no device collectives).
        self.shared_gpu = shared_gpu
        self.gpu = 0 if shared_gpu else rank
        # Set after a cold step: the next warm step first settles the page cache (settle_page_cache).
        self.cache_unsettled = False
        t0 = time.perf_counter()
        import torch

        if device == "cuda":
            torch.cuda.set_device(self.gpu)
            torch.set_num_threads(1)  # as ModelRunner.load_model does off CPU
        from sglang.srt.configs.device_config import DeviceConfig
        from sglang.srt.configs.model_config import ModelConfig
        from sglang.srt.distributed import parallel_state
        from sglang.srt.layers.dp_attention import initialize_dp_attention
        from sglang.srt.layers.moe import initialize_moe_config
        from sglang.srt.model_executor.model_runner import ModelRunner
        from sglang.srt.model_executor.model_runner_components.load_model_utils import build_load_config
        from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater
        from sglang.srt.model_loader import get_model_loader
        from sglang.srt.runtime_context import SpawnRanks, publish
        from sglang.srt.server_args import ServerArgs

        try:
            from sglang.srt.distributed.bootstrap import init_layer_runtime
        except ImportError:  # pragma: no cover - older layouts
            from sglang.srt.layers.dp_attention import init_dp_gathered_buffer

            def init_layer_runtime(*, model_config):
                init_dp_gathered_buffer(model_config)

        self.m = dict(
            DeviceConfig=DeviceConfig,
            ModelConfig=ModelConfig,
            parallel_state=parallel_state,
            initialize_dp_attention=initialize_dp_attention,
            initialize_moe_config=initialize_moe_config,
            ModelRunner=ModelRunner,
            build_load_config=build_load_config,
            WeightUpdater=WeightUpdater,
            get_model_loader=get_model_loader,
            SpawnRanks=SpawnRanks,
            publish=publish,
            ServerArgs=ServerArgs,
            init_layer_runtime=init_layer_runtime,
        )
        self.import_s = time.perf_counter() - t0
        self.dist_ready = False
        self.dist_s = 0.0

    def configure(self, model_path: str, contender: Contender):
        """Publish this contender's ServerArgs (load format, extra config); return the configs."""
        m = self.m
        kwargs = dict(
            model_path=model_path,
            device=self.device,
            tp_size=self.world,
            ep_size=self.ep,
            dtype="bfloat16",
            load_format=contender.load_format,
            attention_backend="torch_native",
            sampling_backend="pytorch",
            disable_cuda_graph=True,
            grammar_backend="none",
            disable_overlap_schedule=True,
            skip_tokenizer_init=True,
        )
        if contender.extra is not None:
            kwargs["model_loader_extra_config"] = json.dumps(contender.extra)
        server_args = m["ServerArgs"](**kwargs)
        m["publish"](server_args, role="scheduler", ranks=m["SpawnRanks"](world_rank=self.rank, gpu_id=self.gpu))
        m["initialize_moe_config"]()
        if not self.dist_ready:
            t0 = time.perf_counter()
            ps = m["parallel_state"]
            ps.set_custom_all_reduce(False)
            port = os.environ.get("MASTER_PORT") if self.world > 1 else None
            if self.shared_gpu:
                make_group = ps.init_model_parallel_group

                def init_model_parallel_group(*a, **k):
                    k["use_pynccl"] = False
                    return make_group(*a, **k)

                ps.init_model_parallel_group = init_model_parallel_group
            ps.init_distributed_environment(
                backend="nccl" if self.device == "cuda" and not self.shared_gpu else "gloo",
                world_size=self.world,
                rank=self.rank,
                local_rank=self.gpu,
                distributed_init_method=f"tcp://127.0.0.1:{port or _free_port()}",
            )
            ps.initialize_model_parallel()  # widths come from the published ServerArgs
            self.dist_ready = True
            self.dist_s = time.perf_counter() - t0
        model_config = m["ModelConfig"].from_server_args(server_args)
        m["initialize_dp_attention"](server_args=server_args)
        m["init_layer_runtime"](model_config=model_config)
        load_config = m["build_load_config"](
            server_args=server_args,
            tp_rank=self.rank,
            remote_instance_weight_transporter_engine=None,
            remote_instance_weight_transporter_session_id="",
            draft_model_idx=None,
            weight_cache_mode="off",
            weight_cache_socket=None,
        )
        return server_args, model_config, load_config

    def load(self, model_config, load_config) -> Tuple[Any, Dict[str, float]]:
        """``get_model_loader(...).load_model`` timed: total, and the load part (iterator → postprocess)."""
        m = self.m
        marks: Dict[str, float] = {}
        loader = m["get_model_loader"](load_config, model_config)
        orig_all, orig_lwp = loader._get_all_weights, loader.load_weights_and_postprocess

        def _get_all_weights(*a, **k):
            marks.setdefault("load_start", time.perf_counter())
            return orig_all(*a, **k)

        def load_weights_and_postprocess(*a, **k):
            marks.setdefault("load_start", time.perf_counter())
            out = orig_lwp(*a, **k)
            sync(self.device)
            marks["load_end"] = time.perf_counter()
            return out

        loader._get_all_weights = _get_all_weights
        loader.load_weights_and_postprocess = load_weights_and_postprocess
        t0 = time.perf_counter()
        model = loader.load_model(model_config=model_config, device_config=m["DeviceConfig"](self.device, self.gpu))
        sync(self.device)
        total = time.perf_counter() - t0
        load_s = marks["load_end"] - marks["load_start"] if "load_end" in marks else total
        window = (marks["load_start"], marks["load_end"]) if "load_end" in marks else (t0, t0 + total)
        return model, {"total_s": total, "load_s": load_s, "build_s": total - load_s, "loader": type(loader).__name__,
                       "window": window}

    def updater(self, model, model_config, load_config):
        m = self.m

        class _RunnerFields:
            """The attributes ``ModelRunner.update_model_fields`` reads and writes."""

            is_draft_worker = False
            update_model_fields = m["ModelRunner"].update_model_fields

            def __init__(self):
                self.model = model
                self.load_config = load_config
                self.model_config = model_config

        runner = _RunnerFields()

        def _no_recapture():
            raise AssertionError("no CUDA graph is captured in this benchmark")

        updater = m["WeightUpdater"](
            tp_rank=self.rank,
            device=self.device,
            gpu_id=self.gpu,
            model_config=model_config,
            custom_weight_loaders={},
            get_model=lambda: runner.model,
            update_model_fields=runner.update_model_fields,
            recapture_cuda_graph=_no_recapture,
            get_model_runner=lambda: runner,
        )
        return updater, runner


class FastSummaries:
    """Collects ``FastModelLoader.last_summary`` after every fast load (start-up and updates)."""

    def __init__(self):
        self.items: List[Dict] = []
        self.installed = False
        try:
            from sglang_fastload.loader import fast_model_loader as fml
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            self.error = repr(exc)
            return
        cls = fml.FastModelLoader
        orig = cls._load_prepared
        if getattr(orig, "_bench_wrapped", False):
            self.installed = True
            return
        sink = self.items

        def _load_prepared(self_, *a, **k):
            out = orig(self_, *a, **k)
            summary = getattr(self_, "last_summary", None)
            if summary is not None:
                sink.append(dataclasses.asdict(summary))
            return out

        _load_prepared._bench_wrapped = True
        cls._load_prepared = _load_prepared
        self.installed = True


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------
class Results:
    def __init__(self, path: Optional[str]):
        self.path = path
        self.md_path = os.path.join(os.path.dirname(path), "gpu_bench.md") if path else None
        self.data: Dict[str, Any] = {
            "schema": "sglang-fastload gpu_bench 1",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "cwd": os.getcwd(),
            "models": {},
            "notes": [],
        }

    def model(self, key: str) -> Dict:
        return self.data["models"].setdefault(key, {"contenders": {}, "bit_exact": {}})

    def save(self) -> None:
        self.data["wall_s"] = round(elapsed(), 1)
        derive(self.data)
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)
        with open(self.md_path + ".tmp", "w") as f:
            f.write(render_markdown(self.data))
        os.replace(self.md_path + ".tmp", self.md_path)


def derive(data: Dict) -> None:
    """Fill in GB/s, ratio to upstream auto and fraction of the ceiling for every step."""
    h2d = (data.get("h2d") or {}).get("gbps")
    for mdata in data["models"].values():
        nbytes = (mdata.get("checkpoint") or {}).get("nbytes")
        ceil = mdata.get("ceilings") or {}
        warm = [r["gbps"] for r in (ceil.get("warm_read") or {}).values()]
        warm_ceiling = max(warm) if warm else None
        if warm_ceiling is not None and h2d:
            warm_ceiling = min(warm_ceiling, h2d)
        cold_ceiling = (ceil.get("cold_read") or {}).get("gbps")
        mdata["ceiling_gbps"] = {"warm": warm_ceiling, "cold": cold_ceiling}
        ref_steps = {
            (s["phase"], s["cache"]): s
            for s in (mdata["contenders"].get(REFERENCE) or {}).get("steps", [])
            if s.get("ok")
        }
        for cdata in mdata["contenders"].values():
            for s in cdata.get("steps", []):
                if not s.get("ok") or not nbytes:
                    continue
                s["gbps"] = round(nbytes / s["seconds"] / GB, 3)
                ref = ref_steps.get((s["phase"], s["cache"]))
                s["speedup_vs_auto"] = round(ref["seconds"] / s["seconds"], 3) if ref else None
                c = cold_ceiling if s["cache"] == "cold" else warm_ceiling
                s["fraction_of_ceiling"] = round(s["gbps"] / c, 3) if c else None
                fs = s.get("fast_summary")
                if fs:
                    outside = max(0.0, s["seconds"] - fs["copy_seconds"])
                    s["outside_read_copy_s"] = round(outside, 4)
                    s["outside_read_copy_fraction"] = round(outside / s["seconds"], 4)


def _fmt(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def render_markdown(data: Dict) -> str:
    lines = [f"# gpu_bench — {data.get('date', '')}", ""]
    hw, sw = data.get("hardware", {}), data.get("software", {})
    lines.append(
        f"{hw.get('device_name', '?')}, {hw.get('cpus', '?')} CPUs, {hw.get('ram_gb', '?')} GB RAM; "
        f"python {sw.get('python', '?')}, torch {sw.get('torch', '?')}, sglang {sw.get('sglang', '?')}, "
        f"safetensors {sw.get('safetensors', '?')}, sglang-fastload {sw.get('sglang_fastload', '?')} "
        f"(overlay {'active' if (data.get('overlay') or {}).get('active') else 'INACTIVE'})"
    )
    lines.append("")
    lines.append(f"`{data.get('command', '')}` — wall {data.get('wall_s', '?')} s")
    if data.get("h2d"):
        lines += ["", f"Pinned host→device copy (4 GiB): {data['h2d']['gbps']} GB/s"]
    for key, m in data["models"].items():
        ck = m.get("checkpoint") or {}
        lines += ["", f"## {ck.get('label', key)}", ""]
        if ck:
            lines.append(
                f"{len(ck.get('files') or [])} files, {ck.get('tensors')} tensors, {ck.get('gb')} GB, {ck.get('layers')} layers; "
                f"written in {_fmt(ck.get('write_s'), '.1f')} s + sync {_fmt(ck.get('sync_s'), '.1f')} s"
                f"{' (reused)' if ck.get('reused') else ''}"
            )
        ceil = m.get("ceilings") or {}
        if ceil:
            parts = [f"{r['threads']} thr × {r.get('chunk_mib', 64)} MiB {r['gbps']:.2f}" for r in (ceil.get("warm_read") or {}).values()]
            cold = ceil.get("cold_read")
            lines.append(
                "Ceilings (GB/s): page-cache read " + ", ".join(parts)
                + (f"; cold read 8 thr {cold['gbps']:.2f}" if cold else "")
            )
        lines += [
            "",
            "| contender | phase | cache | seconds | GB/s | × auto | of ceiling | fast: plan / validate / read+copy s, outside % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, c in m["contenders"].items():
            if not c.get("available", True):
                lines.append(f"| {name} | — | — | not available: {c.get('error', '')[:120]} | | | | |")
                continue
            if c.get("error") and not c.get("steps"):
                lines.append(f"| {name} | — | — | error: {c['error'][:160]} | | | | |")
            for s in c.get("steps", []):
                if not s.get("ok"):
                    lines.append(f"| {name} | {s['phase']} | {s['cache']} | {s.get('error', 'failed')[:160]} | | | | |")
                    continue
                fs = s.get("fast_summary")
                extra = ""
                if fs:
                    extra = (
                        f"{fs['plan_seconds']:.3f} ({fs.get('plan_source') or ('cached' if fs['plan_cached'] else 'built')}) / "
                        f"{fs['validate_seconds']:.3f} / {fs['copy_seconds']:.3f}, "
                        f"{100 * s.get('outside_read_copy_fraction', 0):.1f}%"
                    )
                lines.append(
                    f"| {name} | {s['phase']} | {s['cache']} | {s['seconds']:.3f} | {_fmt(s.get('gbps'))} | "
                    f"{_fmt(s.get('speedup_vs_auto'))} | {_fmt(s.get('fraction_of_ceiling'), '.0%')} | {extra} |"
                )
        be = m.get("bit_exact") or {}
        if be:
            lines.append("")
            for name, v in be.items():
                verdict = "bit-identical" if v.get("equal") else f"DIFFERENT ({v.get('ndiffs')} differences: {v.get('diffs', [])[:3]})"
                lines.append(f"- {name} vs {REFERENCE}: {verdict} ({v.get('method')}, {v.get('tensors')} tensors)")
    if data.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
def environment(device: str) -> Tuple[Dict, Dict]:
    import torch

    hw = {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release()}
    try:
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) for line in f}
        hw["ram_gb"] = round(mem["MemTotal"] * 1024 / GB, 1)
        hw["ram_available_gb"] = round(mem.get("MemAvailable", 0) * 1024 / GB, 1)
    except (OSError, KeyError, ValueError):
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        hw["device_name"] = torch.cuda.get_device_name(0)
        hw["device_memory_gb"] = round(props.total_memory / GB, 1)
        hw["device_count"] = torch.cuda.device_count()
    else:
        hw["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    sw = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("sglang", "safetensors", "transformers", "triton", "sglang_fastload", "numpy"):
        try:
            m = __import__(mod)
            sw[mod] = getattr(m, "__version__", "?")
            if mod == "sglang_fastload":
                sw["sglang_fastload_file"] = os.path.dirname(m.__file__)
        except Exception as exc:  # noqa: BLE001
            sw[mod] = f"not importable: {exc!r}"[:200]
    return hw, sw


def filesystem_of(path: str) -> Dict[str, str]:
    path = os.path.realpath(path)
    best = ("", "", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (dev, mnt, fstype)
    except OSError:
        pass
    return {"device": best[0], "mount": best[1], "fstype": best[2]}


def choose_moe_layers(args, workdir: str, dense_bytes_pending: int, dense_bytes_resident: int) -> Tuple[int, Dict]:
    import synthetic_checkpoints as sc

    size = args.size
    per_layer, rest = sc.moe_layer_bytes(size)
    full = sc.moe_spec(size).layers
    if args.moe_layers:
        return args.moe_layers, {"rule": "--moe-layers"}
    if size != "full":
        return full, {"rule": f"{size} shape"}
    existing = 0
    mdir = os.path.join(workdir, "moe")
    if os.path.isdir(mdir):
        existing = sum(os.path.getsize(os.path.join(mdir, f)) for f in os.listdir(mdir))
    free = shutil.disk_usage(workdir).free + existing
    by_disk = int((free - args.disk_reserve_gb * GB - dense_bytes_pending - rest) // per_layer)
    by_gb = int((args.moe_max_gb * GB - rest) // per_layer)
    limits = {"disk_free_gb": round(free / GB, 1), "by_disk": by_disk, "by_moe_max_gb": by_gb, "full": full}
    if args.device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        # Two resident copies (reference + contender) beside one stale dense model.
        by_gpu = int(((total - dense_bytes_resident - 8 * GIB) / 2 - rest) // per_layer)
        limits["by_gpu_memory"] = by_gpu
    n = max(1, min(v for k, v in limits.items() if k.startswith("by_") or k == "full"))
    limits["rule"] = "auto"
    return n, limits


def fresh_copy(directory: str) -> Tuple[str, Dict[str, float]]:
    """A copy of the checkpoint in new files, written just now and not synced: what a trainer
    hands the server after each step (a warm page cache of pages never read, mapped or
    pinned before, unlike the ``warm`` rows' re-read files)."""
    target = directory.rstrip("/") + "-fresh"
    shutil.rmtree(target, ignore_errors=True)
    t0 = time.perf_counter()
    shutil.copytree(directory, target)
    return target, {"seconds": round(time.perf_counter() - t0, 2)}


def plan_steps(args) -> List[Tuple[str, str]]:
    """``(phase, cache)`` in run order: the warm sequence, the fresh repeats, then the cold ones."""
    phases = args.phases
    warm, cold = "warm" in args.cache, "cold" in args.cache
    steps = []
    if "load" in phases:
        steps.append(("load", "cold" if (cold and "load" in args.cold_phases) else "warm"))
    if warm:
        steps += [(p, "warm") for p in phases if p != "load"]
    if "fresh" in args.cache:
        steps += [(p, "fresh") for p in phases if p not in ("load", "restart")]
    if cold:
        steps += [(p, "cold") for p in phases if p != "load" and p in args.cold_phases]
    return steps


class Budget:
    def __init__(self, seconds: float):
        self.deadline = seconds

    def allows(self, estimate: float) -> bool:
        return elapsed() + estimate <= self.deadline


def run_model(key: str, spec, args, session_box: Dict, results: Results, budget: Budget, summaries_box: Dict) -> None:
    import synthetic_checkpoints as sc

    mres = results.model(key)
    workdir = os.path.join(args.workdir, key)
    log(f"== {spec.label}: checkpoint in {workdir}")
    info = sc.write_checkpoint(
        workdir,
        spec,
        seed=args.seed,
        shard_bytes=int(args.shard_gb * GB),
        threads=args.write_threads,
        reuse=not args.rewrite,
        sync=True,
        log=log,
    )
    mres["checkpoint"] = info.as_dict()
    mres["checkpoint"]["filesystem"] = filesystem_of(workdir)
    if args.verify_checkpoint or (args.verify_checkpoint is None and args.size == "tiny"):
        t0 = time.perf_counter()
        rep = sc.verify_checkpoint(info, spec, seed=args.seed, max_tensors=None if args.size == "tiny" else 64)
        mres["checkpoint"]["safe_open_check"] = dict(rep, seconds=round(time.perf_counter() - t0, 2))
        log(f"safe_open check: {rep}")
    results.save()
    paths = info.files
    nbytes = info.nbytes

    # ---- ceilings, measured on these files in this run --------------------------------
    ceil = mres.setdefault("ceilings", {})
    if "cold" in args.cache:
        drop = drop_page_cache(paths)
        r = raw_read(paths, 8, max_bytes=int(args.cold_ceiling_gb * GB))
        r["drop"] = drop
        ceil["cold_read"] = r
        log(f"cold read, 8 threads: {r['gbps']:.2f} GB/s over {r['bytes'] / GB:.1f} GB (resident after drop: {drop['resident_after_drop']})")
    t0 = time.perf_counter()
    pre = raw_read(paths, 8)
    ceil["prewarm_full_read_8_threads"] = pre
    log(f"prewarm: read all {nbytes / GB:.2f} GB with 8 threads in {time.perf_counter() - t0:.1f} s ({pre['gbps']:.2f} GB/s)")
    ceil["resident_after_prewarm"] = resident_fraction(paths)
    # Files written (or read once) just before: without this the first contender's first
    # steps pay the pages' activation, and no later contender does.
    ceil["settle_after_prewarm"] = settle_page_cache(paths)
    warm = ceil.setdefault("warm_read", {})
    for chunk_mib in args.ceiling_chunks_mib:
        for n in args.read_threads:
            r = raw_read(paths, n, max_bytes=int(args.ceiling_gb * GB), chunk=chunk_mib * MIB)
            r["chunk_mib"] = chunk_mib
            warm[f"{n}x{chunk_mib}MiB"] = r
            log(f"page-cache read, {n} threads x {chunk_mib} MiB: {r['gbps']:.2f} GB/s over {r['bytes'] / GB:.1f} GB")
    results.save()

    # ---- contenders -------------------------------------------------------------------
    if session_box.get("session") is None:
        log("importing SGLang ...")
        session_box["session"] = Session(args.device)
        s = session_box["session"]
        results.data["sglang_import_s"] = round(s.import_s, 1)
        overlay = overlay_state()
        results.data["overlay"] = overlay
        hw, sw = environment(args.device)
        results.data["software"] = sw
        log(f"SGLang imported in {s.import_s:.1f} s; overlay: {overlay}")
        summaries_box["s"] = FastSummaries()
    session: Session = session_box["session"]
    summaries: FastSummaries = summaries_box["s"]

    if args.warmup and key not in session_box.setdefault("warmed", set()):
        session_box["warmed"].add(key)
        mres["warmup"] = warmup(key, args, session)
        results.save()

    steps = plan_steps(args)
    order = [REFERENCE] + [c for c in args.contenders if c != REFERENCE] if REFERENCE in args.contenders else list(args.contenders)
    ref_model = None
    ref_sums = load_reference_checksums(args.reference_checksums, key) if args.reference_checksums else None
    if ref_sums is not None:
        mres["reference"] = f"upstream's own SGLang in another process ({args.reference_checksums})"
    for cname in order:
        cont = CONTENDERS[cname]
        cres = mres["contenders"].setdefault(cname, {"description": cont.description, "load_format": cont.load_format, "extra_config": cont.extra, "steps": []})
        if cont.requires:
            try:
                __import__(cont.requires)
            except Exception as exc:  # noqa: BLE001
                cres.update(available=False, error=f"{type(exc).__name__}: {exc}")
                log(f"{cname}: not available: {exc}")
                results.save()
                continue
        if cont.load_format == "fast" and not (results.data.get("overlay") or {}).get("active"):
            cres.update(available=False, error="the sglang-fastload overlay is not active in this process")
            results.save()
            continue
        cres["available"] = True
        est_first = 15 + nbytes / (2.5 * GB)
        if not budget.allows(est_first):
            cres["error"] = "skipped: time budget"
            log(f"{cname}: skipped (time budget)")
            results.save()
            continue
        # With checksums of upstream's own SGLang, every contender here is compared with them.
        is_ref = cname == REFERENCE and ref_sums is None
        if not is_ref and ref_model is not None and args.device == "cuda":
            import torch

            free = torch.cuda.mem_get_info()[0]
            need = nbytes * 1.1 + 4 * GIB
            if args.verify == "checksum" or free < need:
                log(f"{cname}: {free / GB:.1f} GB free on the device < {need / GB:.1f} GB: reference -> checksums")
                ref_sums = checksums(ref_model)
                ref_model = None
                free_memory(args.device)
        elif not is_ref and ref_model is not None and args.verify == "checksum":
            ref_sums = checksums(ref_model)
            ref_model = None
        model = None
        as_first_start(cont, args.plan_base)
        try:
            model = run_contender(cont, info, steps, args, session, summaries, cres, results, budget)
            if model is not None and not is_ref and args.verify != "none":
                t0 = time.perf_counter()
                if ref_model is not None:
                    verdict = compare_models(ref_model, model)
                elif ref_sums is not None:
                    verdict = compare_checksums(ref_sums, checksums(model))
                else:
                    verdict = None
                if verdict is not None:
                    verdict["seconds"] = round(time.perf_counter() - t0, 2)
                    verdict["after"] = [f"{s['phase']}/{s['cache']}" for s in cres["steps"] if s.get("ok")]
                    mres["bit_exact"][cname] = verdict
                    log(f"{cname} vs {REFERENCE}: {'bit-identical' if verdict['equal'] else 'DIFFERENT'} "
                        f"({verdict['method']}, {verdict['tensors']} tensors, {verdict['ndiffs']} differences)")
        except Exception as exc:  # noqa: BLE001 - one contender failing must not end the run
            cres["error"] = f"{type(exc).__name__}: {exc}"
            cres["traceback"] = traceback.format_exc()[-4000:]
            log(f"{cname}: FAILED: {exc}\n{cres['traceback']}")
        if is_ref and model is not None:
            ref_model = model
            if args.save_reference_checksums:
                path = save_reference_checksums(args.save_reference_checksums, key, model, results.data.get("overlay"))
                log(f"{cname}: parameter checksums written to {path}")
        alive = weakref.ref(model) if (model is not None and not is_ref) else None
        model = None
        free_memory(args.device)
        cres["memory_after"] = gpu_memory(args.device)
        if alive is not None:
            cres["model_freed"] = alive() is None
            if alive() is not None:
                log(f"{cname}: the model is still referenced after deletion ({len(gc.get_referrers(alive()))} referrers)")
        results.save()
    ref_model = None
    free_memory(args.device)
    mres["memory_after_model"] = gpu_memory(args.device)
    results.save()
    if args.cleanup:
        shutil.rmtree(workdir, ignore_errors=True)
        log(f"removed {workdir}")


def warmup(key: str, args, session: "Session") -> Dict:
    """Load and update a tiny model of the same class once per format, before any timing.

    The first model built in a process pays one-off costs (CUDA context, allocator, lazy
    imports: seconds on the H200) that belong to no loader.
    """
    import synthetic_checkpoints as sc

    t0 = time.perf_counter()
    spec = sc.dense_spec("tiny") if key == "dense" else sc.moe_spec("tiny")
    info = sc.write_checkpoint(os.path.join(args.workdir, f"warmup-{key}"), spec, shard_bytes=600_000, sync=False, log=log)
    out: Dict[str, Any] = {}
    formats = []
    for cname in args.contenders:
        c = CONTENDERS[cname]
        if c.load_format in ("auto", "fast") and c.load_format not in [f.load_format for f in formats]:
            formats.append(c)
    for cont in formats:
        try:
            _, model_config, load_config = session.configure(info.directory, cont)
            model, t = session.load(model_config, load_config)
            updater, runner = session.updater(model, model_config, load_config)
            t1 = time.perf_counter()
            ok, message = updater.update_weights_from_disk(info.directory, cont.load_format)
            out[cont.load_format] = {"build_and_load_s": round(t["total_s"], 3), "update_s": round(time.perf_counter() - t1, 3), "ok": bool(ok)}
            del model, updater, runner
        except Exception as exc:  # noqa: BLE001
            out[cont.load_format] = {"error": f"{type(exc).__name__}: {exc}"}
        free_memory(args.device)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"warm-up on a tiny {key} model: {out}")
    return out


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def overlay_state() -> Dict:
    out: Dict[str, Any] = {}
    try:
        import sglang.srt.model_loader.loader as L
        from sglang.srt.configs.load_config import LoadFormat

        out["loader_file"] = L.__file__
        try:
            LoadFormat("fast")
            out["fast_format"] = True
        except ValueError:
            out["fast_format"] = False
        out["active"] = bool(out["fast_format"]) and os.sep + "_overlay" + os.sep in L.__file__ or (
            os.sep + "overlay" + os.sep in L.__file__
        )
    except Exception as exc:  # noqa: BLE001
        out["active"] = False
        out["error"] = repr(exc)
    return out


def run_contender(cont: Contender, info, steps, args, session: Session, summaries: FastSummaries, cres: Dict, results: Results, budget: Budget):
    """Build + load, then the updates; returns the model (kept for the bit-exact check)."""
    paths, nbytes = info.files, info.nbytes
    scan_counter: Dict[str, int] = {}
    model = None
    updater = runner = None
    n_updates = 0
    last_update = max((i for i, (p, _) in enumerate(steps) if p not in ("load", "restart")), default=None)
    cold_rate = ((results.data["models"].get(info.kind) or {}).get("ceilings", {}).get("cold_read") or {}).get("gbps")
    for i, (phase, cache) in enumerate(steps):
        est = (nbytes / (0.7 * (cold_rate or 1.0) * GB) if cache == "cold" else nbytes / (2.5 * GB)) + 5
        if not budget.allows(est):
            cres["steps"].append({"phase": phase, "cache": cache, "ok": False, "error": "skipped: time budget"})
            log(f"{cont.name} {phase}/{cache}: skipped (time budget, needs ~{est:.0f} s)")
            continue
        step: Dict[str, Any] = {"phase": phase, "cache": cache}
        if cache == "cold":
            step["drop"] = drop_page_cache(paths)
            session.cache_unsettled = True
        elif session.cache_unsettled:
            step["settle"] = settle_page_cache(paths)
            session.cache_unsettled = False
        step["resident_before"] = resident_fraction(paths)
        n_summaries = len(summaries.items)
        with upstream_expert_scan(cont.upstream_scan, scan_counter), environment_of(cont):
            if phase == "restart" and model is not None:
                # A server restart: the old model goes, a new one is built and loaded in the
                # same process (for ``fast``, from the plan store, not the in-memory plan).
                del updater, runner, model
                updater = runner = model = None
                free_memory(args.device)
                if cont.load_format == "fast":
                    forget_process_memos()
            profiler = cProfile.Profile() if cont.load_format == "fast" and args.profile_updates and (
                args.profile_updates == ["all"] or cont.name in args.profile_updates) else None
            if phase in ("load", "restart"):
                server_args, model_config, load_config = session.configure(info.directory, cont)
                if profiler is not None:
                    profiler.enable()
                model, t = session.load(model_config, load_config)
                if profiler is not None:
                    profiler.disable()
                    step["profile"] = top_functions(profiler)
                step.update(seconds=round(t["load_s"], 4), total_s=round(t["total_s"], 4), build_s=round(t["build_s"], 4), loader=t["loader"], ok=True)
                updater, runner = session.updater(model, model_config, load_config)
            else:
                if updater is None:
                    step.update(ok=False, error="no model (load phase not run)")
                    cres["steps"].append(step)
                    continue
                if i == last_update and args.poison and cont.name != REFERENCE:
                    step["poisoned_params"] = poison(runner.model)
                    sync(args.device)
                source = info.directory
                if cache == "fresh":
                    free = shutil.disk_usage(os.path.dirname(info.directory.rstrip("/"))).free
                    if free < nbytes + args.disk_reserve_gb * GB:
                        # e.g. a contender that keeps deleted copies mapped still holds their space
                        step.update(ok=False, error=f"skipped: {free / GB:.1f} GB free, the fresh copy needs {nbytes / GB:.1f} GB + {args.disk_reserve_gb:.0f} GB reserve")
                        cres["steps"].append(step)
                        log(f"{cont.name} {phase}/{cache}: {step['error']}")
                        continue
                    source, step["fresh_copy"] = fresh_copy(info.directory)
                parts = None
                if args.time_parts and cont.load_format == "fast":
                    import update_parts

                    parts = update_parts.install(updater)
                    parts.reset()  # drop what other contenders' updates left in the shared timer
                t0 = time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                ok, message = updater.update_weights_from_disk(source, cont.load_format)
                sync(args.device)
                seconds = time.perf_counter() - t0
                if parts is not None:
                    step["parts_ms"] = {k: round(v * 1e3, 3) for k, v in parts.split(seconds).items()}
                if profiler is not None:
                    profiler.disable()
                    step["profile"] = top_functions(profiler)
                if source != info.directory:
                    shutil.rmtree(source, ignore_errors=True)
                n_updates += 1
                step.update(seconds=round(seconds, 4), ok=bool(ok), updates_before=n_updates - 1)
                if not ok:
                    step["error"] = str(message)[:2000]
                model = runner.model
        if cont.load_format == "fast" and len(summaries.items) > n_summaries:
            step["fast_summary"] = summaries.items[-1]
        elif cont.load_format == "fast":
            step["fast_summary"] = None
            step["note"] = "no fast summary: the load went through upstream's path"
        step["mapped_after"] = len(mapped_files(paths))
        cres["steps"].append(step)
        derive(results.data)
        s = cres["steps"][-1]
        if s.get("ok"):
            extra = ""
            fs = s.get("fast_summary")
            if fs:
                extra = (f"; plan {fs['plan_seconds']:.3f} s ({fs.get('plan_source') or ('cached' if fs['plan_cached'] else 'built')}), "
                         f"validate {fs['validate_seconds']:.3f} s, read/copy {fs['copy_seconds']:.3f} s")
            log(f"{cont.name} {phase}/{cache}: {s['seconds']:.3f} s, {_fmt(s.get('gbps'))} GB/s, "
                f"x{_fmt(s.get('speedup_vs_auto'))} vs auto, {_fmt(s.get('fraction_of_ceiling'), '.0%')} of ceiling"
                f"{' (build ' + format(s['build_s'], '.2f') + ' s)' if 'build_s' in s else ''}{extra}")
        else:
            log(f"{cont.name} {phase}/{cache}: FAILED: {s.get('error')}")
        results.save()
    if cont.upstream_scan and info.kind == "moe":
        cres["upstream_expert_scan_calls"] = scan_counter.get("calls", 0)
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--tiny", action="store_true", help="tiny models (dry runs); same as --size tiny")
    p.add_argument("--size", choices=("full", "tiny", "cpu"), default="full", help="model shapes (cpu: bench/cpu_bench.py's)")
    p.add_argument("--models", type=csv, default=["dense", "moe"])
    p.add_argument("--contenders", type=csv, default=["fast", "auto", "auto1"], help=f"of {','.join(CONTENDERS)}")
    p.add_argument("--phases", type=csv, default=["load", "update1", "update2"],
                   help="restart: free the model, build and load a new one (fast: from the plan store)")
    p.add_argument("--cache", type=csv, default=["warm", "cold"],
                   help="warm: re-read files; cold: page cache dropped; fresh: each update reads a new copy written just before (as after a training step)")
    p.add_argument("--cold-phases", type=csv, default=["update1"], help="phases measured again with a cold page cache")
    p.add_argument("--moe-layers", type=int, default=None, help="default: as many as disk, --moe-max-gb and GPU memory allow")
    p.add_argument("--moe-max-gb", type=float, default=40.0)
    p.add_argument("--disk-reserve-gb", type=float, default=3.0)
    p.add_argument("--shard-gb", type=float, default=None, help="shard size (default 5; tiny: 0.0005)")
    p.add_argument("--workdir", default=None, help="checkpoints (default /var/tmp/sglang-fastload-bench[-SIZE])")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--write-threads", type=int, default=8)
    p.add_argument("--rewrite", action="store_true", help="write the checkpoints even if an identical one is there")
    p.add_argument("--cleanup", action="store_true", help="delete each checkpoint after its measurements")
    p.add_argument("--verify-checkpoint", action="store_true", default=None,
                   help="safe_open every file and compare tensors with the generator (default: on with --tiny)")
    p.add_argument("--read-threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16])
    p.add_argument("--ceiling-chunks-mib", type=lambda s: [int(x) for x in s.split(",")], default=[64, 4],
                   help="buffer sizes of the page-cache ceiling reads")
    p.add_argument("--ceiling-gb", type=float, default=8.0, help="bytes per page-cache ceiling read")
    p.add_argument("--cold-ceiling-gb", type=float, default=8.0, help="bytes of the cold ceiling read")
    p.add_argument("--h2d-gib", type=float, default=4.0)
    p.add_argument("--verify", choices=("auto", "direct", "checksum", "none"), default="auto")
    p.add_argument("--save-reference-checksums", default=None, metavar="DIR",
                   help="write auto's parameter checksums after its last step to DIR/<model>.json "
                        "(run with SGLANG_FASTLOAD=0: upstream's own SGLang)")
    p.add_argument("--reference-checksums", default=None, metavar="DIR",
                   help="compare every contender with the checksums in DIR/<model>.json (same --phases and --cache)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the tiny warm-up load per model class")
    p.add_argument("--no-poison", dest="poison", action="store_false", help="do not poison parameters before the last update")
    p.add_argument("--time-budget-s", type=float, default=540.0, help="skip steps that would end after this (from start)")
    p.add_argument("--plan", action="store_true", help="print the expected H200 wall time of this run and exit")
    p.add_argument("--site-dir", default=None, help="add this site dir first (runs its .pth files: the overlay's hook)")
    p.add_argument("--out", default=None, help="JSON output (default $OUT/gpu_bench.json, else ./gpu_bench.json)")
    p.add_argument("--log-level", default="WARNING", help="SGLang's logging level")
    p.add_argument("--time-parts", action="store_true",
                   help="time each part of a fast update outside its reads and copies, without a profiler "
                        "(bench/update_parts.py; the step's parts_ms)")
    p.add_argument("--profile-updates", type=csv, nargs="?", const=["all"], default=[],
                   help="profile each fast load's and update's calling thread (cProfile; slows Python-heavy parts): where "
                        "time outside reads and copies goes; optionally only these contenders (e.g. fast-c6: a profiled twin of fast)")
    args = p.parse_args(argv)
    if args.tiny:
        args.size = "tiny"
    if args.shard_gb is None:
        args.shard_gb = {"full": 5.0, "tiny": 0.0005, "cpu": 0.5}[args.size]
    if args.workdir is None:
        args.workdir = "/var/tmp/sglang-fastload-bench" + ("" if args.size == "full" else f"-{args.size}")
    if args.out is None:
        base = os.environ.get("OUT") or os.getcwd()
        args.out = os.path.join(base, "gpu_bench.json")
    for c in args.contenders:
        if c not in CONTENDERS:
            p.error(f"unknown contender {c!r} (known: {', '.join(CONTENDERS)})")
    for m in args.models:
        if m not in ("dense", "moe"):
            p.error(f"unknown model {m!r}")
    if args.size == "tiny":
        args.ceiling_gb = min(args.ceiling_gb, 1.0)
        args.cold_ceiling_gb = min(args.cold_ceiling_gb, 1.0)
    return args


def activate_site(site_dir: Optional[str]) -> Dict:
    """Process ``site_dir``'s .pth files (the overlay hook) and make sure the hook is on."""
    out: Dict[str, Any] = {}
    if site_dir:
        import site

        site.addsitedir(site_dir)
        out["site_dir"] = site_dir
    try:
        from sglang_fastload import _hook

        if _hook.installed_finder() is None:
            _hook.install()
            out["hook"] = "installed explicitly" if _hook.installed_finder() is not None else "could not install"
        else:
            out["hook"] = "installed by a .pth"
    except ImportError as exc:
        out["hook"] = f"sglang_fastload not importable: {exc}"
    return out


# Rates seen on the H200 machine (shared notes, 2026-11-30) for --plan's estimate, GB/s.
PLAN_RATES = {
    "write": 1.5,  # write + sync, disk-bound once the dirty-page limit is reached
    "cold_read": 1.7,
    "warm_read_1": 4.8,
    "warm_read_8": 16.5,
    ("auto", "warm"): 6.1, ("auto", "cold"): 1.15,
    ("auto1", "warm"): 4.2, ("auto1", "cold"): 1.6,
    ("auto-idx", "warm"): 6.1, ("auto-idx", "cold"): 1.15,
    ("fast", "warm"): 12.0, ("fast", "cold"): 1.6,
    ("fast1", "warm"): 4.5, ("fast1", "cold"): 1.6,
    ("fast16", "warm"): 11.0, ("fast16", "cold"): 1.6,
}
PLAN_FIXED = {"imports": 25.0, "warmup_per_model": 6.0, "build": 3.0, "drop": 2.0}


def estimate(args, specs) -> Tuple[float, List[str]]:
    """Expected wall time of this run on the H200 machine, from PLAN_RATES (no I/O done)."""
    lines = []
    total = PLAN_FIXED["imports"]
    lines.append(f"  imports + NCCL init            {PLAN_FIXED['imports']:6.0f} s")
    if args.device == "cuda" or args.h2d_gib:
        total += 3
        lines.append(f"  pinned H2D ceiling             {3:6.0f} s")
    steps = plan_steps(args)
    for key, spec in specs:
        gb_ = spec.nbytes() / GB
        t_write = gb_ / PLAN_RATES["write"]
        ceil_gb = min(gb_, args.ceiling_gb)
        t_ceil = gb_ / PLAN_RATES["warm_read_8"] + len(args.ceiling_chunks_mib) * (
            ceil_gb / PLAN_RATES["warm_read_1"] + (len(args.read_threads) - 1) * ceil_gb / PLAN_RATES["warm_read_8"])
        if "cold" in args.cache:
            t_ceil += PLAN_FIXED["drop"] + min(gb_, args.cold_ceiling_gb) / PLAN_RATES["cold_read"]
        t_model = t_write + t_ceil + PLAN_FIXED["warmup_per_model"]
        lines.append(f"  {key}: {spec.label}, {gb_:.1f} GB: write+sync {t_write:.0f} s, ceilings {t_ceil:.0f} s, warm-up {PLAN_FIXED['warmup_per_model']:.0f} s")
        for c in args.contenders:
            if CONTENDERS[c].requires:
                continue
            t_c = PLAN_FIXED["build"]
            for phase, cache in steps:
                rate = PLAN_RATES.get((c, cache), 2.0)
                t_c += gb_ / rate + (PLAN_FIXED["drop"] if cache == "cold" else 0)
            lines.append(f"    {c:<8} {', '.join(p + '/' + k for p, k in steps)}: {t_c:.0f} s")
            t_model += t_c
        total += t_model
        lines.append(f"    -> {key} total {t_model:.0f} s")
    lines.append(f"  whole run ~{total:.0f} s (+ ~15 s device_setup.sh)")
    return total, lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        import synthetic_checkpoints as sc

        args.device = args.device or "cuda"
        specs = []
        if "dense" in args.models:
            specs.append(("dense", sc.dense_spec(args.size)))
        if "moe" in args.models:
            per_layer, rest = sc.moe_layer_bytes(args.size)
            n = args.moe_layers or (sc.moe_spec(args.size).layers if args.size != "full"
                                    else min(48, int((args.moe_max_gb * GB - rest) // per_layer)))
            specs.append(("moe", sc.moe_spec(args.size, layers=n)))
        _, lines = estimate(args, specs)
        print("Expected wall time on the H200 machine (rates in PLAN_RATES; disk permitting):")
        print("\n".join(lines))
        return 0
    # Every run starts with an empty plan store, so a start-up load is a first start (plan
    # built) whatever earlier runs left in ~/.cache; set the variable to measure stored plans.
    # Each contender gets a store of its own below it (as_first_start).
    args.plan_base = os.environ.setdefault("SGLANG_FASTLOAD_PLAN_DIR", tempfile.mkdtemp(prefix="gpu-bench-plans-"))
    hook = activate_site(args.site_dir)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    standins = None
    if args.device == "cuda":
        import import_standins_for_bench

        import_standins_for_bench.activate()
        standins = import_standins_for_bench
    import logging

    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout, force=True)
    logging.getLogger("sglang_fastload").setLevel(logging.INFO)

    results = Results(args.out)
    results.data["settings"] = {k: v for k, v in vars(args).items()}
    results.data["hook"] = hook
    hw, sw = environment(args.device)
    results.data["hardware"], results.data["software"] = hw, sw
    os.makedirs(args.workdir, exist_ok=True)
    results.data["workdir_filesystem"] = filesystem_of(args.workdir)
    log(f"device {hw.get('device_name')}; {hw.get('cpus')} CPUs; RAM {hw.get('ram_gb')} GB; "
        f"workdir {args.workdir} on {results.data['workdir_filesystem']}; hook: {hook}; out {args.out}")
    if results.data["workdir_filesystem"].get("fstype") in ("tmpfs", "ramfs") and "cold" in args.cache:
        results.data["notes"].append("the checkpoint directory is in memory (tmpfs): 'cold' reads are not disk reads")
    results.save()
    budget = Budget(args.time_budget_s)

    if args.device == "cuda" and args.h2d_gib > 0:
        try:
            results.data["h2d"] = h2d_pinned(int(args.h2d_gib * GIB))
            log(f"pinned host->device copy: {results.data['h2d']['gbps']} GB/s")
        except Exception as exc:  # noqa: BLE001 - a ceiling, not the run
            results.data["notes"].append(f"pinned H2D measurement failed: {exc!r}")
            log(f"pinned H2D measurement failed: {exc!r}")
        results.save()

    import synthetic_checkpoints as sc

    specs = []
    if "dense" in args.models:
        specs.append(("dense", sc.dense_spec(args.size)))
    if "moe" in args.models:
        dense_pending = 0
        if "dense" in args.models and not args.cleanup:
            d = sc.dense_spec(args.size)
            if sc._existing(os.path.join(args.workdir, "dense"), d, args.seed, int(args.shard_gb * GB)) is None:
                dense_pending = d.nbytes()
        dense_resident = sc.dense_spec(args.size).nbytes() if "dense" in args.models else 0
        n, why = choose_moe_layers(args, args.workdir, dense_pending, dense_resident)
        results.data["moe_layers"] = {"layers": n, **why}
        log(f"MoE checkpoint: {n} of {sc.moe_spec(args.size).layers} layers ({why})")
        specs.append(("moe", sc.moe_spec(args.size, layers=n)))
    session_box: Dict = {}
    summaries_box: Dict = {}
    for key, spec in specs:
        try:
            run_model(key, spec, args, session_box, results, budget, summaries_box)
        except Exception as exc:  # noqa: BLE001
            results.model(key)["error"] = f"{type(exc).__name__}: {exc}"
            results.model(key)["traceback"] = traceback.format_exc()[-4000:]
            log(f"{key}: FAILED: {exc}\n{traceback.format_exc()}")
            results.save()
    if standins is not None:
        results.data["import_standins_served"] = sorted({n.split(".")[0] for n in standins.served()})
    results.save()
    print()
    print(render_markdown(results.data), flush=True)
    log(f"wrote {args.out} and {results.md_path}")
    # Skip interpreter teardown: NCCL/gloo atexit hooks can hang after the work is saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
