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

import bisect
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
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from sglang_fastload import constants
from sglang_fastload.errors import CheckpointError
from sglang_fastload.loader import host_memory
from sglang_fastload.loader.cuda_runtime import CudaRuntime
from sglang_fastload.loader.execution_stats import ExecutionStats
from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan, staging_aligned

logger = logging.getLogger(__name__)

# Bytes of one slot of the node's shared memory, and how many slots rounds cycle through.
# Each round costs one collective over the group's CPU communicator (~0.1-1 ms); with four
# slots a rank waits for its copies out of a slot three rounds after queueing them, so the
# reads, the collective and the device copies of consecutive rounds overlap. 256 MiB in all,
# registered by every rank.
SLOT_BYTES = 64 << 20
SLOTS = 4
# A rank's part of a round is read by the reader pool in pieces of at most this many bytes.
READ_PIECE_BYTES = 4 << 20


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


@dataclasses.dataclass(frozen=True)
class SharedSpan:
    """A checkpoint byte range the node's ranks read once between them (a whole tensor).

    Attributes:
        path: its file.
        offset, nbytes: where it lies in the file.
        slot_offset: where it lies within its round's slot.
        steps: this rank's gather steps out of it, each with the distance in bytes from this
            span's start to the start of the step's own span.
    """

    path: str
    offset: int
    nbytes: int
    slot_offset: int
    steps: Tuple[Tuple[CopyStep, int], ...]


@dataclasses.dataclass(frozen=True)
class SharedSplit:
    """A plan with its shared gathers taken out.

    Attributes:
        regular_steps: the plan's other steps, per file (executed rank by rank); the lists
            are kept between loads so that bindings made for them are reused.
        rounds: the node's shared spans grouped by round (each round fits one slot).
    """

    regular_steps: Tuple[List[CopyStep], ...]
    rounds: Tuple[Tuple[SharedSpan, ...], ...]


def shareable(step: CopyStep, param: torch.Tensor) -> bool:
    """True for a gather that a 2D copy can take out of its span: rows of one unit-stride run,
    into rows of the parameter, without a dtype conversion."""
    if not step.gather or len(step.view[1]) != 2 or len(step.dst[1]) != 2:
        return False
    if step.view[2][1] != 1 or step.dst[2][1] != 1 or tuple(step.view[1]) != tuple(step.dst[1]):
        return False
    return step.src_dtype is None or step.src_dtype == param.dtype


def _rank_spans(plan: LoadPlan, params: Dict[str, torch.Tensor], cache: dict) -> List[Tuple[str, int, int]]:
    """This rank's shareable gather spans, ``(path, offset, nbytes)``, sorted and distinct."""
    key = ("shared-candidates", tuple(map(id, (fp.steps for fp in plan.files))))
    hit = cache.get(key)
    if hit is None or not all(a is b.steps for a, b in zip(hit[0], plan.files)):
        found = sorted({(i, *s.reads[0]) for i, fp in enumerate(plan.files) for s in fp.steps
                        if shareable(s, params[s.param])})
        hit = ([fp.steps for fp in plan.files], found)
        cache[key] = hit
    return [(plan.files[i].path, offset, nbytes) for i, offset, nbytes in hit[1]]


def node_rounds(every: Sequence[Sequence[Tuple[str, int, int]]], slot_bytes: int = SLOT_BYTES) -> List[List[Tuple[str, int, int, int]]]:
    """The node's shared spans from every rank's: overlapping spans (the ranks' columns of one
    tensor) merged, those larger than a slot left out, packed into rounds.

    Args:
        every: each rank's ``(path, offset, nbytes)`` spans.
        slot_bytes: bytes of one round.

    Returns:
        Rounds of ``(path, offset, nbytes, slot offset)``; the same on every rank.
    """
    merged: List[List] = []
    for path, offset, nbytes in sorted({s for spans in every for s in spans}):
        last = merged[-1] if merged else None
        if last is not None and last[0] == path and offset < last[1] + last[2]:  # overlaps: same tensor
            last[2] = max(last[2], offset + nbytes - last[1])
        else:
            merged.append([path, offset, nbytes])
    rounds: List[List[Tuple[str, int, int, int]]] = []
    used = slot_bytes
    for path, offset, nbytes in merged:
        if nbytes > slot_bytes:
            continue
        if used + nbytes > slot_bytes:
            rounds.append([])
            used = 0
        rounds[-1].append((path, offset, nbytes, used))
        used = staging_aligned(used + nbytes)
    return rounds


