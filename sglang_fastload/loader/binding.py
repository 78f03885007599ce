"""Binding a load plan to one model's parameters and the readers' buffers.

A plan's steps are grouped into chunks (one staging buffer each) and dealt to the readers
(``deal``); every view, address and read target a chunk needs is made once here and reused
by later loads while the parameters and buffers stay where they are (checked by address).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
from typing import Dict, List, Optional, Tuple, Union

import torch

from sglang_fastload import constants
from sglang_fastload.loader import cuda_runtime
from sglang_fastload.loader.plan import STAGING_ALIGN, CopyStep, LoadPlan, staging_aligned
from sglang_fastload.loader.staging import Worker, reserve, wait_prepared, workers_for
from sglang_fastload.loader.straight_pieces import StraightPiece, file_items, lands_straight


@dataclasses.dataclass
class Chunk:
    """Steps of one file staged together in one buffer (``nbytes``: their aligned sizes)."""

    path: str
    steps: List[CopyStep]
    nbytes: int


def chunks_of(plan: LoadPlan, chunk_bytes: int) -> List[Chunk]:
    """Each file's steps, in file order, in full chunks of at most ``chunk_bytes`` (``sized_chunks``)."""
    return [Chunk(fp.path, steps, nbytes) for fp in plan.files for steps, nbytes in fp.chunks(chunk_bytes)]


# What a reader stages in one buffer: a chunk of steps, or a piece of a large straight step.
Staged = Union[Chunk, StraightPiece]


def staged_items(plan: LoadPlan, chunk_bytes: int, params: Dict[str, torch.Tensor]) -> List[Staged]:
    """A CUDA load's chunks, in file order: large steps that land straight in their parameters
    as pieces (``straight_pieces``), every other step in chunks as ``chunks_of`` groups them."""
    return [item if isinstance(item, StraightPiece) else Chunk(path, *item)
            for path, items in file_items(plan, chunk_bytes, params) for item in items]


def _writable_view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _param_view(param: torch.Tensor, geometry) -> torch.Tensor:
    off, sizes, strides = geometry
    return param.as_strided(sizes, strides, param.storage_offset() + off)


@dataclasses.dataclass(slots=True)
class BoundChunk:
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
class Binding:
    """A plan bound to one set of parameters and workers: chunks per worker, in order."""

    steps_lists: Tuple[List[CopyStep], ...]  # kept alive so their ids stay unique
    param_ptrs: Tuple[int, ...]
    workers: List[Worker]
    buffers: List[Tuple[Optional[torch.Tensor], ...]]
    per_worker: List[List[BoundChunk]]
    zeros: List[torch.Tensor]
    lane: int = -1  # index of the zero-copy lane in ``workers`` (-1: none)
    runtime: Optional[cuda_runtime.CudaRuntime] = None  # what ``copies`` were bound for
    # What a reader needs to bind a chunk dealt to another (``bind_taken``): the unbound
    # chunks in the order of ``per_worker`` and each file's index (no tensors: a binding
    # kept in the cache must not keep replaced parameters alive).
    dealt: List[List[Staged]] = dataclasses.field(default_factory=list)
    file_index: Dict[str, int] = dataclasses.field(default_factory=dict)

    def bind_taken(self, owner: int, index: int, reader: int, turn: int, params: Dict[str, torch.Tensor]) -> BoundChunk:
        """Bind chunk ``index`` of reader ``owner`` for reader ``reader``'s buffer ``turn``
        (every reader's buffers hold any reader's chunk: ``bind`` sizes them alike).

        Args:
            owner, index: the chunk, as dealt.
            reader, turn: the reader that runs it and which of its two buffers stages it.
            params: the parameters of this load (``{name: parameter data}``).

        Returns:
            The chunk bound for that reader.
        """
        chunk = self.dealt[owner][index]
        return bind_staged(chunk, self.file_index[chunk.path], params, self.workers[reader], turn)


