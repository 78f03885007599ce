"""A load plan as plain data (JSON-able, no code), and back, checked against what it loads.

Steps are most of a plan (one per expert weight and more): each file's steps are one array
of unsigned 64-bit integers, stored little-endian in base64, so reading them back is one
decode instead of a JSON parse of every number. Names, dtypes and the few geometries the
steps repeat (every expert alike) are tables the steps index. One step:

    tensor, param, itemsize, src dtype + 1 (0: none), gather (0/1), geometry, dst offset,
    read count, (file offset, bytes) per read

A geometry is ``ndim, dst sizes, dst strides, view offset, view strides``: a step's view has
the sizes of its destination (a copy moves equal shapes).
"""

from __future__ import annotations

import array
import base64
import binascii
import functools
import operator
import os
import sys
from typing import Dict, List, Mapping, Tuple

import torch

from sglang_fastload.checkpoint.safetensors_header import DTYPE_SIZES, torch_dtype_name
from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan, is_contiguous, numel
from sglang_fastload.loader.plan_key import PLAN_SCHEMA_VERSION
from sglang_fastload.loader.replay import RecordedZero

_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_U64 = "Q"
assert array.array(_U64).itemsize == 8
_STEP_FIELDS = 8  # before the reads


class PlanFileError(ValueError):
    """A stored plan file is unusable (malformed, other schema, does not fit)."""


@functools.lru_cache(maxsize=None)
def _torch_dtype(st_dtype: str) -> torch.dtype:
    return getattr(torch, torch_dtype_name(st_dtype))


# --------------------------------------------------------------------------- integers


def pack_ints(values: List[int]) -> str:
    """Integers in [0, 2**64) as base64 of their little-endian 64-bit words."""
    words = array.array(_U64, values)
    if sys.byteorder != "little":
        words.byteswap()
    return base64.b64encode(words.tobytes()).decode("ascii")


def unpack_ints(text, what: str) -> List[int]:
    """``pack_ints``'s integers back.

    Raises:
        PlanFileError: not base64 of whole 64-bit words.
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (TypeError, ValueError, binascii.Error):
        raise PlanFileError(f"{what}: not base64 text") from None
    if len(raw) % 8:
        raise PlanFileError(f"{what}: {len(raw)} bytes are not whole 64-bit integers")
    words = array.array(_U64)
    words.frombytes(raw)
    if sys.byteorder != "little":
        words.byteswap()
    return words.tolist()


def _ints(values, what: str) -> list:
    """``values`` when it is a list of integers >= 0 (every number a plan holds is)."""
    if type(values) is not list or not set(map(type, values)) <= {int} or (values and min(values) < 0):
        raise PlanFileError(f"{what}: a list of integers >= 0 was expected")
    return values


# --------------------------------------------------------------------------- encoding


def encode_plan(plan: LoadPlan, key: str) -> dict:
    """A plan as JSON-able data; files by base name (a plan is bound to a directory at load).

    Raises:
        ValueError: a step whose view and destination shapes differ (not storable).
    """
    names: Dict[str, int] = {}
    dtypes: Dict[str, int] = {}
    geometries: Dict[tuple, int] = {}

    def n(name: str) -> int:
        return names.setdefault(name, len(names))

    files = []
    for fp in plan.files:
        flat: list = []
        for st in fp.steps:
            if tuple(st.view[1]) != tuple(st.dst[1]):
                raise ValueError(f"step {st.tensor!r} views {st.view[1]} but writes {st.dst[1]}")
            dt = 0 if st.src_dtype is None else 1 + dtypes.setdefault(str(st.src_dtype), len(dtypes))
            geometry = (len(st.dst[1]), *st.dst[1], *st.dst[2], st.view[0], *st.view[2])
            g = geometries.setdefault(geometry, len(geometries))
            flat += (n(st.tensor), n(st.param), st.itemsize, dt, int(st.gather), g, st.dst[0], len(st.reads))
            for offset, size in st.reads:
                flat += (offset, size)
        files.append([os.path.basename(fp.path), len(fp.steps), pack_ints(flat)])
    zeros: list = []
    for z in plan.zeros:
        zeros += (n(z.param), len(z.dst[1]), z.dst[0], *z.dst[1], *z.dst[2])
    return {
        "schema": PLAN_SCHEMA_VERSION,
        "key": key,
        "plan": {
            "files": files,
            "geometries": [list(g) for g in geometries],
            "zeros": [len(plan.zeros), zeros],
            "param_meta": [[n(p), list(shape), str(dtype)] for p, (shape, dtype) in plan.param_meta.items()],
            "tensors_used": sorted(n(t) for t in plan.tensors_used),
            "tensor_count": plan.tensor_count,
            "names": list(names),
            "dtypes": list(dtypes),
        },
    }


# --------------------------------------------------------------------------- decoding


def _last(offset: int, sizes: tuple, strides: tuple) -> int:
    """Index of a geometry's last element (sizes and strides >= 0; -1 when it has none)."""
    if 0 in sizes:
        return -1
    return offset + sum(map(operator.mul, sizes, strides)) - sum(strides)


