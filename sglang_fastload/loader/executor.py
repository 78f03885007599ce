"""Execute a load plan: a pool of readers filling reused (pinned) buffers, copies overlapped.

Each worker thread owns two host buffers (pinned when the parameters live on an
accelerator) and, on CUDA, its own stream: while the device copies one buffer the thread
reads the next chunk into the other. Slices whose bytes are exactly the destination's
elements go straight into the parameter: on CPU read into its memory, on CUDA copied from
the buffer into it (through the CUDA runtime, ``cuda_runtime.py``); the others pass through
a device scratch and are copied from it by view. Strided slices with
short runs (row-parallel shards) are gathered element by element from a read-only mapping
of the file, so each rank copies only the bytes it keeps.

On CUDA, when ``zero_copy_share`` > 0 (off by default), one more thread pair, the zero-copy
lane, takes that share of the chunks (interleaved with the readers' chunks): it registers
the file's page-cache pages with CUDA and lets the device copy them with no CPU pass
(``host_memory.py`` says when both paths at once beat either alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import logging
import mmap
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sglang_fastload import constants
from sglang_fastload.errors import CheckpointError
from sglang_fastload.loader import cuda_runtime, host_memory
from sglang_fastload.loader.plan import STAGING_ALIGN, CopyStep, LoadPlan, aligned_nbytes, fill_chunks

logger = logging.getLogger(__name__)

# Share of a CUDA load's bytes sent through the zero-copy lane (see host_memory.py). Off by
# default: on an H200 host, 0.35 made re-reads of the same files 19-25 % faster, but a
# checkpoint written just before the update (every step of a training loop) 23-34 % slower:
# the first registration of new page-cache pages costs twice as much and holds the driver
# lock the readers' copies wait on (docs/benchmarks.md, "fresh files").
DEFAULT_ZERO_COPY_SHARE = 0.0
# Bytes per chunk (and per staging buffer). Small enough that every reader's two buffers stay
# in the CPU's last-level cache while the device copies them (staged bytes then cross host
# memory once), large enough that per-chunk interpreter work stays small. On H200 hosts, 16
# readers (docs/benchmarks.md, 2026-12-02): against 64 MiB, updates up to 1.4 x faster; 8 MiB
# slower on dense models; 4 MiB (chunks filled since) as fast on MoE and as fast or up to
# 1.5 x slower on dense, from one machine to the next; a third buffer per reader slower at
# every size. That host has 300 MiB of shared L3; smaller or split caches were not measured.
DEFAULT_CHUNK_BYTES = 6 << 20


@dataclasses.dataclass
class ExecutionStats:
    """What one execution did.

    Attributes:
        bytes_read, read_calls: bytes copied out of the files and the calls that did it.
        seconds: the whole execution.
        setup_seconds: binding views, buffers and mappings before the first read.
        register_seconds: the zero-copy lane's page-cache registrations (summed).
        read_seconds: reader threads in read calls and gathers (summed over threads).
        wait_seconds: reader threads waiting for the device to free a buffer (summed).
        issue_seconds: threads queueing device copies (summed, lane included).
        lane_wait_seconds: the lane's copier waiting for its registrar.
        threads_seconds: from the first read until every thread had queued its last copy.
        drain_seconds: after that, until the device had finished every copy.
    """

    bytes_read: int = 0
    read_calls: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    register_seconds: float = 0.0
    read_seconds: float = 0.0
    wait_seconds: float = 0.0
    issue_seconds: float = 0.0
    lane_wait_seconds: float = 0.0
    threads_seconds: float = 0.0
    drain_seconds: float = 0.0

    def phases(self) -> Dict[str, float]:
        """Where the time of the execution went, in seconds (summed ones may exceed it)."""
        names = ("setup", "threads", "drain", "read", "wait", "issue", "register", "lane_wait")
        return {name: round(getattr(self, name + "_seconds"), 4) for name in names}


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
    """Each file's steps, in file order, in full chunks of at most ``chunk_bytes`` (``fill_chunks``)."""
    return [
        _Chunk(fp.path, steps, sum(aligned_nbytes(st) for st in steps))
        for fp in plan.files
        for steps in fill_chunks(fp.steps, chunk_bytes)
    ]


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


