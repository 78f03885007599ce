"""Which recorded writes a plan runs: every parameter element written, each as upstream leaves it.

Upstream's loaders write one checkpoint tensor after another (files sorted, names sorted in
each file), so where two writes land on the same elements the later one stays. The plan's
copies run in parallel, in file order, after its zero-fills. So, element by element:

* a write that a later one replaces whole (the same elements: a tied ``lm_head`` stored
  beside the embedding it shares memory with) is dropped, so the bytes that stay are the
  ones upstream leaves, and are read once;
* a zero-fill followed by copies into part of it is what the executor does too;
* any other overlap (two copies into partly the same elements, a zero-fill after a copy)
  cannot be run in parallel as upstream runs it in order: the model is not planned
  (``UnsupportedModelError``), and upstream's path loads it;
* an element no write reaches is a parameter not (fully) fed: refused, naming it. Elements
  are compared exactly, not counted: two writes to one slice cannot hide a missing one.

Parameters that are not contiguous, or writes split into more than ``MAX_EXACT_RUNS`` runs on
one storage, are checked by counting their elements (``validate.check_coverage``).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from sglang_fastload.errors import UnsupportedModelError
from sglang_fastload.loader import validate
from sglang_fastload.loader.plan import contiguous_runs, numel, run_length
from sglang_fastload.loader.replay import RecordedCopy, RecordedZero, ReplayResult

# Beyond this many runs of consecutive elements on one storage, elements are counted instead
# (an expert weight laid out [E, H, 2I] takes one run per row of each expert's w1/w3: 2*E*H,
# ~1M for 128 experts of H=4096, which would take ~0.4 s per parameter to compare).
MAX_EXACT_RUNS = 1 << 16


@dataclasses.dataclass(frozen=True)
class SettledWrites:
    """The writes a plan runs (in the replay's order)."""

    copies: List[RecordedCopy]
    zeros: List[RecordedZero]


# A recorded write as ``(order, zero, index, dst)``: its place in upstream's order (a copy: its
# index; a zero-fill: just before the first copy made after it), whether it is a zero-fill,
# its index in result.copies or result.zeros, and its destination geometry. Tuples, as a MoE
# replay records ~6,000 of them and they are only sorted and compared here.
_Write = Tuple[float, bool, int, tuple]


def _writes_by_param(result: ReplayResult) -> Dict[str, List[_Write]]:
    out: Dict[str, List[_Write]] = {}
    for i, c in enumerate(result.copies):
        writes = out.get(c.param)
        if writes is None:
            writes = out[c.param] = []
        writes.append((i, False, i, c.dst))
    after = result.zeros_after or [len(result.copies)] * len(result.zeros)
    for i, z in enumerate(result.zeros):
        out.setdefault(z.param, []).append((after[i] - 0.5, True, i, z.dst))
    return out


def _runs(writes: Sequence[_Write], limit: int) -> Optional[List[Tuple[int, int, int]]]:
    """``(start, end, position in writes)`` of the elements each write reaches, as runs of
    consecutive elements, sorted; None when they are more than ``limit`` (counted first)."""
    # (sizes, strides) -> (elements, runs): one run when the view is dense (its elements then
    # form one interval, in any order). Shapes repeat (experts), so each is worked out once.
    shapes: Dict[tuple, Tuple[int, int]] = {}
    count = 0
    for _, _, _, (_, sizes, strides) in writes:
        shape = (sizes, strides)
        known = shapes.get(shape)
        if known is None:
            n = math.prod(sizes)
            if n and 1 + sum((a - 1) * b for a, b in zip(sizes, strides)) == n:
                known = (n, 1)
            else:
                run = run_length((0, sizes, strides))
                known = (n, n // run if run else 0)
            shapes[shape] = known
        count += known[1]
    if count > limit:
        return None
    out = []
    for k, (_, _, _, dst) in enumerate(writes):
        offset, sizes, strides = dst
        n, runs = shapes[(sizes, strides)]
        if runs == 1:
            out.append((offset, offset + n, k))
        elif runs:
            run, starts = contiguous_runs(dst)
            out += [(start, start + run, k) for start in starts]
    out.sort()
    return out


def _what(result: ReplayResult, write: _Write) -> str:
    return "a zero-fill" if write[1] else repr(result.copies[write[2]].tensor)


def _check_overlaps(result: ReplayResult, param: str, runs: List[Tuple[int, int, int]], kept: List[_Write]) -> None:
    """Raise unless every two kept writes that share elements are a zero-fill and a later write
    (the executor zero-fills first, as upstream did then). Runs only where runs overlap."""
    active: List[Tuple[int, int]] = []  # (end, position in kept) of the runs not yet passed
    for start, end, k in runs:
        active = [(e, j) for e, j in active if e > start]
        for _, j in active:
            if j == k:
                continue
            earlier, later = sorted((kept[j], kept[k]))
            if not earlier[1]:
                raise UnsupportedModelError(
                    f"the loaders write {_what(result, earlier)} and then {_what(result, later)} into partly "
                    f"the same elements of parameter {param!r}: only upstream's loader runs such writes in order"
                )
        active.append((end, k))


def _settle_one(result: ReplayResult, param: str, writes: List[_Write], regions: List[Tuple[int, int, str]],
                directory: str) -> Optional[List[_Write]]:
    """The writes to keep on one storage (``regions``: its parameters' ``(start, end, name)``),
    or None where elements must be counted instead."""
    writes = sorted(writes)
    last_by_dst = {w[3]: w for w in writes}  # a write the next one with the same elements replaces whole
    kept = writes if len(last_by_dst) == len(writes) else sorted(last_by_dst.values())
    runs = _runs(kept, MAX_EXACT_RUNS)
    if runs is None:
        return None
    covered: List[List[int]] = []  # merged [start, end) of what the kept writes reach
    overlap = False
    for start, end, _ in runs:
        if covered and start <= covered[-1][1]:
            overlap = overlap or start < covered[-1][1]
            if end > covered[-1][1]:
                covered[-1][1] = end
        else:
            covered.append([start, end])
    if overlap:
        _check_overlaps(result, param, runs, kept)
    starts = [c[0] for c in covered]
    for start, end, name in regions:
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or covered[i][1] < end:
            fed = sum(max(0, min(e, end) - max(s, start)) for s, e in covered)
            validate.check_coverage({name: end - start}, {name: fed}, directory)
            raise AssertionError("unreachable: a gap is counted as partly fed")  # pragma: no cover
    return kept


def settle_writes(result: ReplayResult, params: Dict[str, torch.Tensor], directory: str) -> SettledWrites:
    """The copies and zero-fills a plan runs, checked to feed every element of every parameter.

    Args:
        result: the replay of the model's loaders (writes in upstream's order).
        params: ``parameters_by_name(model)`` (the replay named each storage after its first).
        directory: the checkpoint, for messages.

    Returns:
        The writes to run: those no later write replaces whole.

    Raises:
        CheckpointMismatchError: a parameter not fully fed, naming it.
        UnsupportedModelError: writes that overlap other than as above (upstream's path loads them).
    """
    storages: Dict[int, Tuple[str, int]] = {}  # storage -> (the name the replay used, its offset)
    regions: Dict[str, List[Tuple[int, int, str]]] = {}
    exact: Dict[str, bool] = {}
    for name, p in params.items():
        first, base = storages.setdefault(p.untyped_storage()._cdata, (name, p.storage_offset()))
        start = p.storage_offset() - base
        regions.setdefault(first, []).append((start, start + p.numel(), name))
        exact[first] = exact.get(first, True) and p.is_contiguous()
    by_param = _writes_by_param(result)
    keep_copies, keep_zeros = [False] * len(result.copies), [False] * len(result.zeros)
    counted_numels: Dict[str, int] = {}
    counted_writes: Dict[str, int] = {}
    for first, spans in regions.items():
        writes = by_param.get(first, [])
        kept = _settle_one(result, first, writes, spans, directory) if exact[first] and writes else None
        if kept is None:  # counted, as every write is kept
            kept = writes
            counted_numels[first] = sum(e - s for s, e in {(s, e) for s, e, _ in spans})
            counted_writes[first] = sum(numel(w[3]) for w in writes)
        for _, zero, index, _ in kept:
            (keep_zeros if zero else keep_copies)[index] = True
    validate.check_coverage(counted_numels, counted_writes, directory)
    return SettledWrites(
        [c for c, keep in zip(result.copies, keep_copies) if keep],
        [z for z, keep in zip(result.zeros, keep_zeros) if keep],
    )
