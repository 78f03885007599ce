"""Load plans kept on disk between server starts, as data only.

One gzip-compressed JSON file per key (``plan_key.py``) in ``SGLANG_FASTLOAD_PLAN_DIR``
(default ``$XDG_CACHE_HOME/sglang_fastload/plans``, else ``~/.cache/...``).
``SGLANG_FASTLOAD_PLAN_STORE=0`` switches the store off. JSON, never pickle: whoever can
write the directory cannot make a load run code, and every stored plan is checked against
the checkpoint's headers and the live parameters before it is used (each read within its
tensor's bytes, each write within its parameter). Which tensor feeds which parameter cannot
be checked without the replay the store saves, so the directory is created private (0700),
like any cache of what a process will load.

The store never fails a load: any problem reading (missing, corrupt, other schema,
unreadable directory) means the plan is built as without a store, with one log line;
any problem writing is logged and ignored.
"""

from __future__ import annotations

import atexit
import functools
import gc
import gzip
import json
import logging
import operator
import os
import threading
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from sglang_fastload import constants
from sglang_fastload.checkpoint.safetensors_header import torch_dtype_name
from sglang_fastload.loader.collector_pause import collector_paused
from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan, is_contiguous, numel
from sglang_fastload.loader.plan_key import PLAN_SCHEMA_VERSION
from sglang_fastload.loader.plan_store_location import SUFFIX, replace_atomically, store_dir
from sglang_fastload.loader.replay import RecordedZero

logger = logging.getLogger(__name__)

# Temporary files older than this are left-overs of a writer that died: removed on pruning.
STALE_TMP_SECONDS = 3600
# gzip level 1: plans are repetitive, so it already shrinks them ~10x at a fraction of the
# time of the default level (a plan is written on the start-up path).
GZIP_LEVEL = 1

_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


@functools.lru_cache(maxsize=None)
def _torch_dtype(st_dtype: str) -> torch.dtype:
    return getattr(torch, torch_dtype_name(st_dtype))


class PlanFileError(ValueError):
    """A stored plan file is unusable (malformed, other schema, does not fit)."""


def path_for(directory: str, key: str) -> str:
    return os.path.join(directory, key + SUFFIX)


# --------------------------------------------------------------------------- encoding
#
# Each file's steps are one flat list of integers (names and dtypes as indexes into the
# plan's tables), so reading a plan creates few Python objects: a plan of 19,000 steps
# parses in a few tens of milliseconds. One step:
#   tensor, param, itemsize, src dtype + 1 (0: none), gather (0/1), ndim,
#   dst offset, dst sizes (ndim), dst strides (ndim), view offset, view strides (ndim),
#   read count, (file offset, bytes) per read
# A step's view has the sizes of its destination (a copy moves equal shapes).


def encode_plan(plan: LoadPlan, key: str) -> dict:
    """A plan as JSON-able data; files by base name (a plan is bound to a directory at load).

    Raises:
        ValueError: a step whose view and destination shapes differ (not storable).
    """
    names: Dict[str, int] = {}
    dtypes: Dict[str, int] = {}

    def n(name: str) -> int:
        return names.setdefault(name, len(names))

    files = []
    for fp in plan.files:
        flat: list = []
        for st in fp.steps:
            if tuple(st.view[1]) != tuple(st.dst[1]):
                raise ValueError(f"step {st.tensor!r} views {st.view[1]} but writes {st.dst[1]}")
            dt = 0 if st.src_dtype is None else 1 + dtypes.setdefault(str(st.src_dtype), len(dtypes))
            flat += (n(st.tensor), n(st.param), st.itemsize, dt, int(st.gather), len(st.dst[1]), st.dst[0])
            flat += st.dst[1]
            flat += st.dst[2]
            flat.append(st.view[0])
            flat += st.view[2]
            flat.append(len(st.reads))
            for offset, size in st.reads:
                flat += (offset, size)
        files.append([os.path.basename(fp.path), len(fp.steps), flat])
    zeros: list = []
    for z in plan.zeros:
        zeros += (n(z.param), len(z.dst[1]), z.dst[0], *z.dst[1], *z.dst[2])
    return {
        "schema": PLAN_SCHEMA_VERSION,
        "key": key,
        "plan": {
            "files": files,
            "zeros": [len(plan.zeros), zeros],
            "param_meta": [[n(p), list(shape), str(dtype)] for p, (shape, dtype) in plan.param_meta.items()],
            "tensors_used": sorted(n(t) for t in plan.tensors_used),
            "tensor_count": plan.tensor_count,
            "names": list(names),
            "dtypes": list(dtypes),
        },
    }