class _FileMappings:
    """Read-only views of the files that gather steps copy from, made once per load.

    A private mapping of a read-only descriptor shares the page cache's pages (nothing is
    copied until written, and nothing writes); ``torch.frombuffer`` needs a writable buffer.
    Mappings last one load only: a mapped file that is deleted keeps its disk space.
    """

    def __init__(self, plan: LoadPlan, fds: Dict[str, int]):
        self.maps: Dict[str, mmap.mmap] = {}
        self.typed: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}
        for fp in plan.files:
            ends = [s.reads[0][0] + s.reads[0][1] for s in fp.steps if s.gather]
            if not ends:
                continue
            size = os.fstat(fds[fp.path]).st_size
            if size < max(ends):
                raise CheckpointError(
                    fp.path, f"file has {size} bytes but the plan reads up to byte {max(ends)} "
                    "(truncated or changed during the load)",
                )
            self.maps[fp.path] = mmap.mmap(fds[fp.path], 0, access=mmap.ACCESS_COPY)

    def elements(self, path: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole file as elements of ``dtype`` (gather offsets are element-aligned)."""
        key = (path, dtype)
        typed = self.typed.get(key)
        if typed is None:
            mapping = self.maps[path]
            itemsize = torch.empty((), dtype=dtype).element_size()
            typed = torch.frombuffer(mapping, dtype=dtype, count=len(mapping) // itemsize)
            self.typed[key] = typed
        return typed

    def view(self, path: str, step: CopyStep, dtype: torch.dtype) -> torch.Tensor:
        """The step's source elements, as a strided view of the mapped file."""
        offset, _ = step.reads[0]
        off, sizes, strides = step.view
        return self.elements(path, dtype).as_strided(sizes, strides, offset // step.itemsize + off)

    def close(self) -> None:
        self.typed.clear()
        for mapping in self.maps.values():
            try:
                mapping.close()
            except BufferError:
                pass  # a view is still referenced (e.g. by a traceback): unmapped when freed
        self.maps.clear()


def _param_view(param: torch.Tensor, geometry) -> torch.Tensor:
    off, sizes, strides = geometry
    return param.as_strided(sizes, strides, param.storage_offset() + off)


class _Worker:
    """Per-thread resources: two host buffers, their events, a stream and a device scratch.

    On CUDA, copies and events go straight to the CUDA runtime (``runtime``, see
    cuda_runtime.py) where it was found, else through torch.
    """

    def __init__(self, device: torch.device, chunk_bytes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers: List[Optional[torch.Tensor]] = [None, None]
        self.events: List[Optional[object]] = [None, None]
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.stream_handle = self.stream.cuda_stream if self.cuda else 0
        self.scratch: Optional[torch.Tensor] = None
        self.slab: Optional[torch.Tensor] = None  # what ``buffers`` are views of
        self.chunk_bytes = chunk_bytes
        self.runtime: Optional[cuda_runtime.CudaRuntime] = None
        self.event_handles: Optional[List[int]] = None  # the runtime's events, made on first use
        self.recorded = [False, False]
        self.stats = ExecutionStats()

    def needs_host(self, nbytes: int) -> bool:
        """True when a host buffer holds fewer than ``nbytes``."""
        return any(b is None or b.numel() < nbytes for b in self.buffers)

    def needs_scratch(self, nbytes: int) -> bool:
        """True when copies need ``nbytes`` of device scratch and it has fewer."""
        return self.cuda and nbytes > 0 and (self.scratch is None or self.scratch.numel() < nbytes)

    def wait(self, i: int) -> None:
        """Block until the device is done with host buffer ``i``."""
        if self.recorded[i]:
            if not self.runtime.done(self.event_handles[i]):  # asking keeps the interpreter lock
                self.runtime.wait(self.event_handles[i])
            self.recorded[i] = False
        elif self.events[i] is not None:
            self.events[i].synchronize()
            self.events[i] = None

    def mark_in_use(self, i: int) -> None:
        """Note that copies queued so far on the stream read host buffer ``i``."""
        if not self.cuda:
            return
        if self.runtime is not None:
            if self.event_handles is None:  # made here: the stream's device is current
                self.event_handles = [self.runtime.new_event(), self.runtime.new_event()]
            self.runtime.record(self.event_handles[i], self.stream_handle)
            self.recorded[i] = True
        else:
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.events[i] = ev

    def issue(self, chunk: "_BoundChunk") -> None:
        """Queue a staged chunk's copies on this worker's stream (which must be current)."""
        if self.runtime is not None:
            for dst, src, n in chunk.copies:
                self.runtime.copy_to_device(dst, src, n, self.stream_handle)
        else:
            for dst, src in chunk.copy_views:
                dst.copy_(src, non_blocking=True)
        if chunk.dsts:
            torch._foreach_copy_(chunk.dsts, chunk.srcs)
        self.mark_in_use(chunk.buffer)

    def finish(self) -> None:
        if self.cuda:
            self.stream.synchronize()
        self.events = [None, None]
        self.recorded = [False, False]


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


def _reserve(workers: List[_Worker], sizes: List[Tuple[int, int]]) -> None:
    """Give every worker the host buffers and device scratch its ``(host, scratch)`` bytes need.

    The host buffers of all those workers come from one slab: pinning is paid per call
    (registering one large huge-page slab costs a fraction of registering many buffers).
    Scratch is made only where some copy cannot go straight into a parameter.
    """
    short = [(w, max(host, w.chunk_bytes)) for w, (host, _) in zip(workers, sizes) if w.needs_host(host)]
    for w, _ in short:
        w.finish()  # nothing queued may still use a buffer about to be replaced
        w.buffers = [None, None]  # drop old registrations before making the next
    if short:
        cuda = short[0][0].cuda
        total = sum(2 * size for _, size in short)
        slab = host_memory.pinned_empty(total) if cuda else torch.empty(total, dtype=torch.uint8)
        pos = 0
        for w, size in short:
            w.buffers = [slab.narrow(0, pos, size), slab.narrow(0, pos + size, size)]
            w.slab = slab  # keeps the registration (made for the slab tensor) alive
            pos += 2 * size
    for w, (_, scratch) in zip(workers, sizes):
        if w.needs_scratch(scratch):
            w.finish()
            w.scratch = None
            w.scratch = torch.empty(max(scratch, w.chunk_bytes), dtype=torch.uint8, device=w.device)


def _workers(device: torch.device, count: int, chunk_bytes: int) -> List[_Worker]:
    key = (str(device), chunk_bytes)
    with _POOL_LOCK:
        pool = _WORKER_POOL.setdefault(key, [])
        while len(pool) < count:
            pool.append(_Worker(device, chunk_bytes))
        return pool[:count]


_PREPARING: Dict[Tuple[str, int], threading.Thread] = {}


def prepare_in_background(device: torch.device, num_threads: int, chunk_bytes: int, zero_copy_share: float) -> None:
    """Make a CUDA load's streams and pinned buffers on a background thread.

    They cost ~0.16 s on an H200 host (pinning dominates) the first time a process loads;
    started before the model is built, they are ready by the time its weights are read.
    The first load waits for them (``_bind``). No-op off CUDA or when already made.

    Args:
        device: the CUDA device the parameters live on (with its index).
        num_threads, chunk_bytes, zero_copy_share: the load's settings (as for ``execute_plan``).
    """
    if device.type != "cuda":
        return
    key = (str(device), chunk_bytes)
    count = max(1, num_threads) + (1 if zero_copy_share > 0 else 0)
    with _POOL_LOCK:
        if key in _PREPARING or len(_WORKER_POOL.get(key, ())) >= count:
            return

    def run() -> None:
        try:
            with torch.cuda.device(device):
                workers = _workers(device, count, chunk_bytes)
                _reserve(workers, [(chunk_bytes, 0)] * count)
        except Exception as exc:  # the load makes what is missing itself
            logger.info("sglang-fastload: buffers not prepared in advance (%s: %s)", type(exc).__name__, exc)

    thread = threading.Thread(target=run, name="fastload-prepare", daemon=True)
    with _POOL_LOCK:
        _PREPARING[key] = thread
    thread.start()


def _wait_prepared(device: torch.device, chunk_bytes: int) -> None:
    with _POOL_LOCK:
        thread = _PREPARING.pop((str(device), chunk_bytes), None)
    if thread is not None:
        thread.join()


@dataclasses.dataclass
class _BoundChunk:
    """One chunk with every view it needs made in advance (parameters don't move between
    updates, nor do the worker's buffers), so an update runs no per-step Python beyond a
    read call per contiguous run and a copy per gathered slice.

    Attributes:
        file: index of the chunk's file in ``plan.files``.
        nbytes: bytes of the chunk (progress).
        direct: ``(parameter memory, file offset)``: CPU reads straight into parameters,
            merged where both sides are contiguous.
        gathers: ``(destination, step)``: elements gathered from the file mapping into a
            parameter (CPU) or into the staging buffer (CUDA).
        buffer: which of the worker's two host buffers stages the rest (-1: none).
        segments: ``(buffer memory, file offset)`` reads into that buffer.
        places: ``(file offset, nbytes, buffer position)`` of the same reads (the zero-copy
            lane copies them from the page cache into the device scratch instead).
        staged_bytes: bytes of the buffer in use.
        copies: CUDA: ``(device address, host address, nbytes)`` copies of the staged bytes,
            straight into parameters where the bytes are the destination's elements, else
            into the device scratch; ``copy_views``: the same as tensors (torch's copies).
        dsts, srcs: the copies out of the staged bytes that need more than a byte copy
            (strided, gathered or converted: on CUDA, out of the device scratch).
        device: the scratch prefix of ``staged_bytes`` (zero-copy lane chunks only).
        fault_bytes: bytes counted against an injected fault.
    """

    file: int
    nbytes: int
    direct: List[Tuple[memoryview, int]]
    gathers: List[Tuple[torch.Tensor, CopyStep]]
    buffer: int
    segments: List[Tuple[memoryview, int]]
    places: List[Tuple[int, int, int]]
    staged_bytes: int
    copies: List[Tuple[int, int, int]]
    copy_views: List[Tuple[torch.Tensor, torch.Tensor]]
    dsts: List[torch.Tensor]
    srcs: List[torch.Tensor]
    device: Optional[torch.Tensor]
    fault_bytes: int


@dataclasses.dataclass
class _Binding:
    """A plan bound to one set of parameters and workers: chunks per worker, in order."""

    steps_lists: Tuple[List[CopyStep], ...]  # kept alive so their ids stay unique
    param_ptrs: Tuple[int, ...]
    workers: List[_Worker]
    buffers: List[Tuple[Optional[torch.Tensor], ...]]
    per_worker: List[List[_BoundChunk]]
    zeros: List[torch.Tensor]
    lane: int = -1  # index of the zero-copy lane in ``workers`` (-1: none)
    runtime: Optional[cuda_runtime.CudaRuntime] = None  # what ``copies`` were bound for


def _same_dtype(step: CopyStep, params: Dict[str, torch.Tensor]) -> bool:
    # Bytes of another dtype are staged, then converted by the copy (as upstream's copy_ does).
    return step.src_dtype is None or step.src_dtype == params[step.param].dtype


def _reads_into_parameter(step: CopyStep, params: Dict[str, torch.Tensor]) -> bool:
    """CPU: the step's bytes are exactly the destination's elements, so read them in place."""
    return step.view_is_dense and step.dst_is_contiguous and _same_dtype(step, params)


def _device_bytes(tensor: torch.Tensor, byte_offset: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` of ``tensor``'s storage from ``byte_offset`` past its first element, as uint8."""
    flat = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    start = tensor.storage_offset() * tensor.element_size() + byte_offset
    return flat.set_(tensor.untyped_storage(), start, (nbytes,), (1,))


def _goes_straight(step: CopyStep, params: Dict[str, torch.Tensor], cuda: bool, via_scratch: bool) -> bool:
    """CUDA: the staged bytes of ``step`` are copied straight into its parameter.

    A gathered step is staged densely (``dense_view``): its bytes are the destination's
    elements in order whenever the destination is contiguous (row-parallel shards are).
    """
    if not cuda or via_scratch:
        return False
    if step.gather:
        return step.dst_is_contiguous and _same_dtype(step, params)
    return _reads_into_parameter(step, params)


def _bind_chunk(
    chunk: _Chunk, file_index: int, params: Dict[str, torch.Tensor], worker: _Worker, turn: int, via_scratch: bool = False
) -> _BoundChunk:
    cuda = worker.cuda
    direct: List[Tuple[int, int, int]] = []  # (address, file offset, nbytes), merged
    gathers: List[Tuple[torch.Tensor, CopyStep]] = []
    staged: List[CopyStep] = []
    for step in chunk.steps:
        if cuda:
            staged.append(step)
        elif step.gather:
            gathers.append((_param_view(params[step.param], step.dst), step))
        elif _reads_into_parameter(step, params):
            address = params[step.param].data_ptr() + step.dst[0] * step.itemsize
            for off, n in step.reads:
                last = direct[-1] if direct else None
                if last and last[0] + last[2] == address and last[1] + last[2] == off:
                    direct[-1] = (last[0], last[1], last[2] + n)
                else:
                    direct.append((address, off, n))
                address += n
        else:
            staged.append(step)
    bound = _BoundChunk(
        file=file_index, nbytes=chunk.nbytes,
        direct=[(_writable_view(a, n), off) for a, off, n in direct],
        gathers=gathers, buffer=-1, segments=[], places=[], staged_bytes=0, copies=[], copy_views=[],
        dsts=[], srcs=[], device=None, fault_bytes=chunk.nbytes,
    )
    if not staged:
        return bound
    # Lay out staged steps in one buffer; file-contiguous neighbours share one read.
    layout: List[Tuple[CopyStep, int]] = []
    pos = 0
    prev_end = None
    for step in staged:
        if not step.gather and prev_end == step.reads[0][0] and pos % step.itemsize == 0:
            start = pos
        else:
            start = _align(pos, STAGING_ALIGN)
        layout.append((step, start))
        pos = start + step.nbytes
        prev_end = None if step.gather else step.reads[-1][0] + step.reads[-1][1]
    buf = worker.buffers[turn]
    segments: List[List[int]] = []  # [file offset, nbytes, buffer position]
    for step, start in layout:
        if step.gather:
            dtype = step.src_dtype or params[step.param].dtype
            gathers.append((buf.narrow(0, start, step.nbytes).view(dtype).view(step.view[1]), step))
            continue
        p = start
        for off, n in step.reads:
            if segments and segments[-1][0] + segments[-1][1] == off and segments[-1][2] + segments[-1][1] == p:
                segments[-1][1] += n
            else:
                segments.append([off, n, p])
            p += n
    base = buf.data_ptr()
    bound.buffer = turn
    bound.segments = [(_writable_view(base + p, n), off) for off, n, p in segments]
    bound.places = [tuple(x) for x in segments]
    bound.staged_bytes = pos
    # CUDA copies of the staged bytes: [target (parameter name or "" for the scratch),
    # byte offset in the target, buffer position, nbytes], merged where both sides continue.
    spans: List[List] = []
    for step, start in layout:
        if _goes_straight(step, params, cuda, via_scratch):
            param = params[step.param]
            target, at = step.param, step.dst[0] * param.element_size()
        elif cuda:
            target, at = "", start
        else:
            target = None
        if target is not None:
            last = spans[-1] if spans else None
            if last and last[0] == target and last[1] + last[3] == at and last[2] + last[3] == start:
                last[3] += step.nbytes
            else:
                spans.append([target, at, start, step.nbytes])
            if target:
                continue
        source = worker.scratch if cuda else buf
        dst = _param_view(params[step.param], step.dst)
        src = source.narrow(0, start, step.nbytes).view(step.src_dtype or dst.dtype)
        off, sizes, strides = step.dense_view if step.gather else step.view
        bound.dsts.append(dst)
        bound.srcs.append(src.as_strided(sizes, strides, src.storage_offset() + off))
    for target, at, p, n in spans:
        device_tensor = params[target] if target else worker.scratch
        if worker.runtime is not None:
            bound.copies.append((device_tensor.data_ptr() + at, base + p, n))
        else:
            bound.copy_views.append((_device_bytes(device_tensor, at, n), buf.narrow(0, p, n)))
    if via_scratch:
        bound.device = worker.scratch.narrow(0, 0, pos)
    return bound


def _staged_size(chunk: _Chunk, cuda: bool, params: Dict[str, torch.Tensor], via_scratch: bool = False) -> Tuple[int, int]:
    """Upper bounds of the host buffer and device scratch bytes ``_bind_chunk`` uses for a chunk."""
    total = 0
    scratch = False
    for step in chunk.steps:
        if cuda or not (step.gather or _reads_into_parameter(step, params)):
            total = _align(total, STAGING_ALIGN) + step.nbytes
            scratch = scratch or (cuda and not _goes_straight(step, params, cuda, via_scratch))
    return total, (total if scratch else 0)


# Bindings kept per cache (one cache per model: its views keep only that model's memory).
_MAX_BINDINGS = 2


def _split_for_lane(chunks: List[_Chunk], share: float) -> Tuple[List[_Chunk], List[_Chunk]]:
    """Chunks for the zero-copy lane (about ``share`` of the bytes, spread over the load) and
    the rest. The lane takes only chunks without gathered steps (those need a CPU pass)."""
    lane: List[_Chunk] = []
    rest: List[_Chunk] = []
    seen = taken = 0
    for c in chunks:
        seen += c.nbytes
        if share > 0 and taken < share * seen and not any(st.gather for st in c.steps):
            lane.append(c)
            taken += c.nbytes
        else:
            rest.append(c)
    return lane, rest


def _direct_runtime() -> Optional[cuda_runtime.CudaRuntime]:
    """The CUDA runtime for the readers' own copies, unless switched off (constants.py)."""
    if os.environ.get(constants.ENV_DIRECT_CUDA_CALLS, "1") == "0":
        return None
    return cuda_runtime.runtime()


def _bind(
    plan: LoadPlan,
    params: Dict[str, torch.Tensor],
    device: torch.device,
    threads: int,
    chunk_bytes: int,
    cache: Optional[dict],
    zero_copy_share: float = 0.0,
) -> _Binding:
    """Chunks of ``plan`` with their views made, dealt round-robin to ``threads`` workers
    (plus, on CUDA with ``zero_copy_share`` > 0, the zero-copy lane's chunks to one more).

    Reused from ``cache`` while the parameters and the workers' buffers stay where they
    were (checked by address on every call); a plan rebound to other files of the same
    layout reuses it too.
    """
    cache = {} if cache is None else cache
    steps_lists = tuple(fp.steps for fp in plan.files)
    names = sorted(plan.param_meta)
    ptrs = tuple(params[n].data_ptr() for n in names)
    cuda = device.type == "cuda"
    share = zero_copy_share if cuda else 0.0
    runtime = _direct_runtime() if cuda else None
    key = (tuple(map(id, steps_lists)), str(device), threads, chunk_bytes, share, runtime is not None)
    bound = cache.get(key)
    if bound is not None and bound.param_ptrs == ptrs and all(
        all(x is y for x, y in zip(tuple(w.buffers) + (w.scratch,), b)) for w, b in zip(bound.workers, bound.buffers)
    ):
        return bound
    lane_chunks, chunks = _split_for_lane(_chunks(plan, chunk_bytes), share)
    _wait_prepared(device, chunk_bytes)
    threads = max(1, min(threads, len(chunks)))
    workers = _workers(device, threads + (1 if lane_chunks else 0), chunk_bytes)
    file_index = {fp.path: i for i, fp in enumerate(plan.files)}
    dealt: List[List[_Chunk]] = [chunks[w::threads] for w in range(threads)]
    if lane_chunks:
        dealt.append(lane_chunks)
    lane = threads if lane_chunks else -1
    sizes = []
    for k, mine in enumerate(dealt):
        staged = [_staged_size(c, cuda, params, k == lane) for c in mine]
        sizes.append((max([h for h, _ in staged] + [0]), max([d for _, d in staged] + [0])))
    _reserve(workers, sizes)
    per_worker = []
    for k, (w, mine) in enumerate(zip(workers, dealt)):
        w.runtime = runtime  # _bind_chunk binds addresses (runtime) or tensors (torch)
        per_worker.append([_bind_chunk(c, file_index[c.path], params, w, i % 2, k == lane) for i, c in enumerate(mine)])
    bound = _Binding(
        steps_lists=steps_lists,
        param_ptrs=ptrs,
        workers=workers,
        buffers=[tuple(w.buffers) + (w.scratch,) for w in workers],
        per_worker=per_worker,
        zeros=[_param_view(params[z.param], z.dst) for z in plan.zeros],
        lane=lane,
        runtime=runtime,
    )
    cache.pop(key, None)
    cache[key] = bound
    while len(cache) > _MAX_BINDINGS:
        cache.pop(next(iter(cache)))
    return bound


def _run_bound(
    chunk: _BoundChunk,
    path: str,
    fd: int,
    worker: _Worker,
    on_bytes: Optional[Callable[[int], None]],
    fault: _FaultBudget,
    mappings: _FileMappings,
) -> None:
    stats = worker.stats
    t0 = time.perf_counter()
    wait = 0.0
    for view, off in chunk.direct:
        _read_exact(fd, view, off, path, stats)
    if chunk.buffer >= 0:
        t1 = time.perf_counter()
        worker.wait(chunk.buffer)
        wait = time.perf_counter() - t1
        for view, off in chunk.segments:
            _read_exact(fd, view, off, path, stats)
    for dst, step in chunk.gathers:
        dst.copy_(mappings.view(path, step, step.src_dtype or dst.dtype))
        stats.bytes_read += step.nbytes
    t3 = time.perf_counter()
    stats.wait_seconds += wait
    stats.read_seconds += t3 - t0 - wait
    if chunk.buffer >= 0:
        if worker.cuda:
            worker.issue(chunk)  # the worker's stream is current (``_on_stream``)
        else:
            torch._foreach_copy_(chunk.dsts, chunk.srcs)
        stats.issue_seconds += time.perf_counter() - t3
    fault.spend(chunk.fault_bytes)
    if on_bytes:
        on_bytes(chunk.nbytes)


@dataclasses.dataclass
class _LaneItem:
    """A zero-copy lane chunk whose pages the registrar has registered.

    Attributes:
        chunk: the bound chunk.
        copies: ``(device scratch piece, registered host view)`` pairs, each inside one
            registration; None when the file could not be mapped (the chunk is staged).
    """

    chunk: _BoundChunk
    copies: Optional[List[Tuple[torch.Tensor, torch.Tensor]]]


_LANE_END = None  # what the registrar queues after its last chunk


def _register_lane(
    chunks: List[_BoundChunk],
    paths: List[str],
    mapped: Dict[str, Optional[host_memory.MappedFile]],
    ready: "queue.SimpleQueue",
    failed: threading.Event,
    stats: ExecutionStats,
) -> None:
    """Zero-copy lane, first thread: map the files and register the page ranges each chunk
    needs, in order, handing each chunk to the copying thread as soon as it is registered.

    Registration holds one driver lock for ~25 ms per GB; on a thread of its own it does not
    wait for this lane's copies to be queued. (The lock still slows every thread's copies:
    docs/benchmarks.md, "late".)
    """
    try:
        for chunk in chunks:
            if failed.is_set():
                return
            path = paths[chunk.file]
            if path not in mapped:
                mapped[path] = host_memory.open_mapped(path)
            mapping = mapped[path]
            if mapping is None:
                ready.put(_LaneItem(chunk, None))
                continue
            t0 = time.perf_counter()
            for off, n, _ in chunk.places:
                if off + n > mapping.size:
                    raise CheckpointError(
                        path, f"file has {mapping.size} bytes but the plan reads up to byte {off + n} "
                        "(truncated or changed during the load)",
                    )
                mapping.ensure(off, n)
            # Pieces are cut now: later registrations never split a range already covered.
            copies = [
                (chunk.device.narrow(0, p + o - off, m), mapping.view(o, m))
                for off, n, p in chunk.places
                for o, m in mapping.pieces(off, n)
            ]
            stats.register_seconds += time.perf_counter() - t0
            ready.put(_LaneItem(chunk, copies))
    finally:
        ready.put(_LANE_END)


def _copy_lane(
    ready: "queue.SimpleQueue",
    paths: List[str],
    fds: Dict[str, int],
    worker: _Worker,
    on_bytes: Optional[Callable[[int], None]],
    fault: _FaultBudget,
    mappings: _FileMappings,
    failed: threading.Event,
) -> None:
    """Zero-copy lane, second thread: queue the device copies of each registered chunk."""
    stats = worker.stats
    while True:
        t0 = time.perf_counter()
        item = ready.get()
        t1 = time.perf_counter()
        stats.lane_wait_seconds += t1 - t0
        if item is _LANE_END or failed.is_set():
            return
        chunk = item.chunk
        if item.copies is None:
            path = paths[chunk.file]
            _run_bound(chunk, path, fds[path], worker, on_bytes, fault, mappings)
            continue
        for dst, src in item.copies:
            dst.copy_(src, non_blocking=True)
        torch._foreach_copy_(chunk.dsts, chunk.srcs)
        stats.issue_seconds += time.perf_counter() - t1
        stats.read_calls += len(item.copies)
        stats.bytes_read += sum(n for _, n, _ in chunk.places)
        fault.spend(chunk.fault_bytes)
        if on_bytes:
            on_bytes(chunk.nbytes)


def _on_stream(worker: _Worker):
    """Make the worker's stream (and its device) current on this thread for its whole task:
    entered once per load, not once per chunk."""
    return torch.cuda.stream(worker.stream) if worker.cuda else contextlib.nullcontext()


def execute_plan(
    plan: LoadPlan,
    params: Dict[str, torch.Tensor],
    *,
    device: torch.device,
    num_threads: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_bytes: Optional[Callable[[int], None]] = None,
    cache: Optional[dict] = None,
    zero_copy_share: float = DEFAULT_ZERO_COPY_SHARE,
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
        cache: where to keep the plan's bound views for the next call with the same
            parameters (owned by the model, so it lives and dies with it); None: no reuse.
        zero_copy_share: on CUDA, the share of bytes copied straight from registered page
            cache by the zero-copy lane (0: staging buffers only).

    Returns:
        Bytes read, read calls and seconds.

    Raises:
        CheckpointError: a file ended early (changed or truncated under us).
    """
    t0 = time.perf_counter()
    fault = _FaultBudget(take_injected_fault(), [fp.path for fp in plan.files])
    host_memory.wait_for_releases()  # the previous load's mappings are gone before new ones
    bound = _bind(plan, params, device, num_threads, chunk_bytes, cache, zero_copy_share)
    workers = bound.workers
    for w in workers:
        w.stats = ExecutionStats()
        w.runtime = bound.runtime  # workers are shared by bindings made with and without it
    for view in bound.zeros:
        view.zero_()
    paths = [fp.path for fp in plan.files]
    fds = {path: os.open(path, os.O_RDONLY) for path in paths}
    mappings = None
    mapped: Dict[str, Optional[host_memory.MappedFile]] = {}
    registrar_stats = ExecutionStats()
    try:
        mappings = _FileMappings(plan, fds)
        if device.type == "cuda":
            # Side streams must see the parameters as they are now (zero-fills above).
            current = torch.cuda.current_stream(device)
            for w in workers:
                w.stream.wait_stream(current)

        failed = threading.Event()
        setup_seconds = time.perf_counter() - t0
        ready: "queue.SimpleQueue" = queue.SimpleQueue()

        def task(index: int) -> None:
            try:
                if index == len(workers):
                    _register_lane(bound.per_worker[bound.lane], paths, mapped, ready, failed, registrar_stats)
                    return
                with _on_stream(workers[index]):
                    if index == bound.lane:
                        _copy_lane(ready, paths, fds, workers[index], on_bytes, fault, mappings, failed)
                        return
                    for chunk in bound.per_worker[index]:
                        if failed.is_set():
                            return  # another reader failed: the load is abandoned
                        path = paths[chunk.file]
                        _run_bound(chunk, path, fds[path], workers[index], on_bytes, fault, mappings)
            except BaseException:
                failed.set()
                raise

        tasks = len(workers) + (1 if bound.lane >= 0 else 0)
        if tasks == 1:
            task(0)
        else:
            pool = _reader_pool(tasks)
            # The registrar (last index) first: the lane's copier waits for it.
            futures = [pool.submit(task, i) for i in reversed(range(tasks))]
            try:
                for f in futures:
                    f.result()
            finally:
                for f in futures:  # never return while a reader still writes into parameters
                    f.cancel()
                for f in futures:
                    if not f.cancelled():
                        f.exception()
        threads_end = time.perf_counter()
        for w in workers:
            w.finish()
        drain_seconds = time.perf_counter() - threads_end
        host_memory.release_later([m for m in mapped.values() if m is not None])
        mapped.clear()
    finally:
        if mapped:  # a failed load: no copy from the mappings may still be queued
            if bound.lane >= 0:
                workers[bound.lane].finish()
            for m in mapped.values():
                if m is not None:
                    m.release()
        if mappings is not None:
            mappings.close()
        for fd in fds.values():
            os.close(fd)
    summed = {
        name: sum(getattr(w.stats, name) for w in workers)
        for name in ("bytes_read", "read_calls", "read_seconds", "wait_seconds", "issue_seconds", "lane_wait_seconds")
    }
    return ExecutionStats(
        seconds=time.perf_counter() - t0,
        setup_seconds=setup_seconds,
        register_seconds=registrar_stats.register_seconds,
        threads_seconds=threads_end - t0 - setup_seconds,
        drain_seconds=drain_seconds,
        **summed,
    )
