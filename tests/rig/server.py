"""A real ``python -m sglang.launch_server`` on CPU, as a context manager.

    with SGLangServer(ckpt_a, load_format="fast") as srv:
        ids = srv.generate("Hello world", max_new_tokens=8)     # greedy token ids
        status, body = srv.update_weights_from_disk(str(ckpt_b))
        srv.log_text(), srv.pids()

The server runs in its own session (process group) with the CPU flags of
/work/shared/notes/cpu-rig.md, logs to a file, and is always stopped: on ``__exit__``, by
a finalizer, at interpreter exit (``atexit``, which also deletes the temporary log folders
unless ``SGLANG_RIG_KEEP_LOGS=1``), from ``pytest_sessionfinish`` (see
tests/conftest.py) and, when started from the main thread, by the kernel if the test
process dies (``PR_SET_PDEATHSIG``; SGLang's own children already die with the launcher).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import requests

from tests.rig.inprocess import server_port

__all__ = ["SGLangServer", "ServerStartError", "stop_all_servers", "CPU_SERVER_ARGS"]

CPU_SERVER_ARGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--disable-cuda-graph",
    "--grammar-backend", "none",
    "--max-total-tokens", "2048",
    "--disable-overlap-schedule",
    "--dtype", "bfloat16",
    "--mem-fraction-static", "0.05",
)  # fmt: skip

_LIVE: "weakref.WeakSet[SGLangServer]" = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; carries the log tail."""


