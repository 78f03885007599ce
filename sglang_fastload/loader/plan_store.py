"""Load plans kept on disk between server starts, as data only.

One gzip-compressed JSON file per key (``plan_key.py``) in ``SGLANG_FASTLOAD_PLAN_DIR``
(default ``$XDG_CACHE_HOME/sglang_fastload/plans``, else ``~/.cache/...``).
``SGLANG_FASTLOAD_PLAN_STORE=0`` switches the store off. JSON, never pickle: whoever can
write the directory cannot make a load run code, and every stored plan is checked against
the checkpoint's headers and the live parameters before it is used (each read within its
tensor's bytes, each write within its parameter).

The store never fails a load: any problem reading (missing, corrupt, other schema,
unreadable directory) means the plan is built as without a store, with one log line;
any problem writing is logged and ignored.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import time
import uuid
from typing import Dict, Mapping, Optional, Tuple

import torch

from sglang_fastload import constants
from sglang_fastload.checkpoint.safetensors_header import torch_dtype_name
from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan, numel
from sglang_fastload.loader.plan_key import PLAN_SCHEMA_VERSION
from sglang_fastload.loader.replay import RecordedZero

logger = logging.getLogger(__name__)

SUFFIX = ".plan.json.gz"
# Temporary files older than this are left-overs of a writer that died: removed on pruning.
STALE_TMP_SECONDS = 3600
# gzip level 1: plans are repetitive, so it already shrinks them ~10x at a fraction of the
# time of the default level (a plan is written on the start-up path).
GZIP_LEVEL = 1

_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class PlanFileError(ValueError):
    """A stored plan file is unusable (malformed, other schema, does not fit)."""


def store_dir() -> Optional[str]:
    """The store directory, or None when the store is switched off."""
    if os.environ.get(constants.ENV_PLAN_STORE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    explicit = os.environ.get(constants.ENV_PLAN_DIR)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, *constants.PLAN_STORE_SUBDIR)


def path_for(directory: str, key: str) -> str:
    return os.path.join(directory, key + SUFFIX)


# --------------------------------------------------------------------------- encoding


def encode_plan(plan: LoadPlan, key: str) -> dict:
    """A plan as JSON-able data; files by base name (a plan is bound to a directory at load)."""
    names: Dict[str, int] = {}

    def n(name: str) -> int:
        return names.setdefault(name, len(names))

    def g(geometry) -> list:
        return [geometry[0], list(geometry[1]), list(geometry[2])]

    files = [
        [
            os.path.basename(fp.path),
            [
                [n(s.tensor), n(s.param), g(s.dst), [list(r) for r in s.reads], g(s.view),
                 s.itemsize, None if s.src_dtype is None else str(s.src_dtype), int(s.gather)]
                for s in fp.steps
            ],
        ]
        for fp in plan.files
    ]
    return {
        "schema": PLAN_SCHEMA_VERSION,
        "key": key,
        "plan": {
            "files": files,
            "zeros": [[n(z.param), g(z.dst)] for z in plan.zeros],
            "param_meta": [[n(p), list(shape), str(dtype)] for p, (shape, dtype) in plan.param_meta.items()],
            "tensors_used": sorted(n(t) for t in plan.tensors_used),
            "tensor_count": plan.tensor_count,
            "names": list(names),
        },
    }


def _int(v) -> int:
    if type(v) is not int:
        raise PlanFileError(f"expected an integer, found {type(v).__name__}")
    return v


def _geometry(v) -> Tuple[int, Tuple[int, ...], Tuple[int, ...]]:
    offset, sizes, strides = v
    sizes, strides = tuple(map(_int, sizes)), tuple(map(_int, strides))
    if len(sizes) != len(strides):
        raise PlanFileError("a geometry's sizes and strides differ in length")
    return _int(offset), sizes, strides


def _dtype(v):
    if v is None:
        return None
    try:
        return _DTYPES[v]
    except (KeyError, TypeError):
        raise PlanFileError(f"unknown dtype {v!r}") from None


def decode_plan(data, key: str) -> LoadPlan:
    """Rebuild a plan from ``encode_plan``'s data (file paths are base names).

    Raises:
        PlanFileError: anything malformed, another schema, or a plan stored under another key.
    """
    if not isinstance(data, dict) or data.get("schema") != PLAN_SCHEMA_VERSION:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise PlanFileError(f"schema {found!r}, expected {PLAN_SCHEMA_VERSION}")
    if data.get("key") != key:
        raise PlanFileError("stored under another key")
    try:
        body = data["plan"]
        names = body["names"]
        if not all(type(x) is str for x in names):
            raise PlanFileError("a name is not a string")
        files = []
        for base, steps in body["files"]:
            if type(base) is not str or os.path.basename(base) != base:
                raise PlanFileError(f"file name {base!r} is not a base name")
            files.append(
                FilePlan(
                    base,
                    [
                        CopyStep(
                            names[t], names[p], _geometry(dst),
                            tuple((_int(o), _int(k)) for o, k in reads),
                            _geometry(view), _int(itemsize), _dtype(dt), bool(_int(gather)),
                        )
                        for t, p, dst, reads, view, itemsize, dt, gather in steps
                    ],
                )
            )
        zeros = [RecordedZero(names[p], _geometry(dst)) for p, dst in body["zeros"]]
        param_meta = {names[p]: (tuple(map(_int, shape)), _dtype(dt)) for p, shape, dt in body["param_meta"]}
        tensors_used = frozenset(names[t] for t in body["tensors_used"])
        return LoadPlan(files, zeros, param_meta, tensors_used, _int(body["tensor_count"]))
    except PlanFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise PlanFileError(f"malformed: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- checks


def _max_index(geometry) -> int:
    offset, sizes, strides = geometry
    if 0 in sizes:
        return -1
    return offset + sum((s - 1) * st for s, st in zip(sizes, strides))


def _within(geometry, numel_: int) -> bool:
    offset, sizes, strides = geometry
    return offset >= 0 and min(sizes, default=0) >= 0 and min(strides, default=0) >= 0 and _max_index(geometry) < numel_


def check_plan_fits(plan: LoadPlan, headers: Mapping[str, object], params: Mapping[str, torch.Tensor]) -> None:
    """A stored plan must read only its tensors' bytes and write only inside its parameters.

    Args:
        plan: a decoded plan (file paths are base names).
        headers: ``{path: parsed header}`` of the checkpoint being loaded.
        params: the live parameters by name (``named_parameters(remove_duplicate=False)``).

    Raises:
        PlanFileError: naming the first step, zero-fill or parameter that does not fit.
    """
    by_base = {os.path.basename(p): h for p, h in headers.items()}
    for name, (shape, dtype) in plan.param_meta.items():
        p = params.get(name)
        if p is None or tuple(p.shape) != shape or p.dtype != dtype:
            raise PlanFileError(f"parameter {name!r} is not {list(shape)} {dtype} in this model")
    sizes = {name: numel((0, shape, ())) for name, (shape, _) in plan.param_meta.items()}
    for fp in plan.files:
        header = by_base.get(fp.path)
        if header is None:
            raise PlanFileError(f"file {fp.path!r} is not in the checkpoint")
        for s in fp.steps:
            entry = header.tensors.get(s.tensor)
            if entry is None or s.param not in sizes:
                raise PlanFileError(f"step {s.tensor!r} -> {s.param!r} names an unknown tensor or parameter")
            if s.src_dtype is not None and str(s.src_dtype) != "torch." + torch_dtype_name(entry.dtype):
                raise PlanFileError(f"step {s.tensor!r} reads the tensor as another dtype")
            if s.itemsize != entry.itemsize or any(o < entry.start or o + k > entry.end or k < 0 for o, k in s.reads):
                raise PlanFileError(f"step {s.tensor!r} reads outside the tensor")
            if not _within(s.dst, sizes[s.param]):
                raise PlanFileError(f"step {s.tensor!r} writes outside parameter {s.param!r}")
            span = s.reads[0][1] if s.gather else s.nbytes
            if s.dst[1] != s.view[1] or not _within(s.view, span // max(1, s.itemsize)):
                raise PlanFileError(f"step {s.tensor!r} views outside the bytes it reads")
    for z in plan.zeros:
        if z.param not in sizes or not _within(z.dst, sizes[z.param]):
            raise PlanFileError(f"a zero-fill writes outside parameter {z.param!r}")


# --------------------------------------------------------------------------- the directory


def read_plan(key: str, headers: Mapping[str, object], params: Mapping[str, torch.Tensor]) -> Optional[LoadPlan]:
    """The plan stored under ``key``, checked against the checkpoint and the parameters.

    Returns:
        The plan (file paths are base names), or None (store off, nothing stored, or an
        unusable file: logged, never raised).
    """
    directory = store_dir()
    if directory is None:
        return None
    path = path_for(directory, key)
    try:
        with gzip.open(path, "rb") as f:
            data = json.loads(f.read())
        plan = decode_plan(data, key)
        check_plan_fits(plan, headers, params)
    except FileNotFoundError:
        logger.info("sglang-fastload: no stored load plan for this model and checkpoint layout (%s)", path)
        return None
    except Exception as exc:  # corrupt, truncated, unreadable, other schema: build instead
        logger.warning("sglang-fastload: ignoring stored load plan %s (%s: %s); building it", path, type(exc).__name__, exc)
        return None
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
    path = path_for(directory, key)
    tmp = os.path.join(directory, f".{key}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        payload = json.dumps(encode_plan(plan, key), separators=(",", ":")).encode()
        with open(tmp, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as f:
                f.write(payload)
        os.replace(tmp, path)
    except Exception as exc:
        logger.warning("sglang-fastload: could not store the load plan in %s (%s: %s)", directory, type(exc).__name__, exc)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None
    prune(directory, constants.PLAN_STORE_MAX_FILES)
    return path


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
