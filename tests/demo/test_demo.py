"""The demo (``ci/demo``) runs to completion as CI runs it, reports matching outputs, and
leaves no server behind: on success, on Ctrl-C, and on SIGTERM during a server's start.

The demo runs in a subprocess through ``ci/demo`` itself, with its short settings
(``--tiny --updates 2``). ``ci/test`` has just run ``ci/setup_env.sh``, so the demo's own
setup step is skipped here (``SGLANG_FASTLOAD_DEMO_SKIP_SETUP=1``) and the demo runs on the
interpreter running the tests.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from demo.report import parse_summaries, table
from sglang_fastload.loader.summary import LoadSummary

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "ci" / "demo"


def demo_env():
    env = dict(os.environ)
    env["SGLANG_FASTLOAD_DEMO_SKIP_SETUP"] = "1"
    env["SGLANG_FASTLOAD_DEMO_PYTHON"] = sys.executable
    env.pop("SGLANG_FASTLOAD", None)
    return env


def short_args(tmp_path, *extra):
    return [
        "bash", str(DEMO), "--tiny",
        "--work-dir", str(tmp_path / "work"),
        "--log-dir", str(tmp_path / "logs"),
        *extra,
    ]  # fmt: skip


def printed_pids(output: str):
    pids = set()
    for m in re.finditer(r"server pids: ([\d ]+)", output):
        pids.update(int(p) for p in m.group(1).split())
    for m in re.finditer(r"\(pids ([\d ]+) are gone\)|checked pids ([\d ]+)\)", output):
        pids.update(int(p) for p in (m.group(1) or m.group(2)).split())
    return pids


def server_processes_alive(pids):
    """Live (non-zombie) SGLang processes among ``pids``, or in the sessions they lead.

    Each server's launcher leads its own session and its processes stay in it, so the
    session check also finds children the demo never printed (one started after it
    sampled the pids, say).
    """
    import psutil

    pids = set(pids)
    alive = []
    for pid in psutil.pids():
        try:
            in_session = os.getsid(pid) in pids
        except OSError:
            in_session = False
        if pid not in pids and not in_session:
            continue
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(proc.cmdline()) + " " + proc.name()
        except psutil.Error:
            continue
        if in_session or "sglang" in cmd:  # not a recycled pid of something else
            alive.append((pid, cmd[:120]))
    return alive


def wait_gone(pids, timeout=20.0):
    deadline = time.monotonic() + timeout
    while server_processes_alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return server_processes_alive(pids)


def step_table_rows(output: str):
    """Rows of the per-step table: the lines under the header with 'outputs match'."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "outputs match" in line and line.strip().startswith("step"))
    rows = []
    for line in lines[start + 2 :]:  # skip the header and the rule
        if not line.strip():
            break
        rows.append(line.split())
    return rows


# ------------------------------------------------------------------------ fast checks
def test_summary_parser_reads_the_loaders_own_line():
    for rank in ("", " [tp rank 1/2]"):
        s = LoadSummary(
            directory="/models/with: colon/b", files=4, tensors=807, tensors_used=800,
            checkpoint_bytes=210082464, bytes_read=209987584, plan_seconds=0.001, plan_cached=True,
            validate_seconds=0.014, copy_seconds=0.033, threads=8, rank=rank,
        )  # fmt: skip
        (got,) = parse_summaries("[2026-01-01 00:00:00] " + s.line() + "\nnext line")
        assert got.directory == "/models/with: colon/b"
        assert got.rank == (1 if rank else 0)
        assert (got.files, got.tensors, got.bytes_read, got.checkpoint_bytes, got.threads) == (4, 807, 209987584, 210082464, 8)
        assert got.plan_cached and got.copy_s == pytest.approx(0.033) and got.gbps == pytest.approx(6.36, abs=0.01)
    # A plan read from the plan store, or built: the word says which.
    for source in ("stored", "built"):
        line = LoadSummary(directory="/m", plan_source=source).line()
        (got,) = parse_summaries(line)
        assert (got.plan_source, got.plan_cached) == (source, False), line


