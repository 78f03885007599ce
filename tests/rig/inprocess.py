"""Load (and update) SGLang's real model classes without a server, one fresh process per rank.

    res = load_params(ckpt_a, tp_size=2, update_path=ckpt_b)
    res[0].params["model.layers.0.self_attn.qkv_proj.weight"]   # rank 0, detached CPU clone
    res[1].log, res[1].error, res.errors

Each rank runs ``tests/rig/_rank_worker.py`` in a new interpreter (so the start-up hooks of
the venv — the project's overlay and the GPU-import stand-ins — apply exactly as in a
server's scheduler process, and ``env`` reaches them). The rank publishes ``ServerArgs``,
builds gloo process groups on a free port, loads with the server's own
``build_load_config`` + ``get_model_loader(...).load_model`` and, for ``update_path``, calls
SGLang's real ``WeightUpdater.update_weights_from_disk`` (the module the project forks),
with ``ModelRunner.update_model_fields`` as its callback. Parameters and persistent
buffers come back through ``torch.save`` files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "RankResult",
    "RankResults",
    "RankProcessError",
    "load_params",
    "CaseSpec",
    "load_cases",
    "UPSTREAM_ENV",
    "upstream_params",
    "load_cases_beside_upstream",
    "compare_params",
    "assert_params_equal",
    "free_port",
    "server_port",
    "child_env",
]

WORKER = Path(__file__).resolve().with_name("_rank_worker.py")
PathLike = Union[str, os.PathLike]


@dataclass
class RankResult:
    rank: int
    params: Dict[str, torch.Tensor]
    log: str
    error: Optional[str] = None  # first failed update's message (None: all updates succeeded)
    update_results: List[Tuple[bool, str]] = field(default_factory=list)  # (ok, message) per update
    params_before: Optional[Dict[str, torch.Tensor]] = None  # after the initial load (keep_initial=True)
    params_history: Optional[List[Dict[str, torch.Tensor]]] = None  # after each update (keep_history=True)
    timings: dict = field(default_factory=dict)  # imports_s, distributed_s, load_s, update_s[], total_s
    module_walks: Optional[dict] = None  # module_walk_probe.probe's answer (when its variable is set)
    overlay: Optional[bool] = None  # the rank's SGLang was the overlay's (False: upstream's own)


class RankResults(list):
    """``list[RankResult]`` indexed by rank, plus a few conveniences."""

    wall_s: float = 0.0

    @property
    def errors(self) -> List[Optional[str]]:
        return [r.error for r in self]

    @property
    def logs(self) -> List[str]:
        return [r.log for r in self]

    @property
    def params(self) -> Dict[str, torch.Tensor]:
        """Rank 0's parameters (the whole model at TP=1)."""
        return self[0].params

    def log_text(self) -> str:
        return "\n".join(f"===== rank {r.rank} =====\n{r.log}" for r in self)


class RankProcessError(RuntimeError):
    """A rank process crashed or timed out; the message carries every rank's log tail."""

    def __init__(self, message: str, *, logs: Sequence[str] = (), transient: bool = False):
        super().__init__(message)
        self.logs = list(logs)  # full log of every rank
        self.transient = transient


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_SERVER_PORTS: List[int] = []  # handed out by server_port, most recent last


def server_port() -> int:
    """A free port for a server that binds it only later (after loading a model).

    It lies below the kernel's ephemeral range, so no socket bound to port 0 meanwhile (gloo
    groups, HTTP clients, another server's helpers) can take it, and at least 1,100 away
    from the ports handed out before (SGLang derives its internal ports from ``--port`` and
    ``--dist-init-addr`` up to 1,000 above them).
    """
    low = _ephemeral_low()
    lo, hi = max(1024, low - 16000), max(1025, low - 1100)
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(lo, hi)
        if any(abs(port - p) < 1100 for p in _SERVER_PORTS[-8:]):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _SERVER_PORTS.append(port)
        return port
    return free_port()


