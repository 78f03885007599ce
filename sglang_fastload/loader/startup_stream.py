"""A first start's checkpoint read while its plan is built, into a scratch the plan copies from.

A start-up load without a plan in memory or in the plan store builds one before it reads
(the replay of the model's own loaders: ~0.06 s for Qwen3-8B, ~0.4 s for 16 layers of
Qwen3-30B-A3B on an H200 host), and its reader threads wait meanwhile. A rank that keeps
every byte of the checkpoint (one rank: no tensor or expert parallelism) reads all of it
whatever the plan says, and before the KV cache is made the device has room for it. So
there the readers copy every file's tensor bytes, file by file, into one scratch while the
plan is built; the plan then runs out of the scratch (``scratch_copies.py``: device-to-device
copies, conversions by torch as the executor's device scratch does them), which is freed.
The bytes read are the same; what changes is that reading no longer waits for the plan.
Once the plan is built, each file's copies are queued as soon as that file has landed in the
scratch, while the readers are still on later files.

The replay is interpreter work and the readers' copies need CPUs too: beside as many readers
as CPUs the replay ran 2.1 x slower. So while the plan is built half the CPUs read, each read
taking up to 64 MiB of neighbouring slices of one file; once it is built the loader's other
readers join and every read is one slice of the loader's chunk size (``StreamReaders``).
Checkpoints of few tensors are planned faster than the stream pays for itself and are not
streamed unless asked (``worth_streaming``).

Updates never stream (the KV cache holds the device memory then, and a cached plan is ready).
Where the stream cannot run (another reader failed, a file changed while it was read) the
load reads the files as any other load does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import torch

from sglang_fastload import constants
from sglang_fastload.checkpoint.checkpoint_files import resolve_checkpoint_files
from sglang_fastload.loader.binding import direct_runtime
from sglang_fastload.loader.execution_stats import ExecutionStats
from sglang_fastload.loader.plan import LoadPlan
from sglang_fastload.loader.scratch_copies import copy_plan_from_scratch
from sglang_fastload.loader.staging import (
    Worker,
    prepare_in_background,
    read_exact,
    release_workers,
    reserve,
    wait_prepared,
    workers_for,
)

logger = logging.getLogger(__name__)

# Where each file's bytes start in the scratch (any element type is aligned there).
SCRATCH_ALIGN = 4096


@dataclasses.dataclass(frozen=True)
class FileRegion:
    """One file's tensor bytes in the scratch.

    Attributes:
        path: the file.
        data_start: file offset of its first tensor byte.
        nbytes: its tensor bytes (to the end of the file).
        at: where they start in the scratch.
    """

    path: str
    data_start: int
    nbytes: int
    at: int

    @property
    def origin(self) -> int:
        """The scratch index the file's byte 0 would have (its offsets add to it)."""
        return self.at - self.data_start


def scratch_layout(headers: Dict[str, object]) -> Tuple[List[FileRegion], int]:
    """Each file's region in one scratch, files in name order, and the scratch's size.

    Args:
        headers: ``{path: SafetensorsHeader}`` of the checkpoint.
    """
    regions, at = [], 0
    for path in sorted(headers):
        header = headers[path]
        nbytes = header.file_size - header.data_start
        regions.append(FileRegion(path, header.data_start, nbytes, at))
        at += (nbytes + SCRATCH_ALIGN - 1) // SCRATCH_ALIGN * SCRATCH_ALIGN
    return regions, at


def streams_here(setting: str, device: torch.device, startup: bool, single_rank: bool) -> bool:
    """Whether a load that builds its plan streams the checkpoint meanwhile (device room aside).

    Args:
        setting: the extra config's ``startup_stream`` (``constants.STARTUP_STREAM_SETTINGS``).
        device: where the parameters live.
        startup: the model was never loaded (a start-up load, not an update).
        single_rank: this rank keeps every byte of the checkpoint (no model parallelism).
    """
    if setting == "off" or not startup or not single_rank:
        return False
    return device.type == "cuda" or setting == "on"


def worth_streaming(setting: str, tensors: int) -> bool:
    """Whether a checkpoint of ``tensors`` tensors takes long enough to plan to stream meanwhile
    (``constants.STARTUP_STREAM_MIN_TENSORS``; any checkpoint when the setting is "on")."""
    return setting == "on" or tensors >= constants.STARTUP_STREAM_MIN_TENSORS