def split_plan(plan: LoadPlan, params: Dict[str, torch.Tensor], rounds: Sequence[Sequence[Tuple[str, int, int, int]]]) -> SharedSplit:
    """This rank's side of the node's rounds: its steps within each shared span, and the rest.

    Args:
        plan: the rank's plan.
        params: ``{name: parameter data}``.
        rounds: ``node_rounds``' result.

    Returns:
        The split.
    """
    starts: Dict[str, List[Tuple[int, int, int, int]]] = {}
    for k, spans in enumerate(rounds):
        for j, (path, offset, nbytes, _) in enumerate(spans):
            starts.setdefault(path, []).append((offset, nbytes, k, j))
    mine: Dict[Tuple[int, int], List[Tuple[CopyStep, int]]] = {}
    regular: List[List[CopyStep]] = []
    for fp in plan.files:
        kept = []
        inside = sorted(starts.get(fp.path, ()))
        for step in fp.steps:
            home = None
            if shareable(step, params[step.param]):
                offset, nbytes = step.reads[0]
                at = bisect.bisect_right(inside, (offset, float("inf"))) - 1
                if at >= 0 and offset + nbytes <= inside[at][0] + inside[at][1]:
                    home = inside[at]
            if home is None:
                kept.append(step)
            else:
                mine.setdefault((home[2], home[3]), []).append((step, step.reads[0][0] - home[0]))
        regular.append(kept)
    out = tuple(
        tuple(SharedSpan(path, offset, nbytes, slot, tuple(mine.get((k, j), ())))
              for j, (path, offset, nbytes, slot) in enumerate(spans))
        for k, spans in enumerate(rounds)
    )
    return SharedSplit(tuple(regular), out)


def regular_plan(plan: LoadPlan, split: SharedSplit) -> LoadPlan:
    """``plan`` without its shared steps (this load's files, the split's steps lists)."""
    files = [FilePlan(fp.path, steps) for fp, steps in zip(plan.files, split.regular_steps)]
    return dataclasses.replace(plan, files=files)


