"""Load plans: for every parameter slice, which byte ranges of which file feed it.

A plan is built once per checkpoint layout from a replay (``replay.py``) and the parsed
safetensors headers, then executed by ``executor.py`` for every load of that layout.
Offsets are absolute file offsets; geometries are ``(offset, sizes, strides)`` in elements.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

from sglang_fastload.loader.replay import Geometry, RecordedCopy, RecordedZero

# Steps staged in one buffer start at multiples of this many bytes (views of any dtype).
STAGING_ALIGN = 64

# Below this many bytes per contiguous run, a strided slice (a row-parallel shard) is not
# read run by run: its elements are gathered from a read-only mapping of the file instead,
# so a rank still copies only the bytes it keeps and the ranks of a node read the
# checkpoint about once. Run by run, every run is one system call plus interpreter work
# that the reader threads do one at a time: on an H200 host, Qwen3-8B at TP=2 (12 KiB runs
# of down_proj, 4 KiB of o_proj, 4096 as the limit) took 2.55 s per update against 0.42-0.47 s
# gathered (docs/benchmarks.md, 2026-12-02 fifth run); 1 MiB was as fast as 64 KiB or faster.
DEFAULT_MIN_SEGMENT_BYTES = 1 << 20


class _computed_once:
    """A derived attribute computed on first use and kept in the instance's ``__dict__``
    (``functools.cached_property`` without its per-access lock, which Python 3.8-3.11
    take: binding a restarted server's plan asks ~20,000 of them once each)."""

    def __init__(self, compute):
        self.compute = compute
        self.name = compute.__name__
        self.__doc__ = compute.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = self.compute(instance)
        instance.__dict__[self.name] = value  # found before this descriptor from now on
        return value


@dataclasses.dataclass(frozen=True)
class CopyStep:
    """Read ``reads`` back to back into a buffer, then copy ``view`` of it into ``dst``.

    A *gather* step has one read, the span of a strided slice with short runs; only
    ``view``'s elements of that span are copied, straight from a mapping of the file, into
    ``nbytes`` dense bytes (``dense_view``).

    Attributes:
        tensor: checkpoint tensor name (for messages).
        param: destination parameter name.
        dst: destination geometry within the parameter.
        reads: ``(file offset, nbytes)`` pieces, concatenated in the buffer in this order.
        view: geometry of the destination's elements within the concatenated bytes.
        itemsize: bytes per element of the checkpoint tensor.
        src_dtype: the checkpoint tensor's torch dtype; the bytes are viewed as it and
            converted to the parameter's dtype by the copy when the two differ.
        gather: copy ``view``'s elements out of a file mapping instead of reading ``reads``.
    """

    tensor: str
    param: str
    dst: Geometry
    reads: Tuple[Tuple[int, int], ...]
    view: Geometry
    itemsize: int
    src_dtype: object = None
    gather: bool = False

    @classmethod
    def with_derived(cls, tensor, param, dst, reads, view, itemsize, src_dtype, gather, *,
                     view_numel: int, view_contiguous: bool, dst_contiguous: bool) -> "CopyStep":
        """``CopyStep(...)`` with the same fields, its derived values set from facts about its
        geometries the caller already has (``plan_store`` computes them once per geometry: a
        stored MoE plan repeats a few shapes thousands of times).

        Args:
            view_numel, view_contiguous: ``numel(view)`` and ``is_contiguous(view)``.
            dst_contiguous: ``is_contiguous(dst)``.
        """
        nbytes = _step_nbytes(gather, reads, view_numel, itemsize)
        return cls._with_values(tensor, param, dst, reads, view, itemsize, src_dtype, gather, nbytes, dst_contiguous,
                                _view_is_dense(gather, view, view_numel, view_contiguous, itemsize, nbytes))

    @classmethod
    def _with_values(cls, tensor, param, dst, reads, view, itemsize, src_dtype, gather,
                     nbytes: int, dst_is_contiguous: bool, view_is_dense: bool) -> "CopyStep":
        """``CopyStep(...)`` with its derived values given (the caller knows them: they must be
        what the step would compute). Positional: binding a start's plan makes thousands."""
        step = object.__new__(cls)  # the frozen __init__ sets fields one call at a time
        step.__dict__.update(
            tensor=tensor, param=param, dst=dst, reads=reads, view=view, itemsize=itemsize, src_dtype=src_dtype,
            gather=gather, nbytes=nbytes, dst_is_contiguous=dst_is_contiguous, view_is_dense=view_is_dense,
        )
        return step

    # Derived values are cached on the instance (binding a plan asks for them per chunk).
    @_computed_once
    def nbytes(self) -> int:
        """Bytes this step copies out of the file (and occupies in a staging buffer)."""
        return _step_nbytes(self.gather, self.reads, numel(self.view), self.itemsize)

    @property
    def dense_view(self) -> Geometry:
        """The destination's elements within the step's bytes once staged densely."""
        sizes = self.view[1]
        return (0, tuple(sizes), contiguous_strides(sizes))

    @_computed_once
    def view_is_dense(self) -> bool:
        """True when the read bytes are exactly the destination's elements in row-major order."""
        return _view_is_dense(self.gather, self.view, numel(self.view), is_contiguous(self.view), self.itemsize, self.nbytes)

    @_computed_once
    def dst_is_contiguous(self) -> bool:
        """True when the destination's elements are consecutive in the parameter."""
        return is_contiguous(self.dst)


def _step_nbytes(gather: bool, reads, view_numel: int, itemsize: int) -> int:
    # A gathered step keeps only its view's elements; any other keeps every byte it reads.
    if gather:
        return view_numel * itemsize
    return reads[0][1] if len(reads) == 1 else sum(n for _, n in reads)


def _view_is_dense(gather: bool, view: Geometry, view_numel: int, view_contiguous: bool, itemsize: int, nbytes: int) -> bool:
    return not gather and view_contiguous and view[0] == 0 and view_numel * itemsize == nbytes


@dataclasses.dataclass
class FilePlan:
    """One file's steps, in file-offset order.

    Attributes:
        path: the file.
        steps: its steps.
        chunked: ``sized_chunks(steps, chunk_bytes)`` by ``chunk_bytes``, worked out once:
            a built plan brings the chunks it was cut into, so its first load does not group
            its steps again (``chunks``); a copy of the plan for other files of the same
            layout (``dataclasses.replace``) shares them.
    """

    path: str
    steps: List[CopyStep]
    chunked: Dict[int, List[Tuple[List[CopyStep], int]]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.steps)

    def chunks(self, chunk_bytes: int) -> List[Tuple[List[CopyStep], int]]:
        """``sized_chunks(self.steps, chunk_bytes)``, worked out on first use."""
        found = self.chunked.get(chunk_bytes)
        if found is None:
            found = self.chunked[chunk_bytes] = sized_chunks(self.steps, chunk_bytes)
        return found


@dataclasses.dataclass
class LoadPlan:
    """Everything needed to load one checkpoint layout into one rank's parameters.

    Attributes:
        files: per-file steps, each list sorted by file offset.
        zeros: parameter regions to zero-fill (padding), applied before the copies.
        param_meta: ``{name: (shape, dtype)}`` of every parameter the plan writes, checked
            before each execution (a plan is only valid for the parameters it was made for).
        tensors_used: checkpoint tensors that feed this rank.
    """

    files: List[FilePlan]
    zeros: List[RecordedZero]
    param_meta: Dict[str, Tuple[Tuple[int, ...], object]]
    tensors_used: frozenset
    tensor_count: int

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)