def indexed_tensor_count(directory) -> int:
    """The tensors a checkpoint directory's index names, read before the model is built (0
    where there is no index or the path is not a local directory: the headers tell later)."""
    try:
        files = resolve_checkpoint_files(directory)
    except Exception:  # noqa: BLE001 - a hub id, a bad directory: the load reports it
        return 0
    return len(files.weight_map or ())


def device_has_room(device: torch.device, nbytes: int) -> bool:
    """True off CUDA, or when the device has ``nbytes`` free beside the headroom."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return free >= nbytes + constants.STARTUP_STREAM_HEADROOM_BYTES


@dataclasses.dataclass(frozen=True)
class StreamReaders:
    """How a stream reads: few readers and large reads while the plan is built (beside the
    replay), more readers and the loader's own chunk size once it is.

    Attributes:
        during: readers while the plan is built.
        after: readers once it is (``>= during``); the others join then.
        read_bytes_during: bytes per read while the plan is built.
        read_bytes_after: bytes per read after, the loader's chunk size: the readers that
            join then use the loader's own pinned buffers.
    """

    during: int
    after: int
    read_bytes_during: int
    read_bytes_after: int

    @classmethod
    def uniform(cls, threads: int, read_bytes: int) -> "StreamReaders":
        """The same readers and reads throughout."""
        return cls(threads, threads, read_bytes, read_bytes)

    @property
    def own_buffers(self) -> bool:
        """The readers of the plan's time need pinned buffers of their own (freed with the stream)."""
        return self.read_bytes_during != self.read_bytes_after


