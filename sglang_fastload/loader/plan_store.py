"""Load plans kept on disk between server starts, as data only.

One gzip-compressed JSON file per key (``plan_key.py``; what it holds: ``plan_codec.py``) in
``SGLANG_FASTLOAD_PLAN_DIR`` (default ``$XDG_CACHE_HOME/sglang_fastload/plans``, else ``~/.cache/...``).
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
import gc
import gzip
import json
import logging
import os
import threading
import time
from typing import Callable, List, Mapping, Optional, Union

import torch

from sglang_fastload import constants
from sglang_fastload.loader.collector_pause import collector_paused
from sglang_fastload.loader.plan import LoadPlan
from sglang_fastload.loader.plan_codec import decode_plan, encode_plan
from sglang_fastload.loader.plan_store_location import SUFFIX, replace_atomically, store_dir

logger = logging.getLogger(__name__)

# Temporary files older than this are left-overs of a writer that died: removed on pruning.
STALE_TMP_SECONDS = 3600
# gzip level 1: plans are repetitive, so it already shrinks them ~10x at a fraction of the
# time of the default level (a plan is written on the start-up path).
GZIP_LEVEL = 1


def path_for(directory: str, key: str) -> str:
    return os.path.join(directory, key + SUFFIX)


# --------------------------------------------------------------------------- the directory


def any_stored(prefix: str) -> bool:
    """Whether the store holds a plan whose key starts with ``prefix`` (``plan_key.KeyStart``).

    Where none does, no key that starts so can find a plan: a first start needs no more of
    its key than the prefix. A directory that cannot be listed holds nothing readable.
    """
    directory = store_dir()
    if directory is None:
        return False
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    start = prefix + "-"
    return any(name.startswith(start) and name.endswith(SUFFIX) for name in names)


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


def write_plan_in_background(
    key: Union[str, Callable[[], str]], plan: Union[LoadPlan, Callable[[], LoadPlan]],
    done: Optional[Callable[[str, float], None]] = None,
) -> None:
    """``write_plan`` on a thread of its own, so a load does not wait for it.

    Encoding and compressing a plan is interpreter work (on an H200 host ~10 ms for a dense
    8B model, ~35 ms for 16 MoE layers of 128 experts) that a first start otherwise pays
    before it returns; a server then spends seconds more starting up. The file appears
    whole or not at all (``write_plan``), so a process killed first only loses the write and
    its next start builds the plan again; a normal interpreter exit waits for it
    (``wait_for_writes``, registered at exit). The collector stays paused while it encodes.

    Args:
        key: the plan's key, or what computes it on that thread (``plan_key.KeyStart.complete``:
            a first start that found no plan of its prefix takes its source digests there).
        plan: the plan (not changed after it is built), or what makes the plan to store on
            that thread (a streamed start's plan is cut into chunks there).
        done: called on that thread with the file written and the seconds it took, when a
            file was written.
    """

    def write() -> None:
        t0 = time.perf_counter()
        with collector_paused():
            try:
                name = key() if callable(key) else key
                made = plan() if callable(plan) else plan
            except Exception as exc:  # never a reason for a failed load
                logger.warning("sglang-fastload: the load plan was not stored: its key or plan could not be made "
                               "(%s: %s)", type(exc).__name__, exc)
                return
            path = write_plan(name, made)
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