def _ints(values, what: str) -> list:
    """``values`` when it is a list of integers >= 0 (every number a plan holds is)."""
    if type(values) is not list or not set(map(type, values)) <= {int} or (values and min(values) < 0):
        raise PlanFileError(f"{what}: a list of integers >= 0 was expected")
    return values


def _last(offset: int, sizes: tuple, strides: tuple) -> int:
    """Index of a geometry's last element (sizes and strides >= 0; -1 when it has none)."""
    if 0 in sizes:
        return -1
    return offset + sum(map(operator.mul, sizes, strides)) - sum(strides)


def _geometry_facts(key: tuple, nd: int) -> tuple:
    """A stored step's geometry fields ``key`` (destination sizes and strides, view offset,
    view strides) as ``(dst sizes, dst strides, view offset, view strides, last destination
    element, destination contiguous, element count, last viewed element, view contiguous)``,
    offsets 0 for the last elements."""
    sizes, dst_strides = key[:nd], key[nd:2 * nd]
    view_strides = key[2 * nd + 1:]
    return (
        sizes, dst_strides, key[2 * nd], view_strides,
        _last(0, sizes, dst_strides), is_contiguous((0, sizes, dst_strides)), numel((0, sizes, ())),
        _last(0, sizes, view_strides), is_contiguous((0, sizes, view_strides)),
    )


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
    sizes: Dict[int, int] = {}  # name index -> parameter elements
    for p, shape, dt in body["param_meta"]:
        name, shape, dtype = names[p], tuple(_ints(shape, "a parameter shape")), _DTYPES[dt]
        live = params.get(name)
        if live is None or tuple(live.shape) != shape or live.dtype != dtype:
            raise PlanFileError(f"parameter {name!r} is not {list(shape)} {dtype} in this model")
        param_meta[name] = (shape, dtype)
        sizes[p] = numel((0, shape, ()))
    by_base = {os.path.basename(p): h for p, h in headers.items()}
    # Steps repeat a few geometries (every expert alike): what one implies (its tuples, last
    # elements, contiguity, element count) is worked out once, found by its stored integers.
    geometries: Dict[tuple, tuple] = {}
    files = []
    for base, count, flat in body["files"]:
        header = by_base.get(base) if type(base) is str else None
        if header is None:
            raise PlanFileError(f"file {base!r} is not in the checkpoint")
        _ints(flat, f"steps of {base}")
        entries = header.tensors
        tensor_facts: Dict[int, tuple] = {}  # name index -> (entry, itemsize): tensors recur in cut steps
        steps = []
        append = steps.append
        i = 0
        for _ in range(count):
            t, p, itemsize, dt, gather, nd, dst_off = flat[i:i + 7]
            end = i + 3 * nd + 8
            key = tuple(flat[i + 7:end])
            geometry = geometries.get(key)
            if geometry is None:
                if len(key) != 3 * nd + 1:
                    raise PlanFileError(f"steps of {base}: cut short")
                geometry = geometries[key] = _geometry_facts(key, nd)
            (dst_sizes, dst_strides, view_off, view_strides,
             dst_extent, dst_contiguous, elements, view_extent, view_contiguous) = geometry
            nreads = flat[end]
            i = end + 1
            if nreads == 1:  # most steps
                reads = ((flat[i], flat[i + 1]),)
            else:
                reads = tuple(zip(flat[i:i + 2 * nreads:2], flat[i + 1:i + 2 * nreads:2]))
            i += 2 * nreads
            tensor, param = names[t], names[p]
            facts = tensor_facts.get(t)
            if facts is None:
                entry = entries.get(tensor)
                facts = tensor_facts[t] = (entry, entry.itemsize if entry is not None else 0)
            entry, entry_itemsize = facts
            if entry is None or p not in sizes or len(reads) != nreads or gather > 1:
                raise PlanFileError(f"step {tensor!r} -> {param!r} names an unknown tensor or parameter")
            src_dtype = dtypes[dt - 1] if dt else None
            if itemsize != entry_itemsize or (dt and src_dtype is not _torch_dtype(entry.dtype)):
                raise PlanFileError(f"step {tensor!r} reads the tensor as another dtype")
            start, stop = entry.start, entry.end
            for offset, size in reads:
                if offset < start or offset + size > stop:
                    raise PlanFileError(f"step {tensor!r} reads outside the tensor")
            if dst_extent >= 0 and dst_off + dst_extent >= sizes[p]:
                raise PlanFileError(f"step {tensor!r} writes outside parameter {param!r}")
            span = reads[0][1] if nreads == 1 else sum(size for _, size in reads)
            if (gather and nreads != 1) or (view_extent >= 0 and (view_off + view_extent + 1) * itemsize > span):
                raise PlanFileError(f"step {tensor!r} views outside the bytes it reads")
            append(
                CopyStep.with_derived(
                    tensor, param, (dst_off, dst_sizes, dst_strides), reads, (view_off, dst_sizes, view_strides),
                    itemsize, src_dtype, gather == 1,
                    view_numel=elements, view_contiguous=view_contiguous, dst_contiguous=dst_contiguous,
                )
            )
        if i != len(flat):
            raise PlanFileError(f"steps of {base}: {len(flat) - i} integers left over")
        files.append(FilePlan(base, steps))
    count, flat = body["zeros"]
    _ints(flat, "zero-fills")
    zeros = []
    i = 0
    for _ in range(count):
        p, nd, off = flat[i:i + 3]
        dst = (off, tuple(flat[i + 3:i + 3 + nd]), tuple(flat[i + 3 + nd:i + 3 + 2 * nd]))
        i += 3 + 2 * nd
        if p not in sizes or len(dst[2]) != nd or _last(*dst) >= sizes[p]:
            raise PlanFileError(f"a zero-fill writes outside parameter {names[p]!r}")
        zeros.append(RecordedZero(names[p], dst))
    tensors_used = frozenset(names[t] for t in _ints(body["tensors_used"], "tensors used"))
    tensor_count = body["tensor_count"]
    if type(tensor_count) is not int:
        raise PlanFileError("the tensor count is not an integer")
    return LoadPlan(files, zeros, param_meta, tensors_used, tensor_count)