def stream_readers(loader_threads: int, loader_chunk_bytes: int) -> StreamReaders:
    """How a first start's stream reads, by default (``constants``).

    Half the CPUs read ``STARTUP_STREAM_READ_BYTES`` at a time while the plan is built, the
    loader's threads its chunk size after; ``SGLANG_FASTLOAD_STARTUP_STREAM_READERS`` ("N"
    or "N/M") and ``SGLANG_FASTLOAD_STARTUP_STREAM_READ_MB`` override the counts and the size.

    Args:
        loader_threads, loader_chunk_bytes: the loader's reader threads and chunk size.
    """
    during, after = max(1, (os.cpu_count() or 2) // 2), max(1, loader_threads)
    value = os.environ.get(constants.ENV_STARTUP_STREAM_READERS, "").strip()
    if value:
        try:
            counts = [int(x) for x in value.split("/")]
            during, after = counts[0], counts[-1]
        except ValueError:
            logger.info("sglang-fastload: %s=%r is not N or N/M; ignored", constants.ENV_STARTUP_STREAM_READERS, value)
    read_bytes = constants.STARTUP_STREAM_READ_BYTES
    value = os.environ.get(constants.ENV_STARTUP_STREAM_READ_MB, "").strip()
    if value:
        try:
            read_bytes = int(float(value) * (1 << 20))
        except ValueError:
            logger.info("sglang-fastload: %s=%r is not a size in MiB; ignored", constants.ENV_STARTUP_STREAM_READ_MB, value)
    during = max(1, during)
    return StreamReaders(during, max(during, after), max(read_bytes, loader_chunk_bytes), loader_chunk_bytes)


def prepare_buffers(device: torch.device, readers: StreamReaders) -> None:
    """Pin the buffers of the stream's first readers in the background (while the model is built).

    Args:
        device: the CUDA device the parameters live on (with its index).
        readers: the loader's ``stream_readers``.
    """
    if readers.own_buffers:
        prepare_in_background(device, readers.during, readers.read_bytes_during, 0.0)


def release_buffers(device: torch.device, readers: StreamReaders) -> None:
    """Free what ``prepare_buffers`` pinned (a start whose stream ended, or never started).

    Args:
        device, readers: as given to ``prepare_buffers``.
    """
    if device.type == "cuda" and readers.own_buffers:
        release_workers(device, readers.read_bytes_during)


def _switch_interval() -> float:
    value = os.environ.get(constants.ENV_STARTUP_SWITCH_INTERVAL, "").strip()
    try:
        return float(value) if value else constants.STARTUP_STREAM_SWITCH_INTERVAL_S
    except ValueError:
        return constants.STARTUP_STREAM_SWITCH_INTERVAL_S


class StartupStream:
    """The readers copying the checkpoint into the scratch, started by ``start``."""

    def __init__(self, regions: List[FileRegion], total: int, device: torch.device, readers: StreamReaders):
        self.device = device
        self.cuda = device.type == "cuda"
        self.regions = regions
        self.readers = readers
        self.scratch = torch.empty(total, dtype=torch.uint8, device=device)
        unit = readers.read_bytes_after
        # Slices of the loader's chunk size; a read while the plan is built takes several
        # neighbouring ones of one file at once (``_take``).
        self.pieces = [
            (r.path, off, min(unit, r.data_start + r.nbytes - off), r.origin + off)
            for r in regions
            for off in range(r.data_start, r.data_start + r.nbytes, unit)
        ]
        self.threads = max(1, min(readers.after, len(self.pieces)))
        self.threads_during_plan = max(1, min(readers.during, self.threads))
        self.slices_per_read = max(1, readers.read_bytes_during // unit)  # 1 once the plan is built
        self.next_piece = 0
        self.take_lock = threading.Lock()
        # Bytes of each file whose copies into the scratch are queued (all of them: landed).
        self.file_bytes = {r.path: r.nbytes for r in regions}
        self.queued = {r.path: 0 for r in regions}
        self.landed_at: Dict[str, float] = {r.path: 0.0 for r in regions if r.nbytes == 0}
        self.landing = threading.Condition()
        self.failed = threading.Event()
        self.error: Optional[BaseException] = None
        self.fds: Dict[str, int] = {}
        self.workers: List[Worker] = []
        self.runtime = None
        self.futures: list = []
        self.begun = None  # ``_begin``'s future
        self.pool: Optional[ThreadPoolExecutor] = None
        self.saved_interval: Optional[float] = None
        self.started = self.setup_seconds = 0.0

    @classmethod
    def start(cls, regions: List[FileRegion], total: int, device: torch.device, readers: StreamReaders) -> "StartupStream":
        """Allocate the scratch and start the readers (the call returns at once).

        Args:
            regions, total: ``scratch_layout``'s answer.
            device: the parameters' device (with its index on CUDA).
            readers: how many read, how much at a time, before and after the plan is built.

        Raises:
            OSError: a file could not be opened. torch's errors: no memory for the scratch.
        """
        stream = cls(regions, total, device, readers)
        stream.started = time.perf_counter()
        try:
            stream.fds = {r.path: os.open(r.path, os.O_RDONLY) for r in regions}
            interval = _switch_interval()
            if interval > 0:
                stream.saved_interval = sys.getswitchinterval()
                sys.setswitchinterval(min(interval, stream.saved_interval))
            stream.pool = ThreadPoolExecutor(max_workers=stream.threads, thread_name_prefix="fastload-stream")
            stream.setup_seconds = time.perf_counter() - stream.started
            stream.begun = stream.pool.submit(stream._begin)
        except BaseException:
            stream.abandon()
            raise
        return stream

    def _begin(self) -> None:
        """Ready the readers (their buffers, pinned in the background while the model was
        built) and start those that read while the plan is built. Runs on a pool thread, so
        that the plan does not wait for the buffers."""
        try:
            if self.cuda:
                self.runtime = direct_runtime()
                self.workers = self._ready_workers(self.readers.read_bytes_during, self.threads_during_plan)
            self.futures = [self.pool.submit(self._read, k) for k in range(self.threads_during_plan)]
        except BaseException:
            self.failed.set()
            raise

    def _ready_workers(self, read_bytes: int, count: int) -> List[Worker]:
        """The first ``count`` readers of ``read_bytes`` (the loader's pool for its chunk size),
        their buffers reserved once their background preparation is done."""
        wait_prepared(self.device, read_bytes)
        workers = workers_for(self.device, count, read_bytes)
        reserve(workers, [(read_bytes, 0)] * count)
        for w in workers:
            w.runtime = self.runtime
        return workers

    def _join_readers(self) -> None:
        """Once the plan is built, the remaining readers join (each read one slice now)."""
        self.slices_per_read = 1
        begun = self.begun is not None and self.begun.exception() is None  # waits; ``_join`` keeps a failure
        if not begun or self.failed.is_set() or self.pool is None or self.threads <= len(self.futures):
            return
        if self.next_piece >= len(self.pieces):  # every read is taken already: none to join
            return
        if self.cuda:
            try:
                more = self._ready_workers(self.readers.read_bytes_after, self.threads)[len(self.workers):]
            except Exception as exc:  # the first readers finish the stream alone
                logger.info("sglang-fastload: no more readers for the start-up stream (%s: %s)", type(exc).__name__, exc)
                return
            self.workers = self.workers + more
        self.futures += [self.pool.submit(self._read, k) for k in range(len(self.futures), self.threads)]

    def _read(self, k: int) -> ExecutionStats:
        stats = ExecutionStats()
        try:
            if not self.cuda:
                whole = memoryview(self.scratch.numpy())
                for path, off, n, index in iter(self._take, None):
                    t0 = time.perf_counter()
                    stats.read_calls += read_exact(self.fds[path], whole[index:index + n], off, path)
                    stats.read_seconds += time.perf_counter() - t0
                    stats.bytes_read += n
                    self._queued(path, n)
                return stats
            worker = self.workers[k]
            base = self.scratch.data_ptr()
            turn = 0
            with torch.cuda.stream(worker.stream):
                for path, off, n, index in iter(lambda: self._take(worker.chunk_bytes), None):
                    t0 = time.perf_counter()
                    worker.wait(turn)
                    t1 = time.perf_counter()
                    stats.read_calls += read_exact(self.fds[path], worker.buffer_bytes(turn)[:n], off, path)
                    t2 = time.perf_counter()
                    if self.runtime is not None:
                        self.runtime.copy_to_device(base + index, worker.buffers[turn].data_ptr(), n, worker.stream_handle)
                    else:
                        self.scratch.narrow(0, index, n).copy_(worker.buffers[turn].narrow(0, 0, n), non_blocking=True)
                    worker.mark_in_use(turn)
                    self._queued(path, n)
                    turn ^= 1
                    stats.wait_seconds += t1 - t0
                    stats.read_seconds += t2 - t1
                    stats.issue_seconds += time.perf_counter() - t2
                    stats.bytes_read += n
            return stats
        except BaseException:
            self.failed.set()
            with self.landing:
                self.landing.notify_all()
            raise

    def _queued(self, path: str, n: int) -> None:
        """Count ``n`` more bytes of ``path`` whose copy into the scratch is queued."""
        with self.landing:
            done = self.queued[path] + n
            self.queued[path] = done
            if done == self.file_bytes[path]:
                self.landed_at[path] = time.perf_counter()
                self.landing.notify_all()

    def _wait_landed(self, path: str) -> bool:
        """Wait until every byte of ``path`` is queued into the scratch, then (on CUDA) make
        the current stream wait for the readers' copies so far. False when the stream failed."""
        with self.landing:
            while self.queued[path] < self.file_bytes[path]:
                if self.failed.is_set() or all(f.done() for f in self.futures):
                    return False
                self.landing.wait(0.05)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            for w in self.workers:
                event = torch.cuda.Event()
                event.record(w.stream)
                current.wait_event(event)
        return True

    def _take(self, room: Optional[int] = None) -> Optional[Tuple[str, int, int, int]]:
        """The next read: up to ``slices_per_read`` neighbouring slices of one file, at most
        ``room`` bytes (a reader's buffer); None when none are left or a reader failed."""
        if self.failed.is_set():
            return None
        with self.take_lock:
            first = self.next_piece
            if first >= len(self.pieces):
                return None
            path, off, n, index = self.pieces[first]
            last = first + 1
            while (last < len(self.pieces) and last - first < self.slices_per_read
                   and self.pieces[last][0] == path and (room is None or n + self.pieces[last][2] <= room)):
                n += self.pieces[last][2]
                last += 1
            self.next_piece = last
        return path, off, n, index

    def _join(self) -> List[ExecutionStats]:
        """Wait for every reader and for the device's copies; keep the first failure."""
        done = []
        if self.begun is not None:
            try:
                self.begun.result()
            except BaseException as exc:  # noqa: BLE001 - kept, reported by ``finish``
                if self.error is None:
                    self.error = exc
            self.begun = None
        for f in self.futures:
            try:
                done.append(f.result())
            except BaseException as exc:  # noqa: BLE001 - kept, reported by ``finish``
                if self.error is None:
                    self.error = exc
        self.futures = []
        for w in self.workers:
            try:
                w.finish()
            except BaseException as exc:  # noqa: BLE001
                if self.error is None:
                    self.error = exc
        if self.pool is not None:
            self.pool.shutdown(wait=False)
            self.pool = None
        if self.saved_interval is not None:
            sys.setswitchinterval(self.saved_interval)
            self.saved_interval = None
        return done

    def finish(self, plan: LoadPlan, params: Dict[str, torch.Tensor]) -> Optional[ExecutionStats]:
        """Write ``plan``'s parameters out of the scratch, each file's as soon as it has landed.

        Args:
            plan: the plan built while the stream ran (for these files).
            params: ``{name: parameter data}``, checked against the plan.

        Returns:
            What the load did (the stream's reads and the copies out of the scratch), or
            None when the stream failed: the files that had landed may have been copied
            into their parameters then (a first start: nothing is served from them yet), and
            the caller reads the files as any load does, which writes every parameter again
            (and reports what is wrong with the files, if anything is).
        """
        planned = time.perf_counter()
        try:
            self._join_readers()  # the plan is built: the interpreter is free
            # File by file as they land, while the last files are read.
            copy_plan_from_scratch(plan, params, self.scratch, {r.path: r.origin for r in self.regions},
                                   self.runtime if self.cuda else None, landed=self._wait_landed)
            per_reader = self._join()
            if self.error is None and len(self.landed_at) < len(self.regions):
                self.error = RuntimeError("the stream's readers stopped before every file was read")
            if self.error is not None:
                if self.cuda:  # the copies queued so far end before the files are read again
                    torch.cuda.current_stream(self.device).synchronize()
                logger.info("sglang-fastload: the start-up stream stopped (%s: %s); reading the files instead",
                            type(self.error).__name__, self.error)
                return None
            streamed = max([self.started, *self.landed_at.values()])  # the last file landed
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()
            end = time.perf_counter()
        finally:
            self.abandon()
        summed = {name: sum(getattr(s, name) for s in per_reader)
                  for name in ("bytes_read", "read_calls", "read_seconds", "wait_seconds", "issue_seconds")}
        return ExecutionStats(
            seconds=end - self.started,
            setup_seconds=self.setup_seconds,
            threads_seconds=streamed - self.started - self.setup_seconds,
            scratch_seconds=end - max(planned, streamed),
            **summed,
        )

    def abandon(self) -> None:
        """Stop the readers, wait for them and free the scratch (idempotent)."""
        self.failed.set()
        self._join()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        self.workers = []  # first: the readers' buffers are freed where the pool lets go of them
        if self.cuda and self.readers.own_buffers:
            release_workers(self.device, self.readers.read_bytes_during)
        if self.scratch is not None:
            self.scratch = None
            if self.cuda:
                torch.cuda.empty_cache()  # the KV cache is sized from the device's free memory next


def maybe_start(loader, headers: Dict[str, object], startup: bool, single_rank: bool,
                device: torch.device) -> Optional[StartupStream]:
    """Start streaming the checkpoint where this load should (``streams_here``) and can.

    Args:
        loader: the fast loader (its ``startup_stream`` setting and ``stream_readers``).
        headers: ``{path: SafetensorsHeader}`` of the checkpoint.
        startup, single_rank: see ``streams_here`` (and ``worth_streaming``).
        device: the parameters' device.

    Returns:
        The running stream, or None (not wanted, no room on the device, or it could not
        start: the load then reads the files after the plan as usual).
    """
    if not streams_here(loader.startup_stream, device, startup, single_rank):
        return None
    if not worth_streaming(loader.startup_stream, sum(len(h.tensors) for h in headers.values())):
        return None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    regions, total = scratch_layout(headers)
    try:
        if not device_has_room(device, total):
            logger.info("sglang-fastload: %.2f GB free on %s is too little to stream the checkpoint "
                        "(%.2f GB) while the plan is built", torch.cuda.mem_get_info(device)[0] / 1e9,
                        device, total / 1e9)
            return None
        return StartupStream.start(regions, total, device, loader.stream_readers)
    except Exception as exc:  # the load reads the files after the plan instead
        logger.info("sglang-fastload: the start-up stream did not start (%s: %s)", type(exc).__name__, exc)
        return None