def _reads_into_parameter(step: CopyStep, param_dtype: torch.dtype) -> bool:
    """The step's bytes are exactly the destination's elements (a parameter of ``param_dtype``),
    so they can be read (CPU) or copied (a device scratch) in place. Bytes of another dtype
    are staged, then converted by the copy (as upstream's ``copy_`` does)."""
    return step.view_is_dense and step.dst_is_contiguous and (step.src_dtype is None or step.src_dtype == param_dtype)


def _device_bytes(tensor: torch.Tensor, byte_offset: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` of ``tensor``'s storage from ``byte_offset`` past its first element, as uint8."""
    flat = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    start = tensor.storage_offset() * tensor.element_size() + byte_offset
    return flat.set_(tensor.untyped_storage(), start, (nbytes,), (1,))


def _lands_as_staged(step: CopyStep, param_dtype: torch.dtype) -> bool:
    """CUDA: whether the staged bytes of ``step`` are copied straight into its parameter,
    i.e. they are its destination's elements in order and in the parameter's dtype. A gathered
    step is staged densely (``dense_view``), so this holds whenever the destination is
    contiguous (row-parallel shards are); any other step also needs a dense view. Asked of
    every step when a plan is bound: one call, the dtype looked up by the caller."""
    src_dtype = step.src_dtype
    return step.dst_is_contiguous and (step.gather or step.view_is_dense) and (src_dtype is None or src_dtype == param_dtype)


def bind_chunk(
    chunk: Chunk, file_index: int, params: Dict[str, torch.Tensor], worker: Worker, turn: int, via_scratch: bool = False
) -> BoundChunk:
    """Make every view, address and read target one chunk needs.

    Args:
        chunk: the chunk.
        file_index: its file's index in the plan.
        params: ``{name: parameter data}``.
        worker: the reader that runs it (its buffers reserved, its runtime set).
        turn: which of the reader's two host buffers stages it.
        via_scratch: zero-copy lane: every staged byte lands in the device scratch first.

    Returns:
        The bound chunk.
    """
    cuda = worker.cuda
    if cuda and not via_scratch and len(chunk.steps) == 1:
        lone = _bind_lone_straight(chunk, file_index, params, worker, turn)
        if lone is not None:
            return lone
    direct: List[Tuple[int, int, int]] = []  # (address, file offset, nbytes), merged
    gathers: List[Tuple[torch.Tensor, CopyStep]] = []
    staged: List[CopyStep] = chunk.steps if cuda else []  # CUDA stages every step
    for step in () if cuda else chunk.steps:
        if step.gather:
            gathers.append((_param_view(params[step.param], step.dst), step))
        elif _reads_into_parameter(step, params[step.param].dtype):
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
    # Fields in order, positionally (half the time of keywords; a start binds thousands):
    # file, nbytes, direct, gathers, buffer, segments, places, staged_bytes, copies,
    # copy_views, dsts, srcs, device, fault_bytes.
    bound = BoundChunk(
        file_index, chunk.nbytes, [(_writable_view(a, n), off) for a, off, n in direct],
        gathers, -1, [], [], 0, [], [], [], [], None, chunk.nbytes,
    )
    if not staged:
        return bound
    # One pass over the staged steps, in order: where each lies in the buffer (file-contiguous
    # neighbours share one read), the reads into the buffer, and the copies out of it.
    buf = worker.buffers[turn]
    base = buf.data_ptr()
    segments: List[List[int]] = []  # [file offset, nbytes, buffer position]
    # CUDA copies of the staged bytes: [target (parameter name or "" for the scratch),
    # byte offset in the target, buffer position, nbytes], merged where both sides continue.
    spans: List[List] = []
    seg = span = None  # the last of each (merged into while both sides continue)
    straight_possible = cuda and not via_scratch
    align = STAGING_ALIGN
    pos = 0
    prev_end = None
    for step in staged:
        gather = step.gather
        if not gather and prev_end == step.reads[0][0] and pos % step.itemsize == 0:
            start = pos
        else:
            start = (pos + align - 1) // align * align  # staging_aligned(pos)
        nbytes = step.nbytes
        pos = start + nbytes
        param = params[step.param]
        if gather:
            prev_end = None
            gathers.append((buf.narrow(0, start, nbytes).view(step.src_dtype or param.dtype).view(step.view[1]), step))
        else:
            p = start
            for off, n in step.reads:
                if seg is not None and seg[0] + seg[1] == off and seg[2] + seg[1] == p:
                    seg[1] += n
                else:
                    seg = [off, n, p]
                    segments.append(seg)
                p += n
            last = step.reads[-1]
            prev_end = last[0] + last[1]
        if straight_possible and _lands_as_staged(step, param.dtype):
            target, at = step.param, step.dst[0] * param.element_size()
        elif cuda:
            target, at = "", start
        else:
            target = None
        if target is not None:
            if span is not None and span[0] == target and span[1] + span[3] == at and span[2] + span[3] == start:
                span[3] += nbytes
            else:
                span = [target, at, start, nbytes]
                spans.append(span)
            if target:
                continue
        source = worker.scratch if cuda else buf
        dst = _param_view(param, step.dst)
        src = source.narrow(0, start, nbytes).view(step.src_dtype or dst.dtype)
        off, sizes, strides = step.dense_view if gather else step.view
        bound.dsts.append(dst)
        bound.srcs.append(src.as_strided(sizes, strides, src.storage_offset() + off))
    bound.buffer = turn
    whole = worker.buffer_bytes(turn)
    bound.segments = [(whole[p:p + n], off) for off, n, p in segments]
    bound.places = [tuple(x) for x in segments]
    bound.staged_bytes = pos
    for target, at, p, n in spans:
        device_tensor = params[target] if target else worker.scratch
        if worker.runtime is not None:
            bound.copies.append((device_tensor.data_ptr() + at, base + p, n))
        else:
            bound.copy_views.append((_device_bytes(device_tensor, at, n), buf.narrow(0, p, n)))
    if via_scratch:
        bound.device = worker.scratch.narrow(0, 0, pos)
    return bound


def _bind_lone_straight(chunk: Chunk, file_index: int, params: Dict[str, torch.Tensor], worker: Worker, turn: int) -> Optional[BoundChunk]:
    """``bind_chunk`` of a CUDA chunk that is one step read in one piece and copied straight
    into its parameter (most chunks of a large dense tensor), or None for any other chunk.

    The same result as the general loop (one segment at the buffer's start, one copy), with
    none of its per-step bookkeeping: a Qwen3-8B start binds ~2,700 such chunks."""
    step = chunk.steps[0]
    param = params[step.param]
    if not lands_straight(step, param.dtype):
        return None
    off, n = step.reads[0]
    return _read_and_copy_straight(file_index, chunk.nbytes, param, off, n, step.dst[0] * param.element_size(), worker, turn)


def _read_and_copy_straight(file_index: int, nbytes: int, param: torch.Tensor, off: int, n: int, at: int,
                            worker: Worker, turn: int) -> BoundChunk:
    """A CUDA chunk of one read (``n`` bytes at file offset ``off``) into the start of buffer
    ``turn``, copied to byte ``at`` of ``param``; ``nbytes``: the chunk's size for progress."""
    buf = worker.buffers[turn]
    if worker.runtime is not None:
        copies, copy_views = [(param.data_ptr() + at, buf.data_ptr(), n)], []
    else:
        copies, copy_views = [], [(_device_bytes(param, at, n), buf.narrow(0, 0, n))]
    return BoundChunk(  # positionally, in field order (``bind_chunk``)
        file_index, nbytes, [], [], turn, [(worker.buffer_bytes(turn)[0:n], off)], [(off, n, 0)], n,
        copies, copy_views, [], [], None, nbytes,
    )


def bind_piece(piece: StraightPiece, file_index: int, params: Dict[str, torch.Tensor], worker: Worker, turn: int) -> BoundChunk:
    """Bind a piece of a large straight step (CUDA): one read into the start of buffer
    ``turn``, one copy into its parameter; the chunk ``_bind_lone_straight`` makes of a step
    of the same bytes.

    Args:
        piece: the piece.
        file_index: its file's index in the plan.
        params: ``{name: parameter data}``.
        worker: the reader that runs it (its buffers reserved, its runtime set).
        turn: which of the reader's two host buffers stages it.

    Returns:
        The bound chunk.
    """
    n = piece.nbytes
    return _read_and_copy_straight(file_index, n, params[piece.param], piece.offset, n, piece.at, worker, turn)


def bind_staged(item: Staged, file_index: int, params: Dict[str, torch.Tensor], worker: Worker, turn: int,
                via_scratch: bool = False) -> BoundChunk:
    """``bind_piece`` for a piece, ``bind_chunk`` for a chunk (same arguments)."""
    if type(item) is StraightPiece:
        return bind_piece(item, file_index, params, worker, turn)
    return bind_chunk(item, file_index, params, worker, turn, via_scratch)


def staged_size(chunk: Staged, cuda: bool, params: Dict[str, torch.Tensor], via_scratch: bool = False) -> Tuple[int, int]:
    """Upper bounds of the host buffer and device scratch bytes ``bind_staged`` uses for a chunk."""
    if type(chunk) is StraightPiece:
        return chunk.nbytes, 0
    if cuda:  # every step is staged
        total = 0
        scratch = via_scratch
        for step in chunk.steps:
            total = (total + STAGING_ALIGN - 1) // STAGING_ALIGN * STAGING_ALIGN + step.nbytes
            scratch = scratch or not _lands_as_staged(step, params[step.param].dtype)
        return total, (total if scratch else 0)
    total = 0  # CPU: only what is neither gathered nor read in place is staged; no scratch
    for step in chunk.steps:
        if not (step.gather or _reads_into_parameter(step, params[step.param].dtype)):
            total = staging_aligned(total) + step.nbytes
    return total, 0


# Bindings kept per cache (one cache per model: its views keep only that model's memory).
_MAX_BINDINGS = 2


def split_for_lane(chunks: List[Chunk], share: float) -> Tuple[List[Chunk], List[Chunk]]:
    """Chunks for the zero-copy lane (about ``share`` of the bytes, spread over the load) and
    the rest. The lane takes only chunks without gathered steps (those need a CPU pass)."""
    lane: List[Chunk] = []
    rest: List[Chunk] = []
    seen = taken = 0
    for c in chunks:
        seen += c.nbytes
        if share > 0 and taken < share * seen and not any(st.gather for st in c.steps):
            lane.append(c)
            taken += c.nbytes
        else:
            rest.append(c)
    return lane, rest


def dealing() -> str:
    """How chunks are dealt to readers (constants.ENV_DEAL_CHUNKS; unknown values: the default)."""
    value = os.environ.get(constants.ENV_DEAL_CHUNKS, constants.DEAL_RUNS)
    return value if value == constants.DEAL_ROUND_ROBIN else constants.DEAL_RUNS


def deal(chunks: List[Staged], readers: int, how: str = constants.DEAL_RUNS) -> List[List[Staged]]:
    """Split ``chunks`` (in file order) among ``readers``.

    ``runs``: each reader a contiguous run, of about equal bytes (a chunk goes to the reader
    whose share holds its middle byte), so each reads one region of the files front to back:
    on a cold page cache the disk then serves ``readers`` sequential streams instead of
    ``readers`` threads hopping through one region together (docs/benchmarks.md, 2026-12-03:
    cold updates ~10 % faster on the CI machine's disk). A reader that runs out takes the
    last unstarted chunk of another (executor.py), which leaves the owner's stream whole.
    ``round-robin``: reader k gets chunks k, k + readers, ...

    Returns:
        One list per reader, in the order it reads them (a list may be empty when single
        chunks are larger than a reader's share).
    """
    if how == constants.DEAL_ROUND_ROBIN:
        return [chunks[k::readers] for k in range(readers)]
    total = sum(c.nbytes for c in chunks) or 1
    out: List[List[Staged]] = [[] for _ in range(readers)]
    seen = 0
    for c in chunks:
        middle = seen + c.nbytes / 2
        out[min(readers - 1, int(middle * readers / total))].append(c)
        seen += c.nbytes
    return out


def direct_runtime() -> Optional[cuda_runtime.CudaRuntime]:
    """The CUDA runtime for the readers' own copies, unless switched off (constants.py)."""
    if os.environ.get(constants.ENV_DIRECT_CUDA_CALLS, "1") == "0":
        return None
    return cuda_runtime.runtime()


def bind(
    plan: LoadPlan,
    params: Dict[str, torch.Tensor],
    device: torch.device,
    threads: int,
    chunk_bytes: int,
    cache: Optional[dict],
    zero_copy_share: float = 0.0,
) -> Binding:
    """Chunks of ``plan`` with their views made, dealt to ``threads`` workers (``deal``;
    plus, on CUDA with ``zero_copy_share`` > 0, the zero-copy lane's chunks to one more).

    Reused from ``cache`` while the parameters and the workers' buffers stay where they
    were (checked by address on every call); a plan rebound to other files of the same
    layout reuses it too.

    Every reader's chunks are bound here, before the first read. Binding each chunk in the
    reader that comes to it instead was measured slower on H200 hosts three times (readers'
    threads 0.04-0.19 s longer: binding holds the interpreter between a reader's read and
    copy calls, and sixteen readers wait for it in turn; docs/benchmarks.md, "binding by
    the readers").
    """
    cache = {} if cache is None else cache
    steps_lists = tuple(fp.steps for fp in plan.files)
    names = sorted(plan.param_meta)
    ptrs = tuple(params[n].data_ptr() for n in names)
    cuda = device.type == "cuda"
    share = zero_copy_share if cuda else 0.0
    runtime = direct_runtime() if cuda else None
    how = dealing()
    key = (tuple(map(id, steps_lists)), str(device), threads, chunk_bytes, share, runtime is not None, how)
    bound = cache.get(key)
    if bound is not None and bound.param_ptrs == ptrs and all(
        all(x is y for x, y in zip(tuple(w.buffers) + (w.scratch,), b)) for w, b in zip(bound.workers, bound.buffers)
    ):
        return bound
    if cuda and not share:
        # Large straight steps as pieces: no step, chunk or general binding per piece.
        lane_chunks, chunks = [], staged_items(plan, chunk_bytes, params)
    else:
        lane_chunks, chunks = split_for_lane(chunks_of(plan, chunk_bytes), share)
    wait_prepared(device, chunk_bytes)
    threads = max(1, min(threads, len(chunks)))
    workers = workers_for(device, threads + (1 if lane_chunks else 0), chunk_bytes)
    file_index = {fp.path: i for i, fp in enumerate(plan.files)}
    dealt = deal(chunks, threads, how)
    if lane_chunks:
        dealt.append(lane_chunks)
    lane = threads if lane_chunks else -1
    sizes = []
    for k, mine in enumerate(dealt):
        staged = [staged_size(c, cuda, params, k == lane) for c in mine]
        sizes.append((max([h for h, _ in staged] + [0]), max([d for _, d in staged] + [0])))
    # Readers' buffers alike, so that a reader can run a chunk dealt to another.
    readers = sizes[:threads]
    sizes[:threads] = [(max(h for h, _ in readers), max(d for _, d in readers))] * threads
    reserve(workers, sizes)
    per_worker = []
    for k, (w, mine) in enumerate(zip(workers, dealt)):
        w.runtime = runtime  # bind_chunk binds addresses (runtime) or tensors (torch)
        per_worker.append([bind_staged(c, file_index[c.path], params, w, i % 2, k == lane) for i, c in enumerate(mine)])
    bound = Binding(
        steps_lists=steps_lists,
        param_ptrs=ptrs,
        workers=workers,
        buffers=[tuple(w.buffers) + (w.scratch,) for w in workers],
        per_worker=per_worker,
        zeros=[_param_view(params[z.param], z.dst) for z in plan.zeros],
        lane=lane,
        runtime=runtime,
        dealt=dealt[:threads],
        file_index=file_index,
    )
    cache.pop(key, None)
    cache[key] = bound
    while len(cache) > _MAX_BINDINGS:
        cache.pop(next(iter(cache)))
    return bound
