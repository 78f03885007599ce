"""Row shards read once per node: the ranks of a node share the spans they gather from.

At TP=N every rank keeps 1/N of each row of a row-parallel weight (an MoE expert's
``down_proj``: runs of 1536 / N bytes). Gathered rank by rank from a mapping of the file,
every rank touches every page of those spans: the node pays the page faults and the memory
traffic N times. Here the ranks of one node agree (one collective per load) that they gather
from the same spans, then go through them in rounds: each rank reads a disjoint, contiguous
1/N of the round's spans into memory the node's ranks share, the ranks wait for each other
(one collective per round, which also carries failures), and each copies its own columns
out — on CUDA the device pulls them with one 2D copy per step (``cudaMemcpy2DAsync``; on an
H200 as fast as a contiguous copy of the same bytes for runs of 384 bytes and more), on CPU
a strided copy. Rounds cycle through a few slots, so reads and copies of consecutive rounds
overlap; and the rounds run on their own thread while the rank's readers load the rest.

Every rank that agreed goes through every round, even after a failure of its own (it then
reports it in the round's collective), so the ranks stop together and the load fails on all.

Opt-in (``SGLANG_FASTLOAD_SHARED_SPANS=1``): measured with every rank on one H200 (one PCIe
link, 16 CPUs), updates were as fast or slower than with each rank gathering by itself
(docs/benchmarks.md); on a node whose GPUs have links of their own it is unmeasured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import mmap
import os
import secrets
import socket
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from sglang_fastload.errors import CheckpointError
from sglang_fastload.loader import host_memory
from sglang_fastload.loader.cuda_runtime import CudaRuntime
from sglang_fastload.loader.execution_stats import ExecutionStats
from sglang_fastload.loader import shared_layout
from sglang_fastload.loader.plan import LoadPlan
from sglang_fastload.loader.shared_layout import SharedSpan, SharedSplit
from sglang_fastload.loader.staging import read_exact, reader_pool

logger = logging.getLogger(__name__)

# Slots the rounds cycle through (of ``shared_layout.SLOT_BYTES`` each). Each round costs one
# collective over the group's CPU communicator (~0.1-1 ms); with four slots a rank waits for
# its copies out of a slot three rounds after queueing them, so the reads, the collective and
# the device copies of consecutive rounds overlap. 256 MiB in all, registered by every rank.
SLOTS = 4


@dataclasses.dataclass(frozen=True)
class NodeGroup:
    """The ranks that share spans: one tensor-parallel group, every rank on this host.

    Attributes:
        rank: this rank's index in the group.
        size: ranks in the group.
        cpu_group: the group's CPU (gloo) process group, for the collectives.
    """

    rank: int
    size: int
    cpu_group: object


class _Segment:
    """Memory the node's ranks share: a file in ``/dev/shm`` (unlinked once every rank has it
    mapped), registered with CUDA where the parameters live there."""

    def __init__(self, token: str, path: str, nbytes: int, create: bool, cuda: bool):
        self.token = token
        self.nbytes = nbytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:  # blocks reserved now: a full /dev/shm (a container's 64 MiB) fails
                os.posix_fallocate(fd, 0, nbytes)  # here, not with SIGBUS at the first write
            self.map = mmap.mmap(fd, nbytes)
        except BaseException:
            if create:
                os.unlink(path)  # nobody else has it yet
            raise
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self.map, dtype=torch.uint8)
        self.address = self.tensor.data_ptr()
        self.registered = False
        if cuda:
            self.registered = host_memory.register_host(self.address, nbytes)

    def close(self) -> None:
        if self.registered:
            host_memory.unregister_host(self.address)
            self.registered = False
        self.tensor = None
        try:
            self.map.close()
        except BufferError:
            pass  # a view still exists: unmapped when freed


_SEGMENT: Optional[_Segment] = None


def _segment_path(token: str) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"sglang-fastload-{os.getuid()}-{token}")


def all_ok(node: NodeGroup, ok: bool) -> bool:
    """True when ``ok`` holds on every rank of the node (a collective; also a barrier)."""
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=node.cpu_group)
    return bool(flag.item())


def agree(node: NodeGroup, plan: Optional[LoadPlan], params: Dict[str, torch.Tensor], cache: dict,
          cuda: bool) -> Optional[Tuple[_Segment, SharedSplit, Optional[BaseException]]]:
    """Decide, with every rank of the node, whether this load shares spans (collectives).

    Every rank of the group must call it at the same point of a load, with ``plan`` None
    when it loads otherwise (``decline``). The ranks share when all of them are on this
    host, none declined and some spans are shareable; the spans of a layout are exchanged
    once (later loads exchange a digest of them).

    Args:
        node: the group.
        plan, params: this rank's plan and parameters (None, {}: a vote against).
        cache: the model's executor cache (keeps the node's layout between loads).
        cuda: the parameters live on a CUDA device (the shared memory is registered).

    Returns:
        The shared memory, this rank's split and this rank's failure to make it (to report
        in the first round: the other ranks go on to the rounds), or None (every rank
        gathers by itself).

    Raises:
        This rank's failure to find its spans, after its vote against sharing.
    """
    import torch.distributed as dist

    spans, failure = None, None
    try:
        spans = shared_layout.rank_spans(plan, params, cache) if plan is not None else None
    except Exception as exc:  # vote against first: the other ranks wait for this vote
        failure = exc
    digest = hashlib.sha256(repr(spans).encode()).hexdigest() if spans is not None else None
    mine = dict(digest=digest, host=socket.gethostname(), token=_SEGMENT.token if _SEGMENT is not None else None,
                new_token=secrets.token_hex(8))
    every: List[dict] = [None] * node.size  # type: ignore[list-item]
    dist.all_gather_object(every, mine, group=node.cpu_group)
    if failure is not None:
        raise failure
    if any(e["digest"] is None or e["host"] != every[0]["host"] for e in every):
        return None
    key = ("shared-rounds", tuple(e["digest"] for e in every), shared_layout.SLOT_BYTES)
    rounds = cache.get(key)
    if not all_ok(node, rounds is not None):  # a new layout somewhere: every rank's spans, once
        all_spans: List[list] = [None] * node.size  # type: ignore[list-item]
        dist.all_gather_object(all_spans, spans, group=node.cpu_group)
        rounds = shared_layout.node_rounds(all_spans)
        cache[key] = rounds
    if not rounds:
        return None
    seg = _shared_memory(node, every, cuda)
    if seg is None:
        return None
    split_key = ("shared-split", key, tuple(map(id, (fp.steps for fp in plan.files))), tuple(fp.path for fp in plan.files))
    split = cache.get(split_key)
    if split is None:
        try:
            split = shared_layout.split_plan(plan, params, rounds)
        except Exception as exc:  # the rounds still run (none of this rank's copies), and stop
            return seg, shared_layout.split_plan(plan, {}, rounds, own=False), exc
        cache[split_key] = split
    return seg, split, None


def _shared_memory(node: NodeGroup, every: List[dict], cuda: bool) -> Optional[_Segment]:
    """The node's shared memory: kept from an earlier load when every rank still has the same,
    else made by rank 0 and mapped by the others (collectives)."""
    global _SEGMENT
    first = every[0]
    if first["token"] is not None and all(e["token"] == first["token"] for e in every):
        return _SEGMENT
    if _SEGMENT is not None:
        _SEGMENT.close()
        _SEGMENT = None
    token = first["new_token"]
    path = _segment_path(token)
    nbytes = SLOTS * shared_layout.SLOT_BYTES
    made: Optional[_Segment] = None
    try:
        if node.rank == 0:
            made = _Segment(token, path, nbytes, create=True, cuda=cuda)
    except OSError as exc:
        logger.info("sglang-fastload: no node-shared memory (%s); ranks gather by themselves", exc)
    if not all_ok(node, node.rank != 0 or made is not None):
        return None
    try:
        if node.rank != 0:
            made = _Segment(token, path, nbytes, create=False, cuda=cuda)
    except OSError as exc:
        logger.info("sglang-fastload: node-shared memory not reachable (%s); ranks gather by themselves", exc)
    everyone = all_ok(node, made is not None and (made.registered or not cuda))
    if node.rank == 0:
        try:
            os.unlink(path)  # every rank has it mapped (or gave up): no name left behind
        except OSError:
            pass
    if not everyone:
        if made is not None:
            made.close()
        return None
    _SEGMENT = made
    return made


def decline(node: NodeGroup) -> None:
    """Vote against sharing in this load (a rank that loads otherwise; a collective)."""
    agree(node, None, {}, {}, cuda=False)


def _read_piece(seg: _Segment, base: int, piece, fds: Dict[str, int]) -> int:
    """Read one piece of this rank's part into the slot at ``base``; returns the read calls."""
    path, offset, slot_offset, nbytes = piece
    view = memoryview(seg.map)[base + slot_offset:base + slot_offset + nbytes]
    try:
        return read_exact(fds[path], view, offset, path)
    finally:
        view.release()


