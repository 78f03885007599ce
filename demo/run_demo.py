"""sglang-fastload demo: a real SGLang server on CPU, updated from disk A -> B -> A ...

Two servers run one after the other on the same checkpoints, with the same flags:

* **fast**: ``--load-format fast`` with the sglang-fastload overlay active;
* **upstream**: ``--load-format auto`` with ``SGLANG_FASTLOAD=0``, i.e. the overlay switched
  off and pure upstream SGLang (its default threaded safetensors loader).

Each server starts on A, answers a few greedy prompts, then gets ``--updates`` calls of
``POST /update_weights_from_disk`` alternating B, A, B, ... and answers the same prompts
after each one. The demo prints the client-side seconds of every update (median, GB/s,
ratio), the fast loader's own read/copy GB/s from its log line, and whether the greedy
token ids of the two servers matched after every update. Exit status: 0 when every update
succeeded and every output matched, 1 otherwise, 2 for bad arguments, 128+N on signal N.

Servers are always stopped: on success, on errors, and on Ctrl-C / SIGTERM / SIGHUP.

    ci/demo                                   # embedded default checkpoint pair
    ci/demo --model-path /models/Qwen3-30B-A3B   # one checkpoint as both A and B
    ci/demo --checkpoint-a DIR_A --checkpoint-b DIR_B --tp-size 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run as a script (demo/run_demo.py) or from another directory
    sys.path.insert(0, str(_REPO))

from demo import checkpoints as demo_checkpoints  # noqa: E402
from demo.report import combined_copy_gbps, fmt, median, parse_summaries, table  # noqa: E402

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time")
FLUSH_TIMEOUT_S = 60.0
OVERLAY_NOTICE = "sglang-fastload overlay active"  # sglang_fastload.constants.ACTIVE_NOTICE

MODES = {
    "fast": dict(
        label="fast (sglang-fastload)",
        load_format="fast",
        env={"SGLANG_FASTLOAD": None},  # never inherit an "off" switch for this one
    ),
    "upstream": dict(
        label="upstream (SGLANG_FASTLOAD=0)",
        load_format="auto",
        env={"SGLANG_FASTLOAD": "0"},
    ),
}

_print_lock = threading.Lock()


def say(msg: str = "") -> None:
    with _print_lock:
        print(msg, flush=True)


def step(msg: str) -> None:
    say(f"\n==> {msg}")


class DemoError(Exception):
    """The demo cannot go on (bad checkpoint, server failure, failed update)."""


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# ----------------------------------------------------------------------------- signals
_signal_state = {"first": None}


def _on_signal(signum, frame):
    if _signal_state["first"] is not None:
        say(f"\n({signal.Signals(signum).name} again: still stopping the servers, please wait)")
        return
    _signal_state["first"] = signum
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


# ------------------------------------------------------------------------------- args
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ci/demo",
        description=(
            "Start a real SGLang server on CPU with --load-format fast, update its weights from "
            "disk A -> B -> A ..., do the same with upstream's loader (SGLANG_FASTLOAD=0), and "
            "print update seconds, GB/s, the ratio and whether greedy outputs matched."
        ),
    )
    src = p.add_argument_group("checkpoints (default: an embedded random Qwen3-MoE pair, written locally)")
    src.add_argument("--model-path", metavar="DIR", help="one checkpoint directory, used as both A and B")
    src.add_argument("--checkpoint-a", metavar="DIR", help="checkpoint the servers start on")
    src.add_argument("--checkpoint-b", metavar="DIR", help="checkpoint to update to (same architecture and shapes)")
    src.add_argument("--tiny", action="store_true", help="embedded default only: a tiny pair of a few MB (CI)")
    src.add_argument(
        "--work-dir",
        metavar="DIR",
        help=f"where the embedded pair is written and cached (default: {demo_checkpoints.DEFAULT_WORK_DIR})",
    )
    run = p.add_argument_group("run")
    run.add_argument("--updates", type=int, default=6, help="updates per server, alternating B, A, B, ... (default 6)")
    run.add_argument("--prompt", action="append", metavar="TEXT", help="greedy prompt (repeat; default: 3 prompts)")
    run.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens per prompt (default 8)")
    run.add_argument("--tp-size", type=int, default=1, help="tensor parallel ranks per server (default 1)")
    run.add_argument(
        "--num-threads",
        type=int,
        help='loader threads for both servers ({"num_threads": N} in --model-loader-extra-config; default: each loader\'s own, 8)',
    )
    run.add_argument(
        "--server-args",
        default="",
        metavar="'FLAGS'",
        help="extra sglang.launch_server flags for both servers, one quoted string (e.g. '--context-length 4096')",
    )
    run.add_argument(
        "--omp-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for both servers (default 1: stable CPU timings on small or busy machines; "
        "0 leaves it unset, i.e. the server's default of all cores)",
    )
    run.add_argument("--start-timeout", type=float, default=300, help="seconds a server may take to start (default 300)")
    run.add_argument("--log-dir", metavar="DIR", help="server logs (default: a new temporary directory)")
    run.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    args = p.parse_args(argv)

    if args.model_path and (args.checkpoint_a or args.checkpoint_b):
        p.error("use either --model-path or --checkpoint-a/--checkpoint-b")
    if bool(args.checkpoint_a) != bool(args.checkpoint_b):
        p.error("--checkpoint-a and --checkpoint-b go together (or use --model-path for one directory)")
    if args.tiny and (args.model_path or args.checkpoint_a):
        p.error("--tiny selects the embedded default; it does not apply to your own checkpoints")
    if args.updates < 1:
        p.error("--updates must be at least 1")
    if args.tp_size < 1 or args.max_new_tokens < 1:
        p.error("--tp-size and --max-new-tokens must be at least 1")
    if args.omp_threads < 0:
        p.error("--omp-threads must be 0 (unset) or more")
    if args.num_threads is not None and args.num_threads < 1:
        p.error("--num-threads must be at least 1")
    for path in (args.model_path, args.checkpoint_a, args.checkpoint_b):
        if path is not None:
            problem = _checkpoint_problem(Path(path))
            if problem:
                p.error(f"{path}: {problem}")
    try:
        args.server_args_list = shlex.split(args.server_args)
    except ValueError as exc:
        p.error(f"--server-args: {exc}")
    args.prompts = args.prompt or list(DEFAULT_PROMPTS)
    return args


def _checkpoint_problem(path: Path) -> Optional[str]:
    if not path.is_dir():
        return "not a directory (the demo takes a local checkpoint directory)"
    if not (path / "config.json").is_file():
        return "no config.json"
    if not any(path.glob("*.safetensors")):
        return "no *.safetensors files"
    return None


# ------------------------------------------------------------------------ environment
def check_environment() -> None:
    step("environment")
    import sglang  # noqa: F401  (fails here, clearly, when the venv is incomplete)

    say(f"python {sys.executable} ({sys.version.split()[0]}), sglang {getattr(sglang, '__version__', '?')}, "
        f"{os.cpu_count()} CPU cores")
    env = dict(os.environ)
    env.pop("SGLANG_FASTLOAD", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sglang_fastload", "status"],
        cwd=tempfile.gettempdir(),  # the installed package, not a source tree in the cwd
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = (proc.stdout.strip().splitlines() or ["(no output)"])[0]
    say(f"python -m sglang_fastload status: {first}")
    if proc.returncode != 0:
        raise DemoError(
            "the sglang-fastload overlay is not active in this environment; "
            "run `bash ci/setup_env.sh` (or `ci/demo`, which runs it)\n" + proc.stdout
        )


def checkpoint_bytes(path: Path) -> int:
    """Bytes of the shards a load reads: those the index names, else every ``*.safetensors``."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
            return sum((path / n).stat().st_size for n in names)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def warm_page_cache(paths) -> None:
    """Read every shard once so both servers see the same (warm) page cache."""
    t0, total = time.perf_counter(), 0
    seen = set()
    for d in paths:
        for f in sorted(Path(d).glob("*.safetensors")):
            real = os.path.realpath(f)
            if real in seen:
                continue
            seen.add(real)
            with open(real, "rb", buffering=0) as fh:
                while True:
                    chunk = fh.read(16 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
    dt = time.perf_counter() - t0
    say(f"read the checkpoints once ({total / 1e6:.1f} MB in {dt:.1f} s) so both servers start from a warm page cache")


# ---------------------------------------------------------------------------- servers
def _last_log_line(srv) -> str:
    lines = [l for l in srv.log_text().splitlines() if l.strip()]
    if not lines:
        return ""
    line = lines[-1]
    if line.startswith("[") and "] " in line[:40]:
        line = line.split("] ", 1)[1]
    return line if len(line) <= 100 else line[:97] + "..."


def _descendants(pid: int) -> List[int]:
    try:
        import psutil

        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:
        return []


@contextlib.contextmanager
def start_progress(name: str, srv, all_pids: List[int], every: float = 5.0):
    """While a server starts: every few seconds, how long so far and its latest log line.

    Also remembers the server's processes as they appear, so the final check covers a
    server interrupted before it became healthy.
    """
    done = threading.Event()
    t0 = time.monotonic()

    def tick():
        while not done.wait(every):
            if srv.proc is not None:
                all_pids.extend(p for p in _descendants(srv.proc.pid) if p not in all_pids)
            say(f"  [{name}] starting ... {time.monotonic() - t0:4.0f} s   | {_last_log_line(srv)}")

    thread = threading.Thread(target=tick, name=f"demo-progress-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2)


def _generate_all(srv, prompts, max_new_tokens) -> List[List[int]]:
    """Greedy token ids for every prompt, in one batched request (eos ignored)."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    status, body = srv.post("/generate", {"text": list(prompts), "sampling_params": params})
    if status != 200 or not isinstance(body, list) or len(body) != len(prompts):
        raise DemoError(f"/generate failed: HTTP {status}: {str(body)[:500]}\n{srv.log_tail(40)}")
    return [[int(i) for i in item["output_ids"]] for item in body]


def run_server(name: str, a: Path, b: Path, args, log_dir: Path, all_pids: List[int]) -> Dict:
    from tests.rig.server import SGLangServer

    mode = MODES[name]
    extra_config = {"num_threads": args.num_threads} if args.num_threads else None
    env = dict(mode["env"])
    if args.omp_threads:
        env["OMP_NUM_THREADS"] = str(args.omp_threads)
    srv = SGLangServer(
        a,
        load_format=mode["load_format"],
        tp_size=args.tp_size,
        extra_args=["--sleep-on-idle", *args.server_args_list],  # idle servers leave the cores alone
        env=env,
        extra_config=extra_config,
        timeout=args.start_timeout,
        request_timeout=max(600.0, args.start_timeout),
        log_dir=log_dir / name,
    )
    result = {"name": name, "label": mode["label"], "load_format": mode["load_format"], "steps": []}
    step(f"{mode['label']}: starting a CPU server on A with --load-format {mode['load_format']}")
    say(f"  log: {srv.log_path}")
    try:
        with start_progress(name, srv, all_pids):
            srv.start()
        pids = srv.pids()
        all_pids.extend(p for p in pids if p not in all_pids)
        result["pids"] = pids
        result["start_s"] = srv.start_s
        say(f"  [{name}] server up in {srv.start_s:.1f} s on port {srv.port}")
        say(f"  [{name}] server pids: {' '.join(str(p) for p in pids)}")

        log = srv.log_text()
        active = OVERLAY_NOTICE in log
        result["overlay_active"] = active
        startup = parse_summaries(log)
        if name == "fast":
            if not active:
                raise DemoError(f"the fast server did not activate the overlay\n{srv.log_tail(30)}")
            if startup:
                s = startup[0]
                say(
                    f"  [{name}] start-up load (its log): {sum(x.bytes_read for x in startup) / 1e9:.3f} GB, "
                    f"plan {s.plan_s:.3f} s ({s.plan_source}), validate {s.validate_s:.3f} s, "
                    f"read/copy {s.copy_s:.3f} s, {fmt(combined_copy_gbps(startup), 2)} GB/s"
                )
            else:
                say(f"  [{name}] note: no fast-loader summary at start-up (the model fell back to upstream's path)")
        elif active or startup:
            raise DemoError("the upstream server ran with the overlay active; SGLANG_FASTLOAD=0 did not reach it")
        else:
            say(f"  [{name}] overlay off in this server (no '{OVERLAY_NOTICE}' line in its log): pure upstream")

        outputs = _generate_all(srv, args.prompts, args.max_new_tokens)
        result["steps"].append({"step": "start", "weights": "A", "seconds": None, "gbps": None,
                                "copy_gbps": None, "outputs": outputs})
        for i in range(1, args.updates + 1):
            label, target = ("B", b) if i % 2 else ("A", a)
            # SGLang answers /generate a moment before the scheduler retires the requests; an
            # update arriving in between updates the weights but fails to flush the cache
            # (HTTP 400). Wait until the server is idle first (not part of the timing).
            status, body = srv.post(f"/flush_cache?timeout={FLUSH_TIMEOUT_S:g}")
            if status != 200:
                raise DemoError(f"[{name}] the server did not become idle before update {i}: HTTP {status}: {body!r}")
            offset = len(srv.log_text())
            t0 = time.perf_counter()
            status, body = srv.update_weights_from_disk(str(target))
            seconds = time.perf_counter() - t0
            if status != 200 or not (isinstance(body, dict) and body.get("success")):
                raise DemoError(f"[{name}] update {i} to {label} failed: HTTP {status}: {body!r}\n{srv.log_tail(40)}")
            lines = parse_summaries(srv.log_text()[offset:])
            copy_gbps = combined_copy_gbps(lines)
            gbps = checkpoint_bytes(target) / seconds / 1e9
            outputs = _generate_all(srv, args.prompts, args.max_new_tokens)
            result["steps"].append({"step": i, "weights": label, "seconds": seconds, "gbps": gbps,
                                    "copy_gbps": copy_gbps, "outputs": outputs})
            extra = f", loader read/copy {copy_gbps:.2f} GB/s (its log)" if copy_gbps is not None else ""
            say(f"  [{name}] update {i}/{args.updates} -> {label}: {seconds:.3f} s ({gbps:.2f} GB/s of checkpoint){extra}")
            if name == "fast" and not lines:
                say(f"  [{name}] note: no fast-loader summary for this update (upstream's path was used)")
    finally:
        srv.stop()
    say(f"  [{name}] server stopped")
    return result


def processes_left(pids: List[int]) -> List[int]:
    """Live server processes: one of ``pids``, or any process in a session one of them leads.

    Each launcher leads its own session (the rig starts it with ``start_new_session``) and
    SGLang's processes stay in it, so this also sees children that were never sampled.
    """
    import psutil

    known = set(pids)
    left = []
    for pid in psutil.pids():
        try:
            in_session = os.getsid(pid) in known
        except OSError:
            in_session = False
        if pid not in known and not in_session:
            continue
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if not in_session and "sglang" not in " ".join([proc.name(), *proc.cmdline()]):
                continue  # a recycled pid
        except psutil.Error:
            continue
        left.append(pid)
    return left


# ---------------------------------------------------------------------------- report
def report(results: Dict[str, Dict], ckpt_desc: str, nbytes: int, args, same_ab: bool) -> bool:
    fast, up = results["fast"], results["upstream"]
    n = args.updates
    step("results")
    say(f"checkpoint: {ckpt_desc}")
    omp = f"OMP_NUM_THREADS={args.omp_threads}" if args.omp_threads else "OMP_NUM_THREADS unset"
    say(f"            {nbytes / 1e6:.1f} MB of safetensors; TP {args.tp_size}; {os.cpu_count()} CPU cores; {omp}; "
        f"warm page cache; {n} updates per server (A -> B -> A ...)")
    say("upstream:   the same server flags with --load-format auto and SGLANG_FASTLOAD=0 (overlay off: pure SGLang)")
    say("update s:   POST /update_weights_from_disk as timed by the client; GB/s = checkpoint bytes / update s")
    say("")

    rows, medians = [], {}
    for r in (fast, up):
        secs = [s["seconds"] for s in r["steps"][1:]]
        medians[r["name"]] = med = median(secs)
        copy = median([s["copy_gbps"] for s in r["steps"][1:]])
        rows.append([
            r["label"],
            r["load_format"],
            fmt(r["start_s"], 1),
            fmt(med),
            fmt(min(secs)),
            fmt(max(secs)),
            fmt(median([s["gbps"] for s in r["steps"][1:]]), 2),
            fmt(copy, 2),
        ])
    say(table(
        ["server", "load format", "start s", f"update s (median of {n})", "min s", "max s", "GB/s", "loader read/copy GB/s"],
        rows,
    ))
    ratio = medians["upstream"] / medians["fast"] if medians["fast"] else None
    say("")
    say(f"  ratio: upstream / fast median update seconds = {fmt(ratio, 1)}x")

    say("")
    step_rows, all_match = [], True
    for fs, us in zip(fast["steps"], up["steps"]):
        match = fs["outputs"] == us["outputs"]
        all_match &= match
        step_rows.append([
            str(fs["step"]), fs["weights"], fmt(fs["seconds"]), fmt(us["seconds"]),
            fmt(fs["copy_gbps"], 2), "yes" if match else "NO",
        ])
    say(table(["step", "weights", "fast s", "upstream s", "fast read/copy GB/s", "outputs match"], step_rows))

    # Two sanity notes: updates really change the weights, and each server is repeatable.
    say("")
    out_a, out_b = fast["steps"][0]["outputs"], (fast["steps"][1]["outputs"] if n >= 1 else None)
    if same_ab:
        say("  note: A and B are the same checkpoint (--model-path), so outputs cannot change between them")
    else:
        say(f"  greedy outputs on A and B differ (the update changed the weights): {'yes' if out_a != out_b else 'no'}")
    repeat = all(
        s["outputs"] == r["steps"][0 if s["weights"] == "A" else 1]["outputs"] for r in (fast, up) for s in r["steps"]
    )
    say(f"  each server's outputs repeat exactly whenever it is back on the same checkpoint: {'yes' if repeat else 'NO'}")

    ok = all_match
    say("")
    if ok:
        say(f"RESULT: PASS: all {2 * n} updates succeeded and greedy outputs matched after every update "
            f"({len(step_rows)} of {len(step_rows)} steps, {len(args.prompts)} prompts x {args.max_new_tokens} tokens)")
    else:
        bad = sum(1 for r in step_rows if r[-1] != "yes")
        say(f"RESULT: FAIL: greedy outputs differed between the servers at {bad} of {len(step_rows)} steps")

    if args.json:
        payload = {
            "checkpoint": ckpt_desc,
            "checkpoint_bytes": nbytes,
            "tp_size": args.tp_size,
            "cpu_cores": os.cpu_count(),
            "omp_threads": args.omp_threads or None,
            "updates": n,
            "prompts": args.prompts,
            "max_new_tokens": args.max_new_tokens,
            "median_update_s": medians,
            "ratio": ratio,
            "outputs_match": [r[-1] == "yes" for r in step_rows],
            "servers": results,
            "pass": ok,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return ok


# ------------------------------------------------------------------------------ main
def run(args, all_pids: List[int]) -> int:
    t_start = time.perf_counter()
    say("sglang-fastload demo: `--load-format fast` vs upstream on POST /update_weights_from_disk (SGLang on CPU)")
    check_environment()

    step("checkpoints")
    same_ab = False
    if args.model_path:
        a = b = Path(args.model_path).resolve()
        same_ab = True
        desc = f"{a} (as both A and B)"
    elif args.checkpoint_a:
        a, b = Path(args.checkpoint_a).resolve(), Path(args.checkpoint_b).resolve()
        same_ab = a == b
        desc = f"A = {a}, B = {b}"
    else:
        spec = demo_checkpoints.TINY if args.tiny else demo_checkpoints.DEFAULT
        a, b = demo_checkpoints.ensure_pair(spec, args.work_dir, log=lambda m: say("  " + m))
        desc = f"embedded {'tiny ' if args.tiny else ''}default: random {spec.describe()} (A: seed "
        desc += f"{demo_checkpoints.SEED_A}, B: seed {demo_checkpoints.SEED_B}), written locally"
    say(f"A: {a}")
    say(f"B: {b}")
    warm_page_cache([a, b])
    nbytes = checkpoint_bytes(b)

    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="sglang-fastload-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in MODES:
        results[name] = run_server(name, a, b, args, log_dir, all_pids)

    ok = report(results, desc, nbytes, args, same_ab)
    left = processes_left(all_pids)
    if left:
        say(f"WARNING: server processes still running: {left}")
        ok = False
    else:
        say(f"servers stopped; no server process left (checked pids {' '.join(map(str, all_pids))})")
    say(f"server logs: {log_dir}; demo took {time.perf_counter() - t_start:.0f} s")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    all_pids: List[int] = []
    code = 1
    try:
        code = run(args, all_pids)
    except Interrupted as exc:
        code = 128 + exc.signum
        say(f"\ninterrupted by {signal.Signals(exc.signum).name}: stopping the servers ...")
    except DemoError as exc:
        say(f"\nERROR: {exc}")
        code = 1
    finally:
        # Whatever happened, no server outlives the demo. Further signals only print a note.
        _signal_state["first"] = _signal_state["first"] or signal.SIGINT
        from tests.rig.server import stop_all_servers

        stop_all_servers()
        left = processes_left(all_pids)
        if code != 0 and all_pids:
            if left:
                say(f"WARNING: server processes still running: {left}")
            else:
                say(f"servers stopped (pids {' '.join(map(str, all_pids))} are gone)")
    return code


if __name__ == "__main__":
    sys.exit(main())