class _Geometry:
    """What one stored geometry implies, worked out once for every step that uses it."""

    __slots__ = ("sizes", "dst_strides", "view", "dst_extent", "dst_contiguous", "elements",
                 "view_need", "view_contiguous")

    def __init__(self, stored):
        _ints(stored, "a geometry")
        nd = stored[0] if stored else -1
        if len(stored) != 3 * nd + 2:
            raise PlanFileError("a geometry is cut short")
        sizes, dst_strides = tuple(stored[1:nd + 1]), tuple(stored[nd + 1:2 * nd + 1])
        view_offset, view_strides = stored[2 * nd + 1], tuple(stored[2 * nd + 2:])
        self.sizes, self.dst_strides = sizes, dst_strides
        self.view = (view_offset, sizes, view_strides)
        self.dst_extent = _last(0, sizes, dst_strides)  # -1: writes nothing
        self.dst_contiguous = is_contiguous((0, sizes, dst_strides))
        self.elements = numel((0, sizes, ()))
        view_last = _last(view_offset, sizes, view_strides)
        self.view_need = view_last + 1 if view_last >= 0 else 0  # elements the read bytes must hold
        self.view_contiguous = is_contiguous(self.view)


def decode_plan(
    data, key: str, headers: Mapping[str, object], params: Mapping[str, torch.Tensor]
) -> LoadPlan:
    """Rebuild a stored plan, checking it against the checkpoint and the live parameters.

    A stored plan is not trusted: every step must read only bytes of its own tensor (with
    that tensor's dtype), view only bytes it read, and write only inside its parameter;
    every parameter must have the shape and dtype the plan was made for.

    Args:
        data: the parsed JSON of a plan file.
        key: the key the file was looked up under.
        headers: ``{path: parsed header}`` of the checkpoint being loaded.
        params: the live parameters (``named_parameters(remove_duplicate=False)``).

    Returns:
        The plan, its files by base name.

    Raises:
        PlanFileError: naming what is malformed or does not fit.
    """
    if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA_VERSION:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise PlanFileError(f"schema {found!r}, expected {PLAN_SCHEMA_VERSION}")
    if data.get("key") != key:
        raise PlanFileError("stored under another key")
    try:
        return _decode_body(data["plan"], headers, params)
    except PlanFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PlanFileError(f"malformed: {type(exc).__name__}: {exc}") from None


def _decode_body(body, headers, params) -> LoadPlan:
    names = body["names"]
    if type(names) is not list or not set(map(type, names)) <= {str}:
        raise PlanFileError("the name table is not a list of strings")
    dtypes = [_DTYPES[d] for d in body["dtypes"]]
    if len(dtypes) > len(set(body["dtypes"])):
        raise PlanFileError("the dtype table repeats a dtype")
    param_meta: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
    sizes: List = [None] * len(names)  # name index -> parameter elements (None: no parameter)
    for p, shape, dt in body["param_meta"]:
        name, shape, dtype = names[p], tuple(_ints(shape, "a parameter shape")), _DTYPES[dt]
        live = params.get(name)
        if live is None or tuple(live.shape) != shape or live.dtype != dtype:
            raise PlanFileError(f"parameter {name!r} is not {list(shape)} {dtype} in this model")
        param_meta[name] = (shape, dtype)
        sizes[p] = numel((0, shape, ()))
    geometries = [_Geometry(g) for g in body["geometries"]]
    by_base = {os.path.basename(p): h for p, h in headers.items()}
    files = []
    for base, count, packed in body["files"]:
        header = by_base.get(base) if type(base) is str else None
        if header is None:
            raise PlanFileError(f"file {base!r} is not in the checkpoint")
        steps = _decode_steps(base, count, unpack_ints(packed, f"steps of {base}"), names, header.tensors,
                              dtypes, geometries, sizes)
        files.append(FilePlan(base, steps))
    count, flat = body["zeros"]
    _ints(flat, "zero-fills")
    zeros = []
    i = 0
    for _ in range(count):
        p, nd, off = flat[i:i + 3]
        dst = (off, tuple(flat[i + 3:i + 3 + nd]), tuple(flat[i + 3 + nd:i + 3 + 2 * nd]))
        i += 3 + 2 * nd
        if sizes[p] is None or len(dst[2]) != nd or _last(*dst) >= sizes[p]:
            raise PlanFileError(f"a zero-fill writes outside parameter {names[p]!r}")
        zeros.append(RecordedZero(names[p], dst))
    tensors_used = frozenset(names[t] for t in _ints(body["tensors_used"], "tensors used"))
    tensor_count = body["tensor_count"]
    if type(tensor_count) is not int:
        raise PlanFileError("the tensor count is not an integer")
    return LoadPlan(files, zeros, param_meta, tensors_used, tensor_count)