def test_table_aligns_columns():
    text = table(["step", "outputs match"], [["start", "yes"], ["1", "NO"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].split() == ["start", "yes"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-path", "{d}", "--checkpoint-a", "{d}", "--checkpoint-b", "{d}"], "either --model-path"),
        (["--checkpoint-a", "{d}"], "go together"),
        (["--model-path", "{missing}"], "not a directory"),
        (["--model-path", "{d}"], "no config.json"),
        (["--tiny", "--model-path", "{d}"], "--tiny"),
        (["--updates", "0"], "--updates"),
    ],
)
def test_bad_arguments_exit_2_before_anything_starts(tmp_path, args, message):
    args = [a.format(d=tmp_path, missing=tmp_path / "nope") for a in args]
    proc = subprocess.run(
        [sys.executable, str(REPO / "demo" / "run_demo.py"), *args],
        env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stdout


# ----------------------------------------------------------------------- real servers
@pytest.mark.slow
@pytest.mark.server
def test_demo_runs_to_completion_and_outputs_match(tmp_path):
    result_file = tmp_path / "result.json"
    t0 = time.monotonic()
    proc = subprocess.run(
        short_args(tmp_path, "--updates", "2", "--json", str(result_file)),
        cwd=REPO, env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout
    print(out[-6000:])
    print(f"demo took {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, out[-4000:]

    # The summary table: one row per server, and the ratio.
    assert re.search(r"^\s+fast \(sglang-fastload\)\s+fast\s", out, re.M), out
    assert re.search(r"^\s+upstream \(SGLANG_FASTLOAD=0\)\s+auto\s", out, re.M), out
    assert "update s (median of 2)" in out
    assert re.search(r"ratio: upstream / fast median update seconds = [\d.]+x", out)

    # The per-step table: start + 2 updates, B then A, every "outputs match" cell is yes.
    rows = step_table_rows(out)
    assert [r[:2] for r in rows] == [["start", "A"], ["1", "B"], ["2", "A"]], rows
    assert all(r[-1] == "yes" for r in rows), rows
    assert "greedy outputs on A and B differ (the update changed the weights): yes" in out
    assert "RESULT: PASS" in out

    # The fast server used the fast loader (its summary line per update); upstream did not.
    result = json.loads(result_file.read_text())
    assert result["pass"] and result["outputs_match"] == [True, True, True]
    fast_steps = result["servers"]["fast"]["steps"][1:]
    assert all(s["copy_gbps"] is not None for s in fast_steps)
    assert all(s["copy_gbps"] is None for s in result["servers"]["upstream"]["steps"][1:])
    assert result["servers"]["fast"]["overlay_active"] and not result["servers"]["upstream"]["overlay_active"]

    # No server left behind.
    pids = printed_pids(out)
    assert len(pids) >= 4, out
    assert not wait_gone(pids, timeout=5)
    assert "no server process left" in out


class _Lines:
    """Reads a process's output line by line in the background."""

    def __init__(self, proc):
        self.lines = []
        self._q = queue.Queue()
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream):
        for line in stream:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{''.join(self.lines[-60:])}")

    def rest(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
        return "".join(self.lines)


def _run_and_signal(tmp_path, pattern, sig, timeout=300):
    proc = subprocess.Popen(
        short_args(tmp_path, "--updates", "40"),
        cwd=REPO, env=demo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines = _Lines(proc)
    try:
        lines.wait_for(pattern, timeout)
        proc.send_signal(sig)  # ci/demo execs python: this is the demo process itself
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, lines.rest(10)


@pytest.mark.slow
@pytest.mark.server
def test_ctrl_c_stops_the_servers(tmp_path):
    code, out = _run_and_signal(tmp_path, r"\[fast\] server pids: ", signal.SIGINT)
    print(out[-4000:])
    assert code == 128 + signal.SIGINT, out[-4000:]
    assert "interrupted by SIGINT" in out
    pids = printed_pids(out)
    assert pids, out
    assert not wait_gone(pids), out[-3000:]
    assert "RESULT" not in out


@pytest.mark.slow
@pytest.mark.server
def test_sigterm_while_a_server_starts_stops_it(tmp_path):
    # The demo prints a progress line every 5 s while a server starts.
    code, out = _run_and_signal(tmp_path, r"\[fast\] starting \.\.\.", signal.SIGTERM)
    print(out[-4000:])
    assert code == 128 + signal.SIGTERM, out[-4000:]
    assert "interrupted by SIGTERM" in out
    assert "server up" not in out
    pids = printed_pids(out)
    assert pids, out
    assert not wait_gone(pids), out[-3000:]