# --------------------------------------------------------------------------- the directory


def read_plan(
    key: str, headers: Mapping[str, object], params: Mapping[str, torch.Tensor], parts: str = ""
) -> Optional[LoadPlan]:
    """The plan stored under ``key``, checked against the checkpoint and the parameters.

    Args:
        key: the plan's key (``plan_key``).
        headers: ``{path: parsed header}`` of the checkpoint being loaded.
        params: the live parameters (``named_parameters(remove_duplicate=False)``).
        parts: the key's parts (``plan_key_and_parts``), logged when nothing is stored.

    Returns:
        The plan (file paths are base names), or None (store off, nothing stored, or an
        unusable file: logged, never raised).
    """
    directory = store_dir()
    if directory is None:
        return None
    path = path_for(directory, key)
    collecting = gc.isenabled()
    gc.disable()  # parsing creates many objects: a full collection of a server's heap costs more
    try:
        with gzip.open(path, "rb") as f:
            data = json.loads(f.read())
        plan = decode_plan(data, key, headers, params)
    except FileNotFoundError:
        logger.info(
            "sglang-fastload: no stored load plan for this model and checkpoint layout (%s%s)",
            path, f"; key parts {parts}" if parts else "",
        )
        return None
    except Exception as exc:  # corrupt, truncated, unreadable, other schema: build instead
        logger.warning("sglang-fastload: ignoring stored load plan %s (%s: %s); building it", path, type(exc).__name__, exc)
        return None
    finally:
        if collecting:
            gc.enable()
    try:
        os.utime(path)  # most recently used: kept longest by pruning
    except OSError:
        pass
    return plan