def _decode_steps(base: str, count: int, flat: List[int], names: List[str], entries: Mapping[str, object],
                  dtypes: List[torch.dtype], geometries: List[_Geometry], sizes: List) -> List[CopyStep]:
    """One file's steps, each checked against its tensor's entry and its parameter.

    This loop runs once per step of a restart (thousands for an MoE model), so what a tensor
    or a geometry implies is looked up, not recomputed, and each step is made directly.
    """
    # safetensors dtype -> (itemsize, index + 1 in the dtype table; 0: not in it)
    dtype_facts = {d: _dtype_facts(d, dtypes) for d in {entry.dtype for entry in entries.values()}}
    new_step = object.__new__
    steps: List[CopyStep] = []
    append = steps.append
    end = len(flat)
    i = 0
    for _ in range(count):
        if i + _STEP_FIELDS > end:
            raise PlanFileError(f"steps of {base}: cut short")
        t, p, itemsize, dt, gather, g, dst_off, nreads = flat[i:i + _STEP_FIELDS]
        i += _STEP_FIELDS
        if i + 2 * nreads > end:
            raise PlanFileError(f"steps of {base}: cut short")
        if nreads == 1:  # most steps
            offset, span = flat[i], flat[i + 1]
            reads = ((offset, span),)
            i += 2
        else:
            reads = tuple(zip(flat[i:i + 2 * nreads:2], flat[i + 1:i + 2 * nreads:2]))
            i += 2 * nreads
            span = sum(size for _, size in reads)
        tensor, param, size = names[t], names[p], sizes[p]
        entry = entries.get(tensor)
        if entry is None or size is None or gather > 1:
            raise PlanFileError(f"step {tensor!r} -> {param!r} names an unknown tensor or parameter")
        start, stop = entry.start, entry.end
        entry_itemsize, entry_dt = dtype_facts[entry.dtype]
        if itemsize != entry_itemsize or (dt and dt != entry_dt):
            raise PlanFileError(f"step {tensor!r} reads the tensor as another dtype")
        for offset, nbytes in reads:
            if offset < start or offset + nbytes > stop:
                raise PlanFileError(f"step {tensor!r} reads outside the tensor")
        geometry = geometries[g]
        if geometry.dst_extent >= 0 and dst_off + geometry.dst_extent >= size:
            raise PlanFileError(f"step {tensor!r} writes outside parameter {param!r}")
        if (gather and nreads != 1) or geometry.view_need * itemsize > span:
            raise PlanFileError(f"step {tensor!r} views outside the bytes it reads")
        view = geometry.view
        nbytes = geometry.elements * itemsize if gather else span
        step = new_step(CopyStep)  # the frozen __init__ sets fields one call at a time
        step.__dict__.update(
            tensor=tensor, param=param, dst=(dst_off, geometry.sizes, geometry.dst_strides), reads=reads,
            view=view, itemsize=itemsize, src_dtype=dtypes[dt - 1] if dt else None, gather=gather == 1,
            nbytes=nbytes, dst_is_contiguous=geometry.dst_contiguous,
            view_is_dense=(not gather and geometry.view_contiguous and view[0] == 0
                           and geometry.elements * itemsize == nbytes),
        )
        append(step)
    if i != end:
        raise PlanFileError(f"steps of {base}: {end - i} integers left over")
    return steps


def _dtype_facts(st_dtype: str, dtypes: List[torch.dtype]) -> Tuple[int, int]:
    """``(itemsize, index + 1 in the plan's dtype table, 0 when absent)`` of a safetensors dtype."""
    dtype = _torch_dtype(st_dtype)
    return DTYPE_SIZES[st_dtype], next((i + 1 for i, d in enumerate(dtypes) if d is dtype), 0)