def copy_out(seg: _Segment, base: int, span: SharedSpan, params: Dict[str, torch.Tensor],
             runtime: Optional[CudaRuntime], stream: int) -> int:
    """Queue (CUDA) or do (CPU) this rank's copies out of one staged span.

    Args:
        seg: the shared memory (``address``, and ``tensor`` for the CPU copies).
        base: byte offset of the round's slot in it.
        span: the staged span.
        params: ``{name: parameter data}``.
        runtime: the CUDA runtime (one 2D copy per step), or None (a strided copy per step).
        stream: the CUDA stream handle the copies go on.

    Returns:
        The bytes copied into parameters.
    """
    total = 0
    for step, delta in span.steps:
        param = params[step.param]
        off, sizes, strides = step.view
        doff, _, dstrides = step.dst
        isz, psz = step.itemsize, param.element_size()
        rows, cols = sizes
        src = base + span.slot_offset + delta + off * isz
        if runtime is not None:
            runtime.copy_2d_to_device(param.data_ptr() + doff * psz, dstrides[0] * psz, seg.address + src,
                                      strides[0] * isz, cols * isz, rows, stream)
        else:
            dtype = step.src_dtype or param.dtype
            staged = seg.tensor.narrow(0, src, ((rows - 1) * strides[0] + cols) * isz).view(dtype)
            param.as_strided((rows, cols), (dstrides[0], 1), doff).copy_(staged.as_strided((rows, cols), (strides[0], 1)))
        total += rows * cols * isz
    return total


