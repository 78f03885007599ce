"""Execute a load plan: a pool of readers filling reused (pinned) buffers, copies overlapped.

Each worker thread owns two host buffers (pinned when the parameters live on an
accelerator) and, on CUDA, its own stream: while the device copies one buffer the thread
reads the next chunk into the other. On CPU, slices whose bytes are exactly the
destination's elements are read straight into the parameter's memory.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sglang_fastload import constants
from sglang_fastload.errors import CheckpointError
from sglang_fastload.loader.plan import CopyStep, LoadPlan, is_contiguous

_ALIGN = 64


@dataclasses.dataclass
class ExecutionStats:
    bytes_read: int = 0
    read_calls: int = 0
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class InjectedFault:
    """A fault a test armed through ``SGLANG_FASTLOAD_FAULT_FILE`` (see constants.py).

    Attributes:
        after_bytes: bytes copied into parameters before the fault strikes.
        touch: instead of failing a read, change a checkpoint file's modification time
            (as a writer would) and let the load find out by itself.
    """

    after_bytes: int
    touch: bool = False


def take_injected_fault() -> Optional[InjectedFault]:
    """Return the fault this load must suffer, if a test armed one."""
    path = os.environ.get(constants.ENV_FAULT_FILE)
    if not path:
        return None
    try:
        with open(path) as f:
            words = f.read().split()
        limit = int(words[0]) if words else 0
        if constants.FAULT_PERSIST_WORD not in words[1:]:
            os.remove(path)
    except (OSError, ValueError):
        return None
    return InjectedFault(limit, touch=constants.FAULT_TOUCH_WORD in words[1:])


class _FaultBudget:
    def __init__(self, fault: Optional[InjectedFault], files: Sequence[str] = ()):
        self.left = fault.after_bytes if fault is not None else None
        self.touch = fault is not None and fault.touch
        self.files = sorted(files)
        self.lock = threading.Lock()

    def spend(self, n: int) -> None:
        if self.left is None:
            return
        with self.lock:
            if self.left is None:
                return
            self.left -= n
            if self.left >= 0:
                return
            if not self.touch:
                raise OSError(errno.EIO, "injected I/O fault (" + constants.ENV_FAULT_FILE + ")")
            self.left = None
            if self.files:
                st = os.stat(self.files[0])
                os.utime(self.files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@dataclasses.dataclass
class _Chunk:
    path: str
    steps: List[CopyStep]
    nbytes: int


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _chunks(plan: LoadPlan, chunk_bytes: int) -> List[_Chunk]:
    out: List[_Chunk] = []
    for fp in plan.files:
        cur: List[CopyStep] = []
        size = 0
        for step in fp.steps:
            need = _align(step.nbytes, _ALIGN)
            if cur and size + need > chunk_bytes:
                out.append(_Chunk(fp.path, cur, size))
                cur, size = [], 0
            cur.append(step)
            size += need
        if cur:
            out.append(_Chunk(fp.path, cur, size))
    return out


def _writable_view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _read_exact(fd: int, view: memoryview, offset: int, path: str, stats: ExecutionStats) -> None:
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        stats.read_calls += 1
        if n <= 0:
            raise CheckpointError(
                path,
                f"file ended at byte {offset + done} while {total - done} more bytes were "
                "expected (truncated or changed during the load)",
            )
        done += n
    stats.bytes_read += total


def _param_view(param: torch.Tensor, geometry) -> torch.Tensor:
    off, sizes, strides = geometry
    return param.as_strided(sizes, strides, param.storage_offset() + off)


class _Worker:
    """Per-thread resources: two host buffers, their events, a stream and a device scratch."""

    def __init__(self, device: torch.device, chunk_bytes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers: List[Optional[torch.Tensor]] = [None, None]
        self.events: List[Optional[object]] = [None, None]
        self.turn = 0
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.scratch: Optional[torch.Tensor] = None
        self.chunk_bytes = chunk_bytes
        self.stats = ExecutionStats()

    def buffer(self, nbytes: int) -> torch.Tensor:
        i = self.turn
        self.turn ^= 1
        if self.events[i] is not None:
            self.events[i].synchronize()  # the device is done with this buffer
            self.events[i] = None
        buf = self.buffers[i]
        if buf is None or buf.numel() < nbytes:
            size = max(nbytes, self.chunk_bytes)
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.cuda)
            self.buffers[i] = buf
        self._current = i
        return buf

    def mark_in_use(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.events[self._current] = ev

    def device_scratch(self, nbytes: int) -> torch.Tensor:
        if self.scratch is None or self.scratch.numel() < nbytes:
            if self.scratch is not None:
                self.stream.synchronize()  # the old buffer may still feed queued copies
            self.scratch = torch.empty(max(nbytes, self.chunk_bytes), dtype=torch.uint8, device=self.device)
        return self.scratch

    def finish(self) -> None:
        if self.cuda:
            self.stream.synchronize()


# Host buffers are kept between loads: pinning memory is slow, updates are frequent.
_WORKER_POOL: Dict[Tuple[str, int], List[_Worker]] = {}
_POOL_LOCK = threading.Lock()


_READER_POOLS: Dict[int, ThreadPoolExecutor] = {}


def _reader_pool(threads: int) -> ThreadPoolExecutor:
    """A thread pool kept between loads (starting threads on every update costs time)."""
    with _POOL_LOCK:
        pool = _READER_POOLS.get(threads)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastload-reader")
            _READER_POOLS[threads] = pool
        return pool


def _workers(device: torch.device, count: int, chunk_bytes: int) -> List[_Worker]:
    key = (str(device), chunk_bytes)
    with _POOL_LOCK:
        pool = _WORKER_POOL.setdefault(key, [])
        while len(pool) < count:
            pool.append(_Worker(device, chunk_bytes))
        return pool[:count]


def _run_chunk(
    chunk: _Chunk,
    fd: int,
    params: Dict[str, torch.Tensor],
    worker: _Worker,
    on_bytes: Optional[Callable[[int], None]],
    fault: _FaultBudget,
) -> None:
    stats = worker.stats
    direct: List[CopyStep] = []
    staged: List[CopyStep] = []
    for step in chunk.steps:
        if not worker.cuda and step.view_is_dense and is_contiguous(step.dst):
            direct.append(step)
        else:
            staged.append(step)
    # CPU: bytes that are exactly the destination's go straight into the parameter.
    for step in direct:
        dst = params[step.param]
        address = dst.data_ptr() + step.dst[0] * step.itemsize
        for off, n in step.reads:
            _read_exact(fd, _writable_view(address, n), off, chunk.path, stats)
            address += n
    fault.spend(sum(s.nbytes for s in direct))
    if not staged:
        if on_bytes:
            on_bytes(chunk.nbytes)
        return
    # Lay out staged steps in one buffer; file-contiguous neighbours share one read.
    layout: List[Tuple[CopyStep, int]] = []
    pos = 0
    prev_end = None
    for step in staged:
        if prev_end == step.reads[0][0] and pos % step.itemsize == 0:
            start = pos
        else:
            start = _align(pos, _ALIGN)
        layout.append((step, start))
        pos = start + step.nbytes
        prev_end = step.reads[-1][0] + step.reads[-1][1]
    buf = worker.buffer(pos)
    base = buf.data_ptr()
    segments: List[List[int]] = []  # [file offset, nbytes, buffer position]
    for step, start in layout:
        p = start
        for off, n in step.reads:
            if segments and segments[-1][0] + segments[-1][1] == off and segments[-1][2] + segments[-1][1] == p:
                segments[-1][1] += n
            else:
                segments.append([off, n, p])
            p += n
    for off, n, p in segments:
        _read_exact(fd, _writable_view(base + p, n), off, chunk.path, stats)

    if worker.cuda:
        with torch.cuda.stream(worker.stream):
            # One host->device copy of the whole buffer, then every step's (possibly strided)
            # view copied on the device in one batched call: per-step copies from the host
            # cost a driver call each, which dominates on checkpoints of many small tensors.
            dev = worker.device_scratch(pos).narrow(0, 0, pos)
            dev.copy_(buf.narrow(0, 0, pos), non_blocking=True)
            dsts, srcs = [], []
            for step, start in layout:
                dst = _param_view(params[step.param], step.dst)
                src = dev.narrow(0, start, step.nbytes).view(dst.dtype)
                off, sizes, strides = step.view
                dsts.append(dst)
                srcs.append(src.as_strided(sizes, strides, src.storage_offset() + off))
            torch._foreach_copy_(dsts, srcs)
    else:
        for step, start in layout:
            dst = _param_view(params[step.param], step.dst)
            host = buf.narrow(0, start, step.nbytes).view(dst.dtype)
            off, sizes, strides = step.view
            dst.copy_(host.as_strided(sizes, strides, host.storage_offset() + off))
    worker.mark_in_use()
    fault.spend(sum(s.nbytes for s, _ in layout))
    if on_bytes:
        on_bytes(chunk.nbytes)



def execute_plan(
    plan: LoadPlan,
    params: Dict[str, torch.Tensor],
    *,
    device: torch.device,
    num_threads: int,
    chunk_bytes: int = 64 << 20,
    on_bytes: Optional[Callable[[int], None]] = None,
) -> ExecutionStats:
    """Read the plan's bytes and write them into the parameters.

    Args:
        plan: the plan for this checkpoint layout.
        params: ``{name: parameter data}`` of the live model (already checked against
            ``plan.param_meta``).
        device: where the parameters live.
        num_threads: reader threads.
        chunk_bytes: size of each reused host buffer.
        on_bytes: called with the bytes of each finished chunk (progress).

    Returns:
        Bytes read, read calls and seconds.

    Raises:
        CheckpointError: a file ended early (changed or truncated under us).
    """
    t0 = time.perf_counter()
    for z in plan.zeros:
        _param_view(params[z.param], z.dst).zero_()
    chunks = _chunks(plan, chunk_bytes)
    fault = _FaultBudget(take_injected_fault(), [fp.path for fp in plan.files])
    threads = max(1, min(num_threads, len(chunks)))
    workers = _workers(device, threads, chunk_bytes)
    for w in workers:
        w.stats = ExecutionStats()
    fds = {path: os.open(path, os.O_RDONLY) for path in {c.path for c in chunks}}
    try:
        if device.type == "cuda":
            # Side streams must see the parameters as they are now (zero-fills above).
            current = torch.cuda.current_stream(device)
            for w in workers:
                w.stream.wait_stream(current)
        local = threading.local()
        assign = iter(range(threads))
        assign_lock = threading.Lock()

        def worker_for_thread() -> _Worker:
            if not hasattr(local, "worker"):
                with assign_lock:
                    local.worker = workers[next(assign)]
            return local.worker

        def task(chunk: _Chunk) -> None:
            _run_chunk(chunk, fds[chunk.path], params, worker_for_thread(), on_bytes, fault)

        if threads == 1:
            for chunk in chunks:
                task(chunk)
        else:
            futures = [_reader_pool(threads).submit(task, c) for c in chunks]
            try:
                for f in futures:
                    f.result()
            finally:
                for f in futures:  # never return while a reader still writes into parameters
                    f.cancel()
                for f in futures:
                    if not f.cancelled():
                        f.exception()
        for w in workers:
            w.finish()
    finally:
        for fd in fds.values():
            os.close(fd)
    stats = ExecutionStats(
        bytes_read=sum(w.stats.bytes_read for w in workers),
        read_calls=sum(w.stats.read_calls for w in workers),
        seconds=time.perf_counter() - t0,
    )
    return stats