class _Segment:
    """Memory the node's ranks share: a file in ``/dev/shm`` (unlinked once every rank has it
    mapped), registered with CUDA where the parameters live there."""

    def __init__(self, token: str, path: str, nbytes: int, create: bool, cuda: bool):
        self.token = token
        self.nbytes = nbytes
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, nbytes)
            self.map = mmap.mmap(fd, nbytes)
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
          cuda: bool) -> Optional[Tuple[_Segment, SharedSplit]]:
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
        The shared memory and this rank's split, or None (every rank gathers by itself).
    """
    import torch.distributed as dist

    spans = _rank_spans(plan, params, cache) if plan is not None else None
    digest = hashlib.sha256(repr(spans).encode()).hexdigest() if spans is not None else None
    mine = dict(digest=digest, host=socket.gethostname(), token=_SEGMENT.token if _SEGMENT is not None else None,
                new_token=secrets.token_hex(8))
    every: List[dict] = [None] * node.size  # type: ignore[list-item]
    dist.all_gather_object(every, mine, group=node.cpu_group)
    if any(e["digest"] is None or e["host"] != every[0]["host"] for e in every):
        return None
    key = ("shared-rounds", tuple(e["digest"] for e in every), SLOT_BYTES)
    rounds = cache.get(key)
    if rounds is None:  # a new layout: every rank's spans, once
        all_spans: List[list] = [None] * node.size  # type: ignore[list-item]
        dist.all_gather_object(all_spans, spans, group=node.cpu_group)
        rounds = node_rounds(all_spans)
        cache[key] = rounds
    if not rounds:
        return None
    seg = _shared_memory(node, every, cuda)
    if seg is None:
        return None
    split_key = ("shared-split", key, tuple(map(id, (fp.steps for fp in plan.files))), tuple(fp.path for fp in plan.files))
    split = cache.get(split_key)
    if split is None:
        split = split_plan(plan, params, rounds)
        cache[split_key] = split
    return seg, split


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
    nbytes = SLOTS * SLOT_BYTES
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


def _my_pieces(spans: Sequence[SharedSpan], rank: int, size: int) -> List[Tuple[str, int, int, int]]:
    """This rank's contiguous 1/``size`` of a round: ``(path, file offset, slot offset, nbytes)``."""
    end = spans[-1].slot_offset + spans[-1].nbytes
    share = -(-end // size)
    lo, hi = rank * share, min(end, (rank + 1) * share)
    out = []
    for s in spans:
        a, b = max(lo, s.slot_offset), min(hi, s.slot_offset + s.nbytes)
        for p in range(a, b, READ_PIECE_BYTES):
            n = min(READ_PIECE_BYTES, b - p)
            out.append((s.path, s.offset + (p - s.slot_offset), p, n))
    return out


def _read_piece(seg: _Segment, base: int, piece, fds: Dict[str, int]) -> int:
    path, offset, slot_offset, nbytes = piece
    view = memoryview(seg.map)[base + slot_offset:base + slot_offset + nbytes]
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fds[path], [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(
                    path, f"file ended at byte {offset + done} while {nbytes - done} more bytes were "
                    "expected (truncated or changed during the load)",
                )
            done += n
    finally:
        view.release()
    return nbytes


def _copy_out(seg: _Segment, base: int, span: SharedSpan, params: Dict[str, torch.Tensor],
              runtime: Optional[CudaRuntime], stream: int) -> int:
    """Queue (CUDA) or do (CPU) this rank's copies out of one staged span; returns their bytes."""
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
) -> None:
    """Go through every round with the node's other ranks (see the module docstring).

    Args:
        node, seg, split: the group, its shared memory and this load's spans (agreed).
        params: ``{name: parameter data}``.
        fds: descriptors of the shared spans' files, by path (``shared_paths``).
        pool: threads reading this rank's parts (a pool of its own: the rank's readers
            load the rest of the plan meanwhile).
        runtime: the CUDA runtime (CUDA parameters), or None (CPU parameters).
        device: where the parameters live.
        spend: charged with the bytes of each read (fault injection).
        on_bytes: progress, with the bytes this rank copies.
        stats: where bytes, seconds and read time are added.
        error: a failure of this rank before the rounds (reported in the first one).
        stop: set when the rest of this rank's load failed (reported in the next round).

    Raises:
        The first failure of this rank, or CheckpointError when another rank failed.
    """
    t0 = time.perf_counter()
    cuda = runtime is not None
    stream = _stream(device) if cuda else None
    events: List[int] = _events(device, runtime) if cuda else []
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))  # after the load's zero-fills
    handle = stream.cuda_stream if stream is not None else 0
    aborted = False
    for k, spans in enumerate(split.rounds):
        base = (k % SLOTS) * SLOT_BYTES
        if error is None and stop is not None and stop.is_set():
            error = CheckpointError(os.path.dirname(min(fds)) if fds else "", "this rank's load failed")
        if error is None:
            try:
                t1 = time.perf_counter()
                pieces = _my_pieces(spans, node.rank, node.size)
                read = sum(_read_pool(pool).map(lambda p: _read_piece(seg, base, p, fds), pieces))
                spend(read)
                stats.bytes_read += read
                stats.read_calls += len(pieces)
                stats.read_seconds += time.perf_counter() - t1
                if cuda and k >= SLOTS - 1:  # so that after this round's collective, the slot
                    runtime.wait(events[(k + 1) % SLOTS])  # of round k + 1 is free on every rank
            except BaseException as exc:  # reported to every rank in this round's collective
                error = exc
        if not all_ok(node, error is None):
            aborted = True
            break
        try:
            nbytes = sum(_copy_out(seg, base, s, params, runtime, handle) for s in spans)
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
            os.path.dirname(min(fds)) if fds else "", "another tensor-parallel rank failed while the "
            "node's ranks read the row shards they share; the load is abandoned on every rank",
        )


_POOLS: Dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _read_pool(threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastload-shared")
        return _POOLS[threads]


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


def shared_paths(split: SharedSplit) -> List[str]:
    """The files the node's shared spans lie in."""
    return sorted({s.path for r in split.rounds for s in r})


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
