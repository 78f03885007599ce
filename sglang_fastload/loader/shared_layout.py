"""Which bytes the tensor-parallel ranks of a node share, and which part each rank reads.

Pure functions over plans (no I/O, no collectives): a rank's gather steps that a 2D copy can
serve, the node's spans merged from every rank's (one per tensor), packed into rounds that
fit a slot of the node's shared memory, each rank's steps within them, and each rank's
contiguous part of a round. ``shared_spans.py`` runs them.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch

from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan, staging_aligned

# Bytes of one round (one slot of the node's shared memory).
SLOT_BYTES = 64 << 20
# A rank's part of a round is read by its read pool in pieces of at most this many bytes.
READ_PIECE_BYTES = 4 << 20


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


def rank_spans(plan: LoadPlan, params: Dict[str, torch.Tensor], cache: dict) -> List[Tuple[str, int, int]]:
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


def split_plan(plan: LoadPlan, params: Dict[str, torch.Tensor], rounds: Sequence[Sequence[Tuple[str, int, int, int]]],
               own: bool = True) -> SharedSplit:
    """This rank's side of the node's rounds: its steps within each shared span, and the rest.

    Args:
        plan: the rank's plan.
        params: ``{name: parameter data}``.
        rounds: ``node_rounds``' result.
        own: False: none of the plan's steps are taken (the rank only reads its parts).

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
            if own and shareable(step, params[step.param]):
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


def pieces_of_rank(spans: Sequence[SharedSpan], rank: int, size: int) -> List[Tuple[str, int, int, int]]:
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


def shared_paths(split: SharedSplit) -> List[str]:
    """The files the node's shared spans lie in."""
    return sorted({s.path for r in split.rounds for s in r})