def write_plan(key: str, plan: LoadPlan) -> Optional[str]:
    """Store ``plan`` under ``key`` atomically, then prune the directory to its bound.

    Concurrent writers (ranks, servers sharing a home directory) each write their own
    temporary file and rename it into place, so a reader sees a whole file or none.

    Returns:
        The file written, or None (store off, or a write problem: logged, never raised).
    """
    directory = store_dir()
    if directory is None:
        return None
    try:
        payload = json.dumps(encode_plan(plan, key), separators=(",", ":")).encode()
        path = replace_atomically(directory, key + SUFFIX,
                                  gzip.compress(payload, compresslevel=GZIP_LEVEL, mtime=0))
    except Exception as exc:
        logger.warning("sglang-fastload: could not store the load plan in %s (%s: %s)", directory, type(exc).__name__, exc)
        return None
    try:
        prune(directory, constants.PLAN_STORE_MAX_FILES)
    except Exception as exc:  # never a reason for a failed load
        logger.warning("sglang-fastload: could not prune the load plan store %s (%s)", directory, exc)
    return path


# Writes started by ``write_plan_in_background`` and not yet joined.
_WRITES: List[threading.Thread] = []
_WRITES_LOCK = threading.Lock()


def write_plan_in_background(key: str, plan: LoadPlan, done: Optional[Callable[[str, float], None]] = None) -> None:
    """``write_plan`` on a thread of its own, so a load does not wait for it.

    Encoding and compressing a plan is interpreter work (on an H200 host ~10 ms for a dense
    8B model, ~35 ms for 16 MoE layers of 128 experts) that a first start otherwise pays
    before it returns; a server then spends seconds more starting up. The file appears
    whole or not at all (``write_plan``), so a process killed first only loses the write and
    its next start builds the plan again; a normal interpreter exit waits for it
    (``wait_for_writes``, registered at exit). The collector stays paused while it encodes.

    Args:
        key: the plan's key.
        plan: the plan (not changed after it is built).
        done: called on that thread with the file written and the seconds it took, when a
            file was written.
    """

    def write() -> None:
        t0 = time.perf_counter()
        with collector_paused():
            path = write_plan(key, plan)
        if path is not None and done is not None:
            done(path, time.perf_counter() - t0)

    thread = threading.Thread(target=write, name="sglang-fastload-plan-store", daemon=True)
    with _WRITES_LOCK:
        _WRITES[:] = [t for t in _WRITES if t.is_alive()]
        _WRITES.append(thread)
    thread.start()


def wait_for_writes(timeout: Optional[float] = None) -> None:
    """Wait until every plan this process started storing is written (or ``timeout``
    seconds per write have passed)."""
    with _WRITES_LOCK:
        pending = list(_WRITES)
    for thread in pending:
        thread.join(timeout)


atexit.register(wait_for_writes, constants.PLAN_STORE_EXIT_WAIT_S)


def prune(directory: str, keep: int) -> None:
    """Keep the ``keep`` most recently used plan files; drop stale temporary files."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    now = time.time()
    plans = []
    for e in entries:
        try:
            if e.name.endswith(SUFFIX):
                plans.append((e.stat().st_mtime, e.path))
            elif e.name.endswith(".tmp") and now - e.stat().st_mtime > STALE_TMP_SECONDS:
                os.unlink(e.path)
        except OSError:
            pass  # another process pruned or renamed it meanwhile
    plans.sort(reverse=True)
    for _, path in plans[keep:]:
        try:
            os.unlink(path)
        except OSError:
            pass