def run_rounds(
    node: NodeGroup,
    seg: _Segment,
    split: SharedSplit,
    params: Dict[str, torch.Tensor],
    fds: Dict[str, int],
    pool: int,
    runtime: Optional[CudaRuntime],
    device: torch.device,
    spend: Callable[[int], None],
    on_bytes: Optional[Callable[[int], None]],
    stats: ExecutionStats,
    error: Optional[BaseException] = None,
    stop: Optional[threading.Event] = None,
    after=None,
) -> None:
    """Go through every round with the node's other ranks (see the module docstring).

    Args:
        node, seg, split: the group, its shared memory and this load's spans (agreed).
        params: ``{name: parameter data}``.
        fds: descriptors of the shared spans' files, by path (``shared_layout.shared_paths``).
        pool: threads reading this rank's parts (a pool of its own: the rank's readers
            load the rest of the plan meanwhile).
        runtime: the CUDA runtime (CUDA parameters), or None (CPU parameters).
        device: where the parameters live.
        spend: charged with the bytes of each read (fault injection).
        on_bytes: progress, with the bytes this rank copies.
        stats: where bytes, seconds and read time are added.
        error: a failure of this rank before the rounds (reported in the first one).
        stop: set when the rest of this rank's load failed (reported in the next round).
        after: the CUDA stream whose queued work on the parameters the copies must follow
            (the loading thread's current stream).

    Raises:
        The first failure of this rank, or CheckpointError when another rank failed.
    """
    t0 = time.perf_counter()
    cuda = runtime is not None
    stream = _stream(device) if cuda else None
    events: List[int] = _events(device, runtime) if cuda else []
    if stream is not None:
        stream.wait_stream(after if after is not None else torch.cuda.current_stream(device))
    handle = stream.cuda_stream if stream is not None else 0
    where = os.path.dirname(min(fds)) if fds else ""  # the checkpoint, for messages
    aborted = False
    for k, spans in enumerate(split.rounds):
        base = (k % SLOTS) * shared_layout.SLOT_BYTES
        if error is None and stop is not None and stop.is_set():
            error = CheckpointError(where, "this rank's load failed")
        if error is None:
            try:
                t1 = time.perf_counter()
                pieces = shared_layout.pieces_of_rank(spans, node.rank, node.size)
                readers = reader_pool(pool, "fastload-shared")
                stats.read_calls += sum(readers.map(lambda p: _read_piece(seg, base, p, fds), pieces))
                read = sum(p[3] for p in pieces)
                spend(read)
                stats.bytes_read += read
                stats.read_seconds += time.perf_counter() - t1
                if cuda and k >= SLOTS - 1:  # so that after this round's collective, the slot
                    runtime.wait(events[(k + 1) % SLOTS])  # of round k + 1 is free on every rank
            except BaseException as exc:  # reported to every rank in this round's collective
                error = exc
        if not all_ok(node, error is None):
            aborted = True
            break
        try:
            nbytes = sum(copy_out(seg, base, s, params, runtime, handle) for s in spans)
            if cuda:
                runtime.record(events[k % SLOTS], handle)
            stats.shared_bytes += nbytes
            if on_bytes:
                on_bytes(nbytes)
        except BaseException as exc:  # the next round's collective reports it
            error = exc
    if stream is not None:  # never return while a copy out of the shared memory may still run
        try:
            stream.synchronize()
        except BaseException as exc:
            error = error or exc
    stats.shared_seconds += time.perf_counter() - t0
    if error is not None:
        raise error
    if aborted:
        raise CheckpointError(
            where, "another tensor-parallel rank failed while the "
            "node's ranks read the row shards they share; the load is abandoned on every rank",
        )


