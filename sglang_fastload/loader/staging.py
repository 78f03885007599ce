"""Each reader's staging resources, kept between loads: two host buffers (pinned on CUDA),
their events, a stream and a device scratch; the reader thread pool; and their preparation
in the background while a model is built.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch

from sglang_fastload.errors import CheckpointError
from sglang_fastload.loader import cuda_runtime, host_memory
from sglang_fastload.loader.execution_stats import ExecutionStats

if TYPE_CHECKING:
    from sglang_fastload.loader.binding import BoundChunk

logger = logging.getLogger(__name__)


class Worker:
    """Per-thread resources: two host buffers, their events, a stream and a device scratch.

    On CUDA, copies and events go straight to the CUDA runtime (``runtime``, see
    cuda_runtime.py) where it was found, else through torch.
    """

    def __init__(self, device: torch.device, chunk_bytes: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.buffers: List[Optional[torch.Tensor]] = [None, None]
        self._buffer_bytes: List[Optional[tuple]] = [None, None]  # (buffer, its bytes)
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

    def buffer_bytes(self, i: int) -> memoryview:
        """Host buffer ``i`` as writable bytes (made once per buffer; slices of it are the
        read targets of the chunks it stages)."""
        buffer = self.buffers[i]
        made = self._buffer_bytes[i]
        if made is None or made[0] is not buffer:
            made = self._buffer_bytes[i] = (buffer, memoryview(buffer.numpy()))
        return made[1]

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

    def issue(self, chunk: "BoundChunk") -> None:
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
_WORKER_POOL: Dict[Tuple[str, int], List[Worker]] = {}
_POOL_LOCK = threading.Lock()


_READER_POOLS: Dict[Tuple[int, str], ThreadPoolExecutor] = {}


def reader_pool(threads: int, name: str = "fastload-reader") -> ThreadPoolExecutor:
    """A thread pool kept between loads (starting threads on every update costs time).

    Args:
        threads: its size.
        name: its threads' name prefix; pools of other names are others (the shared rounds
            read on a pool of their own while the readers' pool is busy).
    """
    with _POOL_LOCK:
        pool = _READER_POOLS.get((threads, name))
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
            _READER_POOLS[(threads, name)] = pool
        return pool


def read_exact(fd: int, view: memoryview, offset: int, path: str) -> int:
    """Fill ``view`` with the file's bytes from ``offset``.

    Returns:
        The read calls it took.

    Raises:
        CheckpointError: the file ended first (truncated or changed during the load).
    """
    done = 0
    calls = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        calls += 1
        if n <= 0:
            raise CheckpointError(
                path,
                f"file ended at byte {offset + done} while {total - done} more bytes were "
                "expected (truncated or changed during the load)",
            )
        done += n
    return calls


def reserve(workers: List[Worker], sizes: List[Tuple[int, int]]) -> None:
    """Give every worker the host buffers and device scratch its ``(host, scratch)`` bytes need.

    The host buffers of all those workers come from one slab: pinning is paid per call
    (registering one large huge-page slab costs a fraction of registering many buffers).
    Scratch is made only where some copy cannot go straight into a parameter.
    """
    short = [(w, max(host, w.chunk_bytes)) for w, (host, _) in zip(workers, sizes) if w.needs_host(host)]
    for w, _ in short:
        w.finish()  # nothing queued may still use a buffer about to be replaced
        w.buffers = [None, None]  # drop old registrations before making the next
        w._buffer_bytes = [None, None]  # and the views of them (``buffer_bytes``)
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


def workers_for(device: torch.device, count: int, chunk_bytes: int) -> List[Worker]:
    """The process's first ``count`` readers for ``device`` and ``chunk_bytes``, made if missing.

    Args:
        device: where the parameters live.
        count: readers needed.
        chunk_bytes: their chunk size (readers of other sizes are another pool).

    Returns:
        The readers, kept between loads (their buffers are reserved by ``reserve``).
    """
    key = (str(device), chunk_bytes)
    with _POOL_LOCK:
        pool = _WORKER_POOL.setdefault(key, [])
        while len(pool) < count:
            pool.append(Worker(device, chunk_bytes))
        return pool[:count]


def release_workers(device: torch.device, chunk_bytes: int) -> None:
    """Forget the readers of ``device`` and ``chunk_bytes``; their pinned buffers are freed
    with them, once their queued copies are done, on a thread of their own (unpinning took
    ~25 ms per GiB on an H200 host, on a first start's path) where nothing else holds them.
    The next ``workers_for`` makes new ones.
    """
    wait_prepared(device, chunk_bytes)  # a background preparation would otherwise refill the pool
    with _POOL_LOCK:
        workers = _WORKER_POOL.pop((str(device), chunk_bytes), [])
    _finish_all(workers)  # not a loop here: its variable would keep the last worker in this frame
    if workers:
        threading.Thread(target=workers.clear, name="fastload-free", daemon=True).start()


def _finish_all(workers: List[Worker]) -> None:
    for w in workers:
        w.finish()


_PREPARING: Dict[Tuple[str, int], threading.Thread] = {}


def prepare_in_background(device: torch.device, num_threads: int, chunk_bytes: int, zero_copy_share: float) -> None:
    """Make a CUDA load's streams and pinned buffers on a background thread.

    They cost ~0.16 s on an H200 host (pinning dominates) the first time a process loads;
    started before the model is built, they are ready by the time its weights are read.
    The first load waits for them (``binding.bind``). No-op off CUDA or when already made.

    Args:
        device: the CUDA device the parameters live on (with its index).
        num_threads, chunk_bytes, zero_copy_share: the load's settings (as for ``executor.execute_plan``).
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
                workers = workers_for(device, count, chunk_bytes)
                reserve(workers, [(chunk_bytes, 0)] * count)
        except Exception as exc:  # the load makes what is missing itself
            logger.info("sglang-fastload: buffers not prepared in advance (%s: %s)", type(exc).__name__, exc)

    thread = threading.Thread(target=run, name="fastload-prepare", daemon=True)
    with _POOL_LOCK:
        _PREPARING[key] = thread
    thread.start()


def wait_prepared(device: torch.device, chunk_bytes: int) -> None:
    """Wait for ``prepare_in_background``'s thread for these settings, if one is running."""
    with _POOL_LOCK:
        thread = _PREPARING.pop((str(device), chunk_bytes), None)
    if thread is not None:
        thread.join()