def stop_all_servers() -> None:
    """Stop every server this process started and has not stopped yet."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for srv in servers:
        try:
            srv.stop()
        except Exception:
            pass


_TEMP_LOG_DIRS: List[Path] = []


def _at_exit() -> None:
    stop_all_servers()
    import shutil

    for d in _TEMP_LOG_DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_at_exit)


def _set_pdeathsig():  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _kill_pids(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


class SGLangServer:
    def __init__(
        self,
        model_path: Union[str, os.PathLike],
        *,
        load_format: str = "auto",
        tp_size: int = 1,
        extra_args: Sequence[str] = (),
        env: Optional[Mapping[str, Optional[str]]] = None,
        extra_config: Optional[dict] = None,
        timeout: Optional[float] = None,
        request_timeout: float = 120,
        log_dir: Optional[Union[str, os.PathLike]] = None,
    ):
        self.model_path = os.fspath(model_path)
        self.load_format = load_format
        self.tp_size = tp_size
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.extra_config = extra_config
        # Start-up deadline; SGLANG_RIG_SERVER_TIMEOUT raises it on a crowded machine.
        self.timeout = float(timeout if timeout is not None else os.environ.get("SGLANG_RIG_SERVER_TIMEOUT", 180))
        self.request_timeout = request_timeout
        if log_dir:
            self._log_dir = Path(log_dir)
        else:
            self._log_dir = Path(tempfile.mkdtemp(prefix="sglang-rig-server-"))
            if os.environ.get("SGLANG_RIG_KEEP_LOGS", "0") != "1":
                _TEMP_LOG_DIRS.append(self._log_dir)  # removed at exit (after every server stopped)
        self.log_path = self._log_dir / "server.log"
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self._log_file = None
        self._known_pids: set = set()
        self._finalizer = None
        self.start_s: Optional[float] = None  # seconds from spawn to healthy

    # ----------------------------------------------------------------------------- life cycle
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> List[str]:
        cmd = [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", self.model_path,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--load-format", self.load_format,
            "--tp-size", str(self.tp_size),
            *CPU_SERVER_ARGS,
        ]  # fmt: skip
        if self.extra_config is not None:
            cmd += ["--model-loader-extra-config", json.dumps(self.extra_config)]
        return cmd + self.extra_args

    def environment(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        # Stopping the group kills the schedulers first; the launcher then sleeps 5 s "to let
        # GPU activity settle" before py-spy/CUDA crash diagnostics that a CPU rig never needs.
        env.setdefault("SGLANG_PYSPY_DUMP_BEFORE_CRASH", "0")
        env.setdefault("SGLANG_CUDA_COREDUMP_BEFORE_CRASH", "0")
        env.pop("SGLANG_USE_CPU_ENGINE", None)
        env.pop("SGLANG_CPU_OMP_THREADS_BIND", None)
        if self.tp_size > 1:
            cores = os.cpu_count() or 1
            if cores >= self.tp_size:
                per = cores // self.tp_size
                env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(
                    f"{r * per}" if per == 1 else f"{r * per}-{(r + 1) * per - 1}" for r in range(self.tp_size)
                )
            else:
                env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join("0" for _ in range(self.tp_size))
        for key, value in self.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    def start(self, wait: bool = True) -> "SGLangServer":
        """Spawn the server and (``wait``) block until ``/health`` answers.

        ``wait=False`` returns right after the spawn, for servers that only become healthy
        together (the nodes of one multi-node server); call :meth:`wait_healthy` next.
        """
        if self.proc is not None:
            raise RuntimeError("server already started")
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.port = server_port()
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(("$ " + " ".join(self.command()) + "\n").encode())
        self._log_file.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
            preexec_fn=_set_pdeathsig if threading.current_thread() is threading.main_thread() else None,
        )
        self._known_pids.add(self.proc.pid)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._finalizer = weakref.finalize(self, SGLangServer._stop_group, self.proc, set(self._known_pids))
        self._spawned_at = t0
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self) -> "SGLangServer":
        """Block until the started server answers ``/health`` (stopping it on failure).

        Raises:
            ServerStartError: it exited first or stayed unhealthy past the start-up deadline.
        """
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - self._spawned_at
        self.pids()  # remember the schedulers for stop()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(f"sglang server exited with {code} before becoming healthy\n{self.log_tail()}")
            try:
                r = requests.get(self.base_url + "/health", timeout=5)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"sglang server not healthy after {self.timeout:.0f} s\n{self.log_tail()}")
            self.pids()
            time.sleep(0.5)

    @staticmethod
    def _stop_group(proc: subprocess.Popen, pids: set, grace: float = 15.0) -> None:
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        # Anything that left the group (setsid) but was seen as a descendant.
        _kill_pids([p for p in pids if p != proc.pid and _alive(p)], signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids if p != proc.pid):
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM the whole process group, then SIGKILL it (idempotent)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.pids()
        SGLangServer._stop_group(self.proc, set(self._known_pids))
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> "SGLangServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -------------------------------------------------------------------------- inspection
    def pids(self) -> List[int]:
        """PIDs of the launcher and all its descendants (tokenizer, schedulers, detokenizer)."""
        if self.proc is None:
            return []
        try:
            import psutil

            root = psutil.Process(self.proc.pid)
            found = [root.pid] + [c.pid for c in root.children(recursive=True)]
        except Exception:
            found = [self.proc.pid] if self.running else []
        self._known_pids.update(found)
        if self._finalizer is not None and self._finalizer.alive:
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, SGLangServer._stop_group, self.proc, set(self._known_pids))
        return found

    def rss_bytes(self) -> Dict[int, int]:
        """Resident set size of every server process, by PID."""
        import psutil

        out = {}
        for pid in self.pids():
            try:
                out[pid] = psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return out

    def log_text(self) -> str:
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, text: str, start: int = 0, timeout: float = 15.0) -> bool:
        """True once ``text`` appears in the log after character ``start`` (another rank's
        process may log an outcome a moment after the HTTP reply carried it)."""
        deadline = time.monotonic() + timeout
        while True:
            if text in self.log_text()[start:]:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def log_tail(self, n: int = 80) -> str:
        lines = self.log_text().splitlines()[-n:]
        return f"----- {self.log_path} (last {len(lines)} lines) -----\n" + "\n".join(lines)

    # ---------------------------------------------------------------------------- requests
    def get(self, path: str, **kwargs) -> Tuple[int, object]:
        """GET ``path``; returns ``(status_code, parsed JSON or text)``."""
        r = requests.get(self.base_url + path, timeout=kwargs.pop("timeout", self.request_timeout), **kwargs)
        return r.status_code, _body(r)

    def post(self, path: str, payload: Optional[dict] = None, **kwargs) -> Tuple[int, object]:
        r = requests.post(self.base_url + path, json=payload, timeout=kwargs.pop("timeout", self.request_timeout), **kwargs)
        return r.status_code, _body(r)

    def generate(self, prompt_or_ids: Union[str, Sequence[int]], max_new_tokens: int = 8, **sampling) -> List[int]:
        """Greedy (temperature 0, eos ignored) generation; returns the output token ids."""
        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
        params.update(sampling)
        payload = {"sampling_params": params}
        if isinstance(prompt_or_ids, str):
            payload["text"] = prompt_or_ids
        else:
            payload["input_ids"] = [int(i) for i in prompt_or_ids]
        status, body = self.post("/generate", payload)
        if status != 200 or not isinstance(body, dict) or "output_ids" not in body:
            raise AssertionError(f"/generate failed: HTTP {status}: {body!r}\n{self.log_tail(40)}")
        return [int(i) for i in body["output_ids"]]

    def update_weights_from_disk(self, model_path: Union[str, os.PathLike], **fields) -> Tuple[int, object]:
        """POST /update_weights_from_disk; returns ``(status_code, JSON body)``."""
        payload = {"model_path": os.fspath(model_path)}
        payload.update(fields)
        return self.post("/update_weights_from_disk", payload)


def _body(r: "requests.Response"):
    try:
        return r.json()
    except ValueError:
        return r.text
