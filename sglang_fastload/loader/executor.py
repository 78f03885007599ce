"""Execute a load plan: a pool of readers filling reused (pinned) buffers, copies overlapped.

Each reader thread owns two host buffers (pinned when the parameters live on an
accelerator) and, on CUDA, its own stream (``staging.py``): while the device copies one
buffer the thread reads the next chunk into the other. What each chunk reads and copies is
bound once per model (``binding.py``). Slices whose bytes are exactly the destination's
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
import dataclasses
import errno
import logging
import mmap
import os
import queue
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sglang_fastload import constants
from sglang_fastload.errors import CheckpointError
from sglang_fastload.loader import host_memory, shared_layout, shared_spans
from sglang_fastload.loader.binding import Binding, BoundChunk, bind, direct_runtime
from sglang_fastload.loader.execution_stats import ExecutionStats
from sglang_fastload.loader.plan import CopyStep, LoadPlan
from sglang_fastload.loader.scratch_copies import zero_fills
from sglang_fastload.loader.staging import Worker, prepare_in_background, read_exact, reader_pool

__all__ = ["DEFAULT_CHUNK_BYTES", "DEFAULT_ZERO_COPY_SHARE", "ExecutionStats", "execute_plan", "prepare_in_background"]

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


def _read_exact(fd: int, view: memoryview, offset: int, path: str, stats: ExecutionStats) -> None:
    stats.read_calls += read_exact(fd, view, offset, path)
    stats.bytes_read += len(view)


def _check_gather_spans(plan: LoadPlan, fds: Dict[str, int]) -> None:
    """Every file holds the spans its gather steps copy from (a mapping past a file's end
    would fault); raises ``CheckpointError`` naming the file otherwise."""
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


class _FileMappings:
    """One reader thread's read-only views of the files its gather steps copy from, each
    file mapped on first use; made once per load.

    Every reader maps the files itself: threads faulting pages into one shared mapping
    contend for it (on 2 CPUs, one process's 2 threads gathered 6.9-11.5 GB/s from one
    mapping and 9.5-13.2 GB/s from one mapping each, faster in each of five interleaved
    pairs; docs/benchmarks.md). A private mapping of a read-only descriptor shares the page
    cache's pages (nothing is copied until written, and nothing writes); ``torch.frombuffer``
    needs a writable buffer. Mappings last one load only: a mapped file that is deleted
    keeps its disk space.
    """

    def __init__(self, fds: Dict[str, int]):
        self.fds = fds
        self.maps: Dict[str, mmap.mmap] = {}
        self.typed: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}

    def elements(self, path: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole file as elements of ``dtype`` (gather offsets are element-aligned)."""
        key = (path, dtype)
        typed = self.typed.get(key)
        if typed is None:
            mapping = self.maps.get(path)
            if mapping is None:
                mapping = self.maps[path] = mmap.mmap(self.fds[path], 0, access=mmap.ACCESS_COPY)
            itemsize = torch.empty((), dtype=dtype).element_size()
            typed = torch.frombuffer(mapping, dtype=dtype, count=len(mapping) // itemsize)
            self.typed[key] = typed
        return typed

    def view(self, path: str, step: CopyStep, dtype: torch.dtype) -> torch.Tensor:
        """The step's source elements, as a strided view of the mapped file."""
        offset, _ = step.reads[0]
        off, sizes, strides = step.view
        return self.elements(path, dtype).as_strided(sizes, strides, offset // step.itemsize + off)

    def release(self) -> None:
        """Unmap every file (``host_memory.release_later`` calls this off the load's path:
        tearing down the pages the gathers touched costs ~0.1 s at TP=4..8)."""
        self.typed.clear()
        for mapping in self.maps.values():
            try:
                mapping.close()
            except BufferError:
                pass  # a view is still referenced (e.g. by a traceback): unmapped when freed
        self.maps.clear()


def _run_bound(
    chunk: BoundChunk,
    path: str,
    fd: int,
    worker: Worker,
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
    t2 = time.perf_counter()
    for dst, step in chunk.gathers:
        dst.copy_(mappings.view(path, step, step.src_dtype or dst.dtype))
        stats.bytes_read += step.nbytes
    t3 = time.perf_counter()
    stats.gather_seconds += t3 - t2
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


class _DealtChunks:
    """Each reader's dealt chunks: its own reader takes them from the front; a reader that
    has run out takes the last unstarted chunk of the reader with the most bytes left.

    Chunks are dealt before the load (``binding.deal``), but readers do not move bytes at one rate
    (page-cache placement, other ranks' threads): without taking, the load ends when the
    slowest reader ends while the others idle.
    """

    def __init__(self, per_worker: List[List[BoundChunk]], take: bool):
        self.lists = per_worker
        self.front = [0] * len(per_worker)
        self.back = [len(chunks) for chunks in per_worker]
        self.left = [sum(c.nbytes for c in chunks) for chunks in per_worker]
        self.take = take
        self.lock = threading.Lock()

    def next_own(self, reader: int) -> Optional[BoundChunk]:
        """The reader's next dealt chunk, or None once none is left."""
        with self.lock:
            i = self.front[reader]
            if i >= self.back[reader]:
                return None
            self.front[reader] = i + 1
            chunk = self.lists[reader][i]
            self.left[reader] -= chunk.nbytes
            return chunk

    def take_from_other(self) -> Optional[Tuple[int, int]]:
        """``(owner, index)`` of the chunk an idle reader runs next, or None (all started)."""
        if not self.take:
            return None
        with self.lock:
            owner = max(range(len(self.lists)), key=self.left.__getitem__)
            if self.front[owner] >= self.back[owner]:
                return None
            self.back[owner] -= 1
            index = self.back[owner]
            self.left[owner] -= self.lists[owner][index].nbytes
            return owner, index


def _run_reader(
    index: int,
    bound: Binding,
    params: Dict[str, torch.Tensor],
    dealt: _DealtChunks,
    paths: List[str],
    fds: Dict[str, int],
    worker: Worker,
    on_bytes: Optional[Callable[[int], None]],
    fault: "_FaultBudget",
    mappings: "_FileMappings",
    failed: threading.Event,
) -> None:
    """One reader: its dealt chunks, then (bound for its own buffers) others' last ones."""
    turn = 1
    while not failed.is_set():  # another reader failed: the load is abandoned
        chunk = dealt.next_own(index)
        if chunk is None:
            taken = dealt.take_from_other()
            if taken is None:
                return
            # The other buffer than the last chunk's: the device may still copy from that one.
            chunk = bound.bind_taken(*taken, reader=index, turn=1 - turn, params=params)
            worker.stats.taken_chunks += 1
        if chunk.buffer >= 0:
            turn = chunk.buffer
        path = paths[chunk.file]
        _run_bound(chunk, path, fds[path], worker, on_bytes, fault, mappings)


@dataclasses.dataclass
class _LaneItem:
    """A zero-copy lane chunk whose pages the registrar has registered.

    Attributes:
        chunk: the bound chunk.
        copies: ``(device scratch piece, registered host view)`` pairs, each inside one
            registration; None when the file could not be mapped (the chunk is staged).
    """

    chunk: BoundChunk
    copies: Optional[List[Tuple[torch.Tensor, torch.Tensor]]]


_LANE_END = None  # what the registrar queues after its last chunk


def _register_lane(
    chunks: List[BoundChunk],
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
    worker: Worker,
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


def _on_stream(worker: Worker):
    """Make the worker's stream (and its device) current on this thread for its whole task:
    entered once per load, not once per chunk."""
    return torch.cuda.stream(worker.stream) if worker.cuda else contextlib.nullcontext()


def _share_with_node(
    plan: LoadPlan,
    params: Dict[str, torch.Tensor],
    device: torch.device,
    num_threads: int,
    cache: Optional[dict],
    node: shared_spans.NodeGroup,
    fault: _FaultBudget,
    on_bytes: Optional[Callable[[int], None]],
    stats: ExecutionStats,
) -> Tuple[LoadPlan, Optional[shared_spans.RoundsInBackground]]:
    """Agree with the node's ranks and, if they agreed, start the shared rounds.

    Returns:
        What is left to load rank by rank (the whole plan when they did not agree), and the
        rounds to join.
    """
    runtime = direct_runtime() if device.type == "cuda" else None
    able = device.type == "cpu" or runtime is not None  # CUDA: 2D copies through the runtime
    agreed = shared_spans.agree(node, plan if able else None, params, {} if cache is None else cache,
                                cuda=device.type == "cuda")
    if agreed is None:
        return plan, None
    seg, split, error = agreed
    fds: Dict[str, int] = {}
    try:
        for path in shared_layout.shared_paths(split):
            fds[path] = os.open(path, os.O_RDONLY)
    except BaseException as exc:  # reported to every rank in the first round
        error = error or exc
    rounds = shared_spans.RoundsInBackground(
        device, node=node, seg=seg, split=split, params=params, fds=fds, pool=max(1, num_threads),
        runtime=runtime, spend=fault.spend, on_bytes=on_bytes, stats=stats, error=error,
        after=torch.cuda.current_stream(device) if runtime is not None else None,
    )
    return shared_layout.regular_plan(plan, split), rounds


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
    node: Optional[shared_spans.NodeGroup] = None,
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
        node: the tensor-parallel ranks on this host that load together: they share the
            spans they gather from (``shared_spans.py``). Every rank of it must call this
            at the same point of a load (or ``shared_spans.decline``); None: alone.

    Returns:
        Bytes read, read calls and seconds.

    Raises:
        CheckpointError: a file ended early (changed or truncated under us), or another
            rank failed while the ranks read what they share.
    """
    t0 = time.perf_counter()
    fault = _FaultBudget(take_injected_fault(), [fp.path for fp in plan.files])
    host_memory.wait_for_releases()  # the previous load's mappings are gone before new ones
    shared_stats = ExecutionStats()
    rounds = None
    if node is not None:
        # Zero-fills before any copy, as upstream ran them before the copies into them
        # (settled_writes.py): the rounds start copying as soon as they are started.
        zero_fills(plan, params)
        plan, rounds = _share_with_node(plan, params, device, num_threads, cache, node, fault, on_bytes, shared_stats)
    try:
        stats = _execute_alone(plan, params, device, num_threads, chunk_bytes, on_bytes, cache, zero_copy_share, fault,
                               zeros_done=node is not None)
    except BaseException:
        if rounds is not None:
            rounds.join(failed=True)
        raise
    if rounds is not None:
        rounds.join(failed=False)
        for name in ("bytes_read", "read_calls", "read_seconds", "shared_seconds", "shared_bytes"):
            setattr(stats, name, getattr(stats, name) + getattr(shared_stats, name))
    stats.seconds = time.perf_counter() - t0
    return stats


def _execute_alone(
    plan: LoadPlan,
    params: Dict[str, torch.Tensor],
    device: torch.device,
    num_threads: int,
    chunk_bytes: int,
    on_bytes: Optional[Callable[[int], None]],
    cache: Optional[dict],
    zero_copy_share: float,
    fault: _FaultBudget,
    zeros_done: bool = False,
) -> ExecutionStats:
    """``execute_plan`` of the steps this rank loads by itself (see there; ``zeros_done``: the
    plan's zero-fills were made already)."""
    t_setup = time.perf_counter()
    bound = bind(plan, params, device, num_threads, chunk_bytes, cache, zero_copy_share)
    workers = bound.workers
    for w in workers:
        w.stats = ExecutionStats()
        w.runtime = bound.runtime  # workers are shared by bindings made with and without it
    for view in () if zeros_done else bound.zeros:
        view.zero_()
    paths = [fp.path for fp in plan.files]
    fds = {path: os.open(path, os.O_RDONLY) for path in paths}
    mappings: List[_FileMappings] = []
    mapped: Dict[str, Optional[host_memory.MappedFile]] = {}
    registrar_stats = ExecutionStats()
    try:
        _check_gather_spans(plan, fds)
        mappings = [_FileMappings(fds) for _ in workers]
        if device.type == "cuda":
            # Side streams must see the parameters as they are now (zero-fills above).
            current = torch.cuda.current_stream(device)
            for w in workers:
                w.stream.wait_stream(current)

        failed = threading.Event()
        readers = len(workers) - (1 if bound.lane >= 0 else 0)  # the lane is the last worker
        dealt = _DealtChunks(bound.per_worker[:readers], os.environ.get(constants.ENV_STEAL_CHUNKS, "1") != "0")
        done_at = [0.0] * readers  # when each reader ran out of chunks
        setup_seconds = time.perf_counter() - t_setup
        ready: "queue.SimpleQueue" = queue.SimpleQueue()

        def task(index: int) -> None:
            try:
                if index == len(workers):
                    _register_lane(bound.per_worker[bound.lane], paths, mapped, ready, failed, registrar_stats)
                    return
                with _on_stream(workers[index]):
                    if index == bound.lane:
                        _copy_lane(ready, paths, fds, workers[index], on_bytes, fault, mappings[index], failed)
                        return
                    _run_reader(index, bound, params, dealt, paths, fds, workers[index], on_bytes, fault, mappings[index], failed)
                    done_at[index] = time.perf_counter()
            except BaseException:
                failed.set()
                raise

        tasks = len(workers) + (1 if bound.lane >= 0 else 0)
        if tasks == 1:
            task(0)
        else:
            pool = reader_pool(tasks)
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
        if mappings:
            host_memory.release_later(mappings)  # the next load waits for it (wait_for_releases)
        for fd in fds.values():
            os.close(fd)
    summed = {
        name: sum(getattr(w.stats, name) for w in workers)
        for name in ("bytes_read", "read_calls", "read_seconds", "gather_seconds", "wait_seconds", "issue_seconds",
                     "lane_wait_seconds", "taken_chunks")
    }
    ends = [t for t in done_at if t]
    return ExecutionStats(
        seconds=time.perf_counter() - t_setup,
        setup_seconds=setup_seconds,
        tail_seconds=max(ends) - min(ends) if ends else 0.0,
        register_seconds=registrar_stats.register_seconds,
        threads_seconds=threads_end - t_setup - setup_seconds,
        drain_seconds=drain_seconds,
        **summed,
    )
