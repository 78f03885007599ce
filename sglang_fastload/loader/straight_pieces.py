"""Large steps whose bytes land straight in their parameters, cut into chunk-sized pieces by
arithmetic: no cut step, chunk or per-step bookkeeping for each piece.

A load groups its plan's steps into chunks of at most the chunk size before its first read
(``binding.bind``). A large dense tensor is many chunks (Qwen3-8B in 6 MiB chunks: ~2,700),
and a first start that cut each into a step, grouped it into a chunk, sized and bound it spent
24-40 ms of a 0.38 s start on it on an H200 host (docs/benchmarks.md, twentieth run).

A step read in one piece whose bytes are its destination's elements in order, in the
parameter's dtype, into a contiguous destination (what ``binding._lands_as_staged`` calls
landing as staged, not gathered) can be cut at any byte offset that keeps elements whole:
bytes ``[k*u, (k+1)*u)`` of its read land ``k*u`` bytes past its destination's first byte.
Such a step larger than a chunk becomes pieces of ``u`` bytes (the chunk size rounded down
to the staging alignment, a multiple of every element size), each staged alone at the
start of a buffer and copied straight into the parameter. Every other step is grouped as
``plan.sized_chunks`` groups it.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple, Union

import torch

from sglang_fastload.loader.plan import STAGING_ALIGN, CopyStep, LoadPlan, sized_chunks

__all__ = ["StraightPiece", "lands_straight", "file_items"]


@dataclasses.dataclass(slots=True)
class StraightPiece:
    """Bytes ``[offset, offset + nbytes)`` of file ``path``, copied to byte ``at`` of parameter
    ``param``; staged alone at the start of a buffer (``nbytes`` is also its staged size)."""

    path: str
    offset: int
    nbytes: int
    param: str
    at: int


def lands_straight(step: CopyStep, param_dtype: torch.dtype) -> bool:
    """Whether ``step``'s read bytes are exactly its destination's elements, in order and in
    ``param_dtype``, read in one piece into a contiguous destination (so any element-aligned
    byte range of the read lands at the same distance from the destination's first byte)."""
    return (not step.gather and len(step.reads) == 1 and step.view_is_dense and step.dst_is_contiguous
            and (step.src_dtype is None or step.src_dtype == param_dtype))


def _pieces(path: str, step: CopyStep, element_size: int, unit: int) -> List[StraightPiece]:
    offset, nbytes = step.reads[0]
    at = step.dst[0] * element_size
    return [StraightPiece(path, offset + k, min(unit, nbytes - k), step.param, at + k) for k in range(0, nbytes, unit)]


def file_items(plan: LoadPlan, chunk_bytes: int, params: Dict[str, torch.Tensor]
               ) -> List[Tuple[str, List[Union[Tuple[List[CopyStep], int], StraightPiece]]]]:
    """Each file's steps, in file order, as chunks ``(steps, staged bytes)`` and pieces.

    Args:
        plan: the plan (its steps cut into chunks already or not).
        chunk_bytes: the executor's chunk size.
        params: ``{name: parameter data}`` (the parameters' dtypes and element sizes).

    Returns:
        ``[(path, items)]``: a step larger than ``chunk_bytes`` that ``lands_straight`` as
        pieces of at most ``chunk_bytes``, the steps between such steps grouped by
        ``sized_chunks``; a file whose steps were grouped for ``chunk_bytes`` before
        (``FilePlan.chunks``) as they were grouped.
    """
    unit = chunk_bytes - chunk_bytes % STAGING_ALIGN
    out = []
    for fp in plan.files:
        known = fp.chunked.get(chunk_bytes)
        if known is not None:  # cut and grouped already (when built, or where it was stored)
            out.append((fp.path, list(known)))
            continue
        items: List[Union[Tuple[List[CopyStep], int], StraightPiece]] = []
        pending: List[CopyStep] = []
        for step in fp.steps:
            if unit and step.nbytes > chunk_bytes:
                param = params[step.param]
                if lands_straight(step, param.dtype):
                    items.extend(sized_chunks(pending, chunk_bytes))
                    pending = []
                    items.extend(_pieces(fp.path, step, param.element_size(), unit))
                    continue
            pending.append(step)
        items.extend(sized_chunks(pending, chunk_bytes))
        out.append((fp.path, items))
    return out