def numel(geometry: Geometry) -> int:
    return math.prod(geometry[1])


def is_contiguous(geometry: Geometry) -> bool:
    """True when a geometry's elements are consecutive in row-major order."""
    expected = 1
    for size, stride in zip(reversed(geometry[1]), reversed(geometry[2])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def contiguous_runs(geometry: Geometry) -> Tuple[int, List[int]]:
    """Split a view of a row-major tensor into runs of consecutive elements.

    Args:
        geometry: ``(offset, sizes, strides)`` of the view, in elements.

    Returns:
        ``(run length, run start offsets in row-major order of the view)``.
    """
    run, outer = _run_and_outer_dims(geometry)
    if run == 0:
        return 0, []
    return run, _run_starts(geometry, outer)


def run_length(geometry: Geometry) -> int:
    """Elements in each run of consecutive elements of a view (``contiguous_runs``), 0 when empty."""
    return _run_and_outer_dims(geometry)[0]


def _run_starts(geometry: Geometry, outer: int) -> List[int]:
    """Start offsets of the runs, enumerating the ``outer`` leading dimensions."""
    offset, sizes, strides = geometry
    starts = [offset]
    for size, stride in zip(sizes[:outer], strides[:outer]):
        starts = [s + i * stride for s in starts for i in range(size)]
    # Row-major enumeration above iterates the outer dimension slowest, as required.
    return starts


def _run_and_outer_dims(geometry: Geometry) -> Tuple[int, int]:
    """``(elements per contiguous run, how many leading dimensions enumerate the runs)``;
    a run of 0 for an empty view."""
    _, sizes, strides = geometry
    if 0 in sizes:
        return 0, 0
    run = 1
    dim = len(sizes)
    while dim > 0 and (sizes[dim - 1] == 1 or strides[dim - 1] == run):
        run *= sizes[dim - 1]
        dim -= 1
    return run, dim


def _span(geometry: Geometry) -> Tuple[int, int]:
    offset, sizes, strides = geometry
    last = offset + sum((n - 1) * s for n, s in zip(sizes, strides))
    return offset, last + 1


def contiguous_strides(sizes: Sequence[int]) -> Tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(sizes):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def make_step(
    tensor: str,
    param: str,
    src: Geometry,
    dst: Geometry,
    data_start: int,
    itemsize: int,
    min_segment_bytes: int,
    src_dtype=None,
) -> Optional[CopyStep]:
    """Turn one recorded copy into a step that reads only this rank's bytes where worthwhile.

    Args:
        tensor, param: names, for messages and execution.
        src: the checkpoint elements copied (geometry in the checkpoint tensor).
        dst: the parameter elements written.
        data_start: absolute file offset of the checkpoint tensor's first byte.
        itemsize: bytes per element.
        min_segment_bytes: strided runs shorter than this are gathered from the span.
        src_dtype: the checkpoint tensor's torch dtype (see ``CopyStep``).

    Returns:
        The step, or None when the copy moves no element.
    """
    run, outer = _run_and_outer_dims(src)
    if run == 0:
        return None
    sizes = src[1]
    # Runs are enumerated only when they are read one by one (a gather needs its span).
    if math.prod(sizes[:outer]) == 1 or run * itemsize >= min_segment_bytes:
        reads: List[Tuple[int, int]] = []
        for s in _run_starts(src, outer):
            off = data_start + s * itemsize
            if reads and reads[-1][0] + reads[-1][1] == off:
                reads[-1] = (reads[-1][0], reads[-1][1] + run * itemsize)
            else:
                reads.append((off, run * itemsize))
        view = (0, tuple(sizes), contiguous_strides(sizes))
        view_contiguous = True
        gather = False
    else:
        lo, hi = _span(src)
        reads = [(data_start + lo * itemsize, (hi - lo) * itemsize)]
        view = (src[0] - lo, tuple(sizes), tuple(src[2]))
        view_contiguous = is_contiguous(view)
        # Element views of a mapping need element-aligned offsets; a file whose tensors
        # are not aligned (legal in safetensors) has its spans read whole instead.
        gather = data_start % itemsize == 0
    # Derived values set now, from what is known here (binding and cutting ask for them).
    return CopyStep.with_derived(tensor, param, dst, tuple(reads), view, itemsize, src_dtype, gather,
                                 view_numel=math.prod(sizes), view_contiguous=view_contiguous,
                                 dst_contiguous=is_contiguous(dst))


def split_rows(step: CopyStep, src: Geometry, data_start: int, max_bytes: int, min_segment_bytes: int) -> List[CopyStep]:
    """Split a step larger than ``max_bytes`` along its first dimension (bounded buffers)."""
    if step.nbytes <= max_bytes or len(src[1]) == 0 or src[1][0] <= 1:
        return [step]
    rows = src[1][0]
    row_bytes = max(1, step.nbytes // rows)
    per = max(1, max_bytes // row_bytes)
    out = []
    for r0 in range(0, rows, per):
        n = min(per, rows - r0)
        s = (src[0] + r0 * src[2][0], (n, *src[1][1:]), src[2])
        d = (step.dst[0] + r0 * step.dst[2][0], (n, *step.dst[1][1:]), step.dst[2])
        piece = make_step(step.tensor, step.param, s, d, data_start, step.itemsize, min_segment_bytes, step.src_dtype)
        if piece is not None:
            out.append(piece)
    return out


def cuttable_rows(step: CopyStep) -> int:
    """The row count of a step that can be cut between rows, else 0.

    A step can be cut when its bytes are its destination's elements in row-major order
    (a dense view of the same shape as the destination, not gathered) and it has more
    than one row: its first rows are then a prefix of its bytes and of its destination.
    """
    sizes = step.view[1]
    if not step.view_is_dense or tuple(step.dst[1]) != tuple(sizes) or len(sizes) == 0 or sizes[0] <= 1:
        return 0
    return sizes[0]


def cut_into_rows(step: CopyStep, counts: Sequence[int]) -> List[CopyStep]:
    """Cut a step that ``cuttable_rows`` allows into consecutive pieces of ``counts`` rows.

    Args:
        step: the step (dense view, destination of the same shape).
        counts: rows per piece, each > 0, summing to the step's row count.

    Returns:
        The pieces, in order: together they read the same bytes and write the same elements.
    """
    sizes = step.view[1]
    inner = tuple(sizes[1:])
    row_bytes = step.nbytes // sizes[0]
    dst_off, _, dst_strides = step.dst
    dst_strides = tuple(dst_strides)
    view_strides = contiguous_strides((1, *inner))  # the same for any row count
    reads = step.reads
    one_read = len(reads) == 1  # most steps: their pieces' reads are offsets into it
    r = 0  # next read to take from; its first ``used`` bytes already went to earlier pieces
    used = 0
    pieces = []
    first = 0
    for count in counts:
        want = count * row_bytes
        if one_read:
            piece_reads: Tuple[Tuple[int, int], ...] = ((reads[0][0] + first * row_bytes, want),)
        else:
            taken: List[Tuple[int, int]] = []
            while want:
                off, n = reads[r]
                take = min(n - used, want)
                taken.append((off + used, take))
                want -= take
                used += take
                if used == n:
                    r, used = r + 1, 0
            piece_reads = tuple(taken)
        piece_sizes = (count, *inner)
        dst = (dst_off + first * dst_strides[0], piece_sizes, dst_strides)
        # A piece's bytes are its destination's rows in order (a dense view): its derived
        # values are known, no need to work them out as ``with_derived`` would (same values).
        pieces.append(CopyStep._with_values(
            step.tensor, step.param, dst, piece_reads, (0, piece_sizes, view_strides), step.itemsize,
            step.src_dtype, False, count * row_bytes,
            # Rows of a contiguous destination are contiguous; others are checked.
            step.dst_is_contiguous or is_contiguous(dst),
            True,  # a dense view
        ))
        first += count
    return pieces


def staging_aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the staging alignment (where the next step may start)."""
    return (nbytes + STAGING_ALIGN - 1) // STAGING_ALIGN * STAGING_ALIGN


def aligned_nbytes(step: CopyStep) -> int:
    """Bytes a step takes in a staging buffer, its start aligned (an upper bound)."""
    return staging_aligned(step.nbytes)


def _piece_rows(rows: int, row_bytes: int, room: int, chunk_bytes: int) -> List[int]:
    """Rows per piece of a cuttable step of ``rows`` rows when ``room`` bytes are left in the
    current chunk: every piece but the last ends a chunk; a 0 ends the current chunk
    without a piece (not one row fits in what is left)."""
    # A piece starts aligned: n rows fit in ``room`` when n * row_bytes fits in its aligned part.
    whole = chunk_bytes - chunk_bytes % STAGING_ALIGN
    fits = room - room % STAGING_ALIGN
    counts = []
    left = rows
    while left * row_bytes > fits:
        n = fits // row_bytes  # < left here
        if n == 0:
            if fits < whole:  # not one row fits in what is left: the next chunk
                counts.append(0)
                fits = whole
                continue
            if left == 1:  # a row larger than a chunk: the last piece, a chunk of its own
                break
            n = 1
        counts.append(n)
        left -= n
        fits = whole
    counts.append(left)
    return counts


def sized_chunks(steps: Sequence[CopyStep], chunk_bytes: int) -> List[Tuple[List[CopyStep], int]]:
    """Group steps, in order, into chunks of at most ``chunk_bytes`` staged bytes, each with
    its staged bytes (the sum of its steps' ``aligned_nbytes``).

    A step that does not fit in what is left of a chunk is cut between rows where it can be
    (``cut_into_rows``: the head fills the chunk, whole chunks follow, the rest starts the
    next), so every chunk but the last is full: a load's cost is mostly per chunk (a read,
    a copy, a hand-over between threads), and 3 MiB expert tensors in 4 MiB chunks would
    otherwise take one chunk each. Grouping steps that were already cut this way finds
    nothing more to cut. A step larger than a chunk that cannot be cut gets one of its own.
    """
    out: List[Tuple[List[CopyStep], int]] = []
    cur: List[CopyStep] = []
    size = 0
    for step in steps:
        need = aligned_nbytes(step)
        if size + need > chunk_bytes:
            rows = cuttable_rows(step)
            if not rows:
                if cur:
                    out.append((cur, size))
                    cur, size = [], 0
            else:
                counts = _piece_rows(rows, step.nbytes // rows, chunk_bytes - size, chunk_bytes)
                kept = [n for n in counts if n]
                pieces = iter(cut_into_rows(step, kept) if len(kept) > 1 else [step])
                for n in counts[:-1]:
                    if n:
                        piece = next(pieces)
                        cur.append(piece)
                        size += aligned_nbytes(piece)
                    out.append((cur, size))
                    cur, size = [], 0
                step = next(pieces)
                need = aligned_nbytes(step)
        cur.append(step)
        size += need
        if size >= chunk_bytes:
            out.append((cur, size))
            cur, size = [], 0
    if cur:
        out.append((cur, size))
    return out


def build_plan(
    copies: Sequence[RecordedCopy],
    zeros: Sequence[RecordedZero],
    locations: Dict[str, tuple],
    param_meta: Dict[str, Tuple[Tuple[int, ...], object]],
    tensors_used: frozenset,
    tensor_count: int,
    *,
    max_step_bytes: int,
    min_segment_bytes: int = DEFAULT_MIN_SEGMENT_BYTES,
    cut: bool = True,
) -> LoadPlan:
    """Assemble a plan from recorded copies.

    Args:
        copies, zeros: the replay's records.
        locations: ``{tensor name: (file path, absolute data start, itemsize, torch dtype)}``.
        param_meta: shape and dtype of every parameter (to re-check before executing).
        tensors_used: names that feed this rank.
        tensor_count: number of tensors in the checkpoint.
        min_segment_bytes: see ``make_step``.
        max_step_bytes: the executor's chunk size: steps larger than this are split so
            buffers stay bounded, and steps are cut so that chunks of this size are full
            (``sized_chunks``; a plan stored with them needs no cutting when loaded).
        cut: cut the steps into chunks now (``cut_into_chunks``); False for a first start's
            plan, whose first load copies it out of a scratch (a streamed start) or cuts its
            large straight steps by arithmetic (``straight_pieces``): its steps are cut
            where it is stored, off the load's path.

    Returns:
        The plan, with each file's steps in file-offset order.
    """
    by_file: Dict[str, List[CopyStep]] = {}
    for c in copies:
        path, data_start, itemsize, src_dtype = locations[c.tensor]
        step = make_step(c.tensor, c.param, c.src, c.dst, data_start, itemsize, min_segment_bytes, src_dtype)
        if step is None:
            continue
        # Steps that can be cut between rows are cut where chunks end (``sized_chunks``);
        # the others are split here so that buffers stay bounded.
        by_file.setdefault(path, []).extend(
            [step] if cuttable_rows(step) else split_rows(step, c.src, data_start, max_step_bytes, min_segment_bytes)
        )
    files = [FilePlan(path, sorted(steps, key=lambda s: s.reads[0][0])) for path, steps in sorted(by_file.items())]
    used_meta = {c.param: param_meta[c.param] for c in copies}
    used_meta.update({z.param: param_meta[z.param] for z in zeros})
    plan = LoadPlan(files, list(zeros), used_meta, tensors_used, tensor_count)
    return cut_into_chunks(plan, max_step_bytes) if cut else plan


def cut_into_chunks(plan: LoadPlan, chunk_bytes: int) -> LoadPlan:
    """``plan`` with each file's steps cut where chunks of ``chunk_bytes`` end (``sized_chunks``,
    worked out once per ``FilePlan``: ``plan``'s own files keep their chunks too), each new
    file plan holding its chunks for the first bind (grouping the cut steps again would find
    these same chunks). Steps already cut this way stay as they are.

    Args:
        plan: a plan.
        chunk_bytes: the executor's chunk size.

    Returns:
        The plan with cut steps (a new plan; ``plan`` is not changed but for its memo).
    """
    files = []
    for fp in plan.files:
        chunks = fp.chunks(chunk_bytes)
        files.append(FilePlan(fp.path, [st for chunk, _ in chunks for st in chunk], {chunk_bytes: chunks}))
    return dataclasses.replace(plan, files=files)