class RoundsInBackground:
    """``run_rounds`` on a thread of its own (the CUDA device made current there), so the
    rank's readers load the rest of its plan at the same time."""

    def __init__(self, device: torch.device, **kwargs):
        self.stop = threading.Event()
        self.error: Optional[BaseException] = None
        self._device = device
        self._kwargs = kwargs
        self._thread = threading.Thread(target=self._run, name="fastload-shared-rounds", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with torch.cuda.device(self._device) if self._device.type == "cuda" else contextlib.nullcontext():
                run_rounds(device=self._device, stop=self.stop, **self._kwargs)
        except BaseException as exc:  # raised by join()
            self.error = exc
        finally:
            for fd in self._kwargs["fds"].values():
                os.close(fd)

    def join(self, failed: bool) -> None:
        """Wait for the rounds (telling them first when the rest of the load ``failed``).

        Raises:
            The rounds' failure, unless the rest of the load failed (that error is raised).
        """
        if failed:
            self.stop.set()
        self._thread.join()
        if self.error is not None and not failed:
            raise self.error


_STREAMS: Dict[str, "torch.cuda.Stream"] = {}
_EVENTS: Dict[str, List[int]] = {}


def _stream(device: torch.device):
    key = str(device)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


def _events(device: torch.device, runtime: CudaRuntime) -> List[int]:
    key = str(device)
    if key not in _EVENTS:
        _EVENTS[key] = [runtime.new_event(blocking=True) for _ in range(SLOTS)]
    return _EVENTS[key]