def child_env(env: Optional[Mapping[str, Optional[str]]] = None, *, threads: Optional[int] = None) -> Dict[str, str]:
    """The parent's environment plus rig defaults plus ``env`` (a ``None`` value unsets)."""
    out = dict(os.environ)
    out.setdefault("TORCHDYNAMO_DISABLE", "1")
    out.setdefault("HF_HUB_OFFLINE", "1")  # a bad path must fail fast, never reach the network
    out.pop("SGLANG_USE_CPU_ENGINE", None)  # switches loaders to CPU-only branches
    if threads is not None:
        out.setdefault("OMP_NUM_THREADS", str(threads))
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = str(value)
    return out


def _tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def load_params(
    model_path: PathLike,
    *,
    load_format: str = "auto",
    tp_size: int = 1,
    ep_size: int = 1,
    update_path: Union[None, PathLike, Sequence[PathLike]] = None,
    update_load_format: Optional[str] = None,
    extra_config: Optional[dict] = None,
    env: Optional[Mapping[str, Optional[str]]] = None,
    timeout: float = 300,
    keep_initial: bool = False,
    keep_history: bool = False,
    server_args: Optional[dict] = None,
    log_level: str = "INFO",
) -> RankResults:
    """Load ``model_path`` with SGLang at ``tp_size`` ranks and return every rank's parameters.

    Args:
        load_format: ``--load-format`` for the initial load.
        ep_size: expert parallel size (``ServerArgs(ep_size=...)``; must divide ``tp_size``).
        update_path: a checkpoint (or a list, applied in order) to update to after loading,
            through ``WeightUpdater.update_weights_from_disk``.
        update_load_format: load format of the updates (default: ``load_format``, as the
            server does when the request names none).
        extra_config: ``--model-loader-extra-config`` (a dict, sent as JSON).
        env: extra environment of the rank processes (``None`` values unset a variable).
        keep_initial: also return the parameters after the initial load (``params_before``).
        keep_history: also return the parameters after each update (``params_history``).
        server_args: further ``ServerArgs`` fields.
    Returns:
        ``RankResults``; a failed update is reported in ``.error`` (not raised).
    Raises:
        RankProcessError: a rank crashed (initial load failed, import error...) or timed out.
    """
    if tp_size < 1 or ep_size < 1 or tp_size % ep_size:
        raise ValueError(f"tp_size={tp_size} must be a positive multiple of ep_size={ep_size}")
    spec = {
        "model_path": os.fspath(model_path),
        "tp_size": tp_size,
        "ep_size": ep_size,
        "load_format": load_format,
        "updates": _update_list(update_path, update_load_format or load_format),
        "extra_config": extra_config,
        "keep_initial": keep_initial,
        "keep_history": keep_history,
        "server_args": server_args or {},
        "log_level": log_level,
        "threads_per_rank": max(1, (os.cpu_count() or 1) // tp_size),
    }
    environ = child_env(env, threads=spec["threads_per_rank"])
    t0 = time.perf_counter()
    for attempt in range(2):
        try:
            results = _run_ranks(spec, environ, timeout=max(1.0, timeout - (time.perf_counter() - t0)))
        except RankProcessError as exc:
            # A rendezvous lost to a port taken by another process between free_port() and
            # gloo's bind is the one failure worth a second try (with a new port).
            if attempt == 0 and exc.transient:
                continue
            raise
        results.wall_s = time.perf_counter() - t0
        return results
    raise AssertionError("unreachable")


_TRANSIENT_MARKERS = ("Address already in use", "DistNetworkError", "Connection reset by peer", "Broken pipe")


def _run_ranks(spec: dict, environ: Dict[str, str], *, timeout: float) -> "RankResults":
    tp_size = spec["tp_size"]
    work = Path(tempfile.mkdtemp(prefix="sglang-rig-inproc-"))
    spec = dict(spec, out_dir=str(work), port=free_port())
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    procs: List[subprocess.Popen] = []
    log_files = []
    done = lambda r: (work / f"rank{r}.pt").exists()  # noqa: E731
    try:
        for rank in range(tp_size):
            lf = open(work / f"rank{rank}.log", "wb")
            log_files.append(lf)
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), str(spec_path), str(rank)],
                    stdin=subprocess.DEVNULL,
                    stdout=lf,
                    stderr=subprocess.STDOUT,
                    env=environ,
                    cwd=os.getcwd(),
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        failure = None
        while True:
            codes = [p.poll() for p in procs]
            crashed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0) and not done(r)]
            if crashed:
                # A rank died before saving: the others would wait for it in gloo forever.
                time.sleep(1.0)
                failure = f"rank process(es) exited with {crashed} before saving results"
                break
            if all(c is not None for c in codes):
                break
            if all(done(r) for r in range(tp_size)):
                # Everyone saved; give stragglers a moment for the final barrier.
                try:
                    for p in procs:
                        p.wait(timeout=max(0.1, min(15.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.05)
        for p in procs:
            _kill_group(p)
        for lf in log_files:
            lf.close()
        logs = [(work / f"rank{r}.log").read_text(errors="replace") for r in range(tp_size)]
        if failure is None and not all(done(r) for r in range(tp_size)):
            failure = "rank process(es) exited without saving results"
        if failure is not None:
            detail = "\n".join(f"----- rank {r} log (tail) -----\n{_tail(log)}" for r, log in enumerate(logs))
            transient = any(m in log for m in _TRANSIENT_MARKERS for log in logs) and not any(
                "initial load" in log for log in logs
            )
            raise RankProcessError(
                f"in-process load of {spec['model_path']} (tp={tp_size}, ep={spec['ep_size']}) failed: {failure}\n{detail}",
                logs=logs,
                transient=transient,
            )
        if "cases" in spec:
            return _case_results(work, logs, len(spec["cases"]))
        results = RankResults()
        for rank in range(tp_size):
            data = torch.load(work / f"rank{rank}.pt", map_location="cpu", weights_only=False)
            results.append(
                RankResult(
                    rank=rank,
                    params=data["params"],
                    log=logs[rank],
                    error=data["error"],
                    update_results=[tuple(x) for x in data["update_results"]],
                    params_before=data["params_before"],
                    params_history=data.get("params_history"),
                    timings=data["timings"],
                    module_walks=data.get("module_walks"),
                    overlay=data.get("overlay"),
                )
            )
        return results
    finally:
        for p in procs:
            _kill_group(p)
        for lf in log_files:
            if not lf.closed:
                lf.close()
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class CaseSpec:
    """One load (and its updates) of a :func:`load_cases` batch."""

    model_path: PathLike
    load_format: str = "auto"
    update_path: Union[None, PathLike, Sequence[PathLike]] = None
    keep_initial: bool = False
    ep_size: Optional[int] = None  # None: the batch's ep_size; another one rebuilds the groups
    server_args: Optional[dict] = None  # further ServerArgs fields of this case (e.g. dtype)


def _update_list(update_path, load_format: str) -> List[dict]:
    if update_path is None:
        paths: List[str] = []
    elif isinstance(update_path, (str, os.PathLike)):
        paths = [os.fspath(update_path)]
    else:
        paths = [os.fspath(p) for p in update_path]
    return [{"model_path": p, "load_format": load_format} for p in paths]


def load_cases(
    cases: Sequence[CaseSpec],
    *,
    tp_size: int = 1,
    ep_size: int = 1,
    env: Optional[Mapping[str, Optional[str]]] = None,
    timeout: float = 600,
    log_level: str = "INFO",
) -> List[Union["RankResults", str]]:
    """Run many loads in ONE group of ``tp_size`` rank processes (imports are paid once).

    Each case builds its model afresh (its own ``ServerArgs``), loads it, applies its
    updates and returns its parameters; the process groups are shared by all cases.

    Args:
        cases: the loads, run in order.
        tp_size: the tensor-parallel size of every case.
        ep_size: the expert-parallel size of cases that name none.
        env: extra environment of the rank processes.

    Returns:
        One entry per case: its ``RankResults`` (each rank's ``log`` is that case's part of
        the rank log), or a string with the rank tracebacks when the case crashed.

    Raises:
        RankProcessError: a rank process died or the batch timed out.
    """
    for ep in {c.ep_size or ep_size for c in cases}:
        if tp_size < 1 or ep < 1 or tp_size % ep:
            raise ValueError(f"tp_size={tp_size} must be a positive multiple of ep_size={ep}")
    spec = {
        "model_path": os.fspath(cases[0].model_path),
        "tp_size": tp_size,
        "ep_size": ep_size,
        "load_format": cases[0].load_format,
        "updates": [],
        "extra_config": None,
        "keep_initial": False,
        "keep_history": False,
        "server_args": {},
        "log_level": log_level,
        "threads_per_rank": max(1, (os.cpu_count() or 1) // tp_size),
        "cases": [
            {
                "model_path": os.fspath(c.model_path),
                "load_format": c.load_format,
                "updates": _update_list(c.update_path, c.load_format),
                "keep_initial": c.keep_initial,
                "ep_size": c.ep_size or ep_size,
                "server_args": c.server_args or {},
            }
            for c in cases
        ],
    }
    environ = child_env(env, threads=spec["threads_per_rank"])
    return _run_ranks(spec, environ, timeout=timeout)


# The reference of every bit-identity test: upstream's own SGLang, the overlay switched off in
# the rank processes (the stand-ins for GPU-only imports stay). With the overlay on, `auto`
# would run the forks and this package's twins too, and a mistake in them could hide behind
# the same mistake on the `fast` side.
UPSTREAM_ENV = {"SGLANG_FASTLOAD": "0"}


def _assert_upstream_ran(results: Sequence["RankResults"]) -> None:
    for res in results:
        if isinstance(res, str):
            continue  # a crashed case: its test reports the tracebacks
        for r in res:
            assert r.overlay is False, f"rank {r.rank} of a reference load ran the overlay's SGLang"


def upstream_params(model_path: PathLike, *, env: Optional[Mapping[str, Optional[str]]] = None, **kwargs) -> RankResults:
    """``load_params(model_path, load_format="auto", ...)`` through upstream's own SGLang.

    Args:
        model_path: the checkpoint to load.
        env: further environment of the rank processes (the overlay stays off).
        kwargs: any other argument of ``load_params`` but ``load_format``.

    Returns:
        The ranks' results, each checked to have run without the overlay.
    """
    results = load_params(model_path, load_format="auto", env={**(env or {}), **UPSTREAM_ENV}, **kwargs)
    _assert_upstream_ran([results])
    return results


def load_cases_beside_upstream(
    cases: Sequence[CaseSpec],
    *,
    env: Optional[Mapping[str, Optional[str]]] = None,
    **kwargs,
) -> List[Union["RankResults", str]]:
    """``load_cases`` with its `auto` cases run by upstream's own SGLang, in a rank group of
    their own (``UPSTREAM_ENV``), and the other cases as ``load_cases`` runs them.

    Args:
        cases: the loads; the `auto` ones are the references.
        env: extra environment of both groups' rank processes.
        kwargs: ``tp_size``, ``ep_size``, ``timeout``, ``log_level`` of ``load_cases``.

    Returns:
        One entry per case, in the order of ``cases``.
    """
    out: List[Union["RankResults", str, None]] = [None] * len(cases)
    upstream = [i for i, c in enumerate(cases) if c.load_format == "auto"]
    rest = [i for i, c in enumerate(cases) if c.load_format != "auto"]
    for indices, group_env in ((upstream, {**(env or {}), **UPSTREAM_ENV}), (rest, env)):
        if indices:
            got = load_cases([cases[i] for i in indices], env=group_env, **kwargs)
            for i, res in zip(indices, got):
                out[i] = res
    _assert_upstream_ran([out[i] for i in upstream])
    return out


def _split_case_logs(log: str, count: int) -> List[str]:
    parts = [""] * count
    current = None
    for line in log.splitlines(keepends=True):
        begin = re.search(r"rig case (\d+) begin", line)
        if begin:
            current = int(begin.group(1))
        if current is not None:
            parts[current] += line
        if re.search(r"rig case \d+ end", line):
            current = None
    return parts


def _case_results(work: Path, logs: List[str], count: int) -> list:
    data = [torch.load(work / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(len(logs))]
    case_logs = [_split_case_logs(log, count) for log in logs]
    out: list = []
    for i in range(count):
        crashes = [d["cases"][i].get("crash") for d in data]
        if any(crashes):
            out.append("\n".join(f"rank {r}: {c}" for r, c in enumerate(crashes) if c))
            continue
        results = RankResults()
        for r, d in enumerate(data):
            c = d["cases"][i]
            results.append(
                RankResult(
                    rank=r,
                    params=c["params"],
                    log=case_logs[r][i],
                    error=c["error"],
                    update_results=[tuple(x) for x in c["update_results"]],
                    params_before=c["params_before"],
                    timings=c["timings"],
                    module_walks=c.get("module_walks"),
                    overlay=c.get("overlay"),
                )
            )
        out.append(results)
    return out


# --------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_INT_OF_SIZE[t.element_size()])


def _as_params(x) -> Mapping[str, torch.Tensor]:
    return x.params if hasattr(x, "params") else x


def compare_params(a, b, *, names: Optional[Iterable[str]] = None, limit: int = 0) -> List[str]:
    """Every difference between two parameter dicts (or RankResults/RankResult).

    Lists names missing on either side, shape and dtype differences, and every tensor
    whose bits differ (``torch.equal`` on integer views, so ``-0.0`` vs ``0.0`` and NaN
    payloads count). ``names`` restricts the comparison; ``limit`` > 0 truncates the list.
    """
    if isinstance(a, RankResults) and isinstance(b, RankResults):
        if len(a) != len(b):
            return [f"rank count differs: {len(a)} vs {len(b)}"]
        out = []
        for ra, rb in zip(a, b):
            out += [f"rank {ra.rank}: {m}" for m in compare_params(ra.params, rb.params, names=names)]
        return out[:limit] if limit else out
    pa, pb = _as_params(a), _as_params(b)
    keys_a, keys_b = set(pa), set(pb)
    if names is not None:
        wanted = set(names)
        keys_a &= wanted
        keys_b &= wanted
    out = [f"missing in second: {n}" for n in sorted(keys_a - keys_b)]
    out += [f"missing in first: {n}" for n in sorted(keys_b - keys_a)]
    for n in sorted(keys_a & keys_b):
        x, y = pa[n], pb[n]
        if x.dtype != y.dtype:
            out.append(f"{n}: dtype {x.dtype} vs {y.dtype}")
            continue
        if tuple(x.shape) != tuple(y.shape):
            out.append(f"{n}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        bx, by = _bits(x), _bits(y)
        if not torch.equal(bx, by):
            ndiff = int((bx != by).sum())
            out.append(f"{n}: {ndiff} of {x.numel()} elements differ")
    return out[:limit] if limit else out


def assert_params_equal(a, b, *, names: Optional[Iterable[str]] = None, what: str = "") -> None:
    diffs = compare_params(a, b, names=names)
    if diffs:
        shown = "\n  ".join(diffs[:40])
        more = f"\n  ... and {len(diffs) - 40} more" if len(diffs) > 40 else ""
        raise AssertionError(f"parameters differ{(' (' + what + ')') if what else ''}: {len(diffs)} difference(s)\n  {shown}{more}")
