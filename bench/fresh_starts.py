"""First starts, each in a fresh process, contenders alternated (as a server starts: once).

    python3 bench/fresh_starts.py --site-dir /tmp/site --models dense --rounds 3 \\
        --contenders fast,instanttensor-mmap,instanttensor-buffered --out-dir $OUT/fresh
    python3 bench/fresh_starts.py --device cpu --size cpu --models dense --rounds 2 \\
        --contenders fast,fast-nostream --out-dir /tmp/fresh                    # dry run

``gpu_bench.py`` runs its contenders one after another in one process, so every start but
the first inherits a warm interpreter, allocator and CPU caches from the ones before it, and
where a contender stands in the pass moves its start (seventeenth run, call 3). A server's
start-up load is always the first load of its process. Here each (round, model, contender)
is its own ``gpu_bench.py --phases load --verify none --no-warmup --contenders C`` process
(an empty plan store each: a first start), and each round rotates the contenders' order.

Writes ``fresh_starts.json`` (each process's own JSON inside it, under ``processes``):
per model and round, each contender's start seconds (for ``fast``: plan and read/copy set-up),
its ratio to the best instanttensor start of the same round, and the ceilings each process
measured (page-cache read, pinned host→device copy); a Markdown table on stdout. A process
that fails or leaves no result is listed as such, never dropped.

``--variant NAME=DIR`` (repeatable) runs each ``fast`` contender once per variant, with
``DIR`` first on ``PYTHONPATH`` (another build of this package, unpacked there: it is then
imported instead of the installed one, overlay included), named ``contender@NAME``; so two
versions of the package are compared in one run, round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))


def rotated(items: list, by: int) -> list:
    """``items`` started at index ``by`` (mod its length): round r puts contender r first."""
    k = by % len(items)
    return items[k:] + items[:k]


def child_command(args, model: str, contender: str, out: str) -> List[str]:
    """The ``gpu_bench.py`` command line of one fresh start."""
    cmd = [sys.executable, os.path.join(HERE, "gpu_bench.py"), "--models", model, "--contenders", contender,
           "--phases", "load", "--cache", "warm", "--verify", "none", "--no-warmup", "--out", out,
           "--ceiling-gb", str(args.ceiling_gb), "--read-threads", "16", "--h2d-gib", str(args.h2d_gib),
           "--time-budget-s", str(args.child_budget_s)]
    if args.device:
        cmd += ["--device", args.device]
    if args.size:
        cmd += ["--size", args.size]
    if args.site_dir:
        cmd += ["--site-dir", args.site_dir]
    if model == "moe" and args.moe_layers:
        cmd += ["--moe-layers", str(args.moe_layers)]
    return cmd


def start_row(path: str, model: str, contender: str) -> Dict:
    """What one child measured: its start and the ceilings of its process (or why none)."""
    try:
        with open(path) as f:
            data = json.load(f)
        entry = data["models"][model]
        step = next(s for s in entry["contenders"][contender]["steps"] if s["phase"] == "load")
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        return {"ok": False, "why": f"no result in {os.path.basename(path)}: {type(exc).__name__}: {exc}"}
    row = {"ok": bool(step.get("ok")), "seconds": step.get("seconds"),
           "ceiling_warm_gbps": entry.get("ceiling_gbps", {}).get("warm"),
           "h2d_gbps": (data.get("h2d") or {}).get("gbps")}
    summary = step.get("fast_summary") or {}
    if summary:
        row.update(plan_s=summary.get("plan_seconds"), plan_source=summary.get("plan_source"),
                   setup_s=(summary.get("copy_phases") or {}).get("setup"),
                   validate_s=summary.get("validate_seconds"))
    if not row["ok"]:
        row["why"] = step.get("error") or "the load failed"
    return row


def _package_of(path: str) -> Optional[str]:
    """Where the child imported this package from (its hook's record), to prove a variant ran."""
    try:
        with open(path) as f:
            software = json.load(f).get("software") or {}
    except (OSError, ValueError):
        return None
    return software.get("sglang_fastload_file") or software.get("sglang_fastload")


def save(result: Dict, out_dir: str, round_so_far: Optional[Dict] = None, model: str = "") -> None:
    """Write ``fresh_starts.json`` (after every process, so a run cut short keeps its starts;
    ``round_so_far``: the starts of ``model``'s unfinished round, written as its last)."""
    data = result
    if round_so_far:
        data = json.loads(json.dumps(result))  # the round in progress, without changing the result
        data["models"][model]["rounds"].append(round_so_far)
    with open(os.path.join(out_dir, "fresh_starts.json"), "w") as f:
        json.dump(data, f, indent=1)


def with_ratios(rounds: List[Dict[str, Dict]]) -> None:
    """Each start's ratio to the best instanttensor start of its round (where one ran)."""
    for starts in rounds:
        peers = [r["seconds"] for c, r in starts.items() if c.startswith("instanttensor") and r.get("ok")]
        best = min(peers) if peers else None
        for row in starts.values():
            if best and row.get("ok"):
                row["vs_instanttensor_best"] = round(row["seconds"] / best, 3)


def table(model: str, contenders: List[str], rounds: List[Dict[str, Dict]]) -> str:
    """Markdown: a row per contender, a column per round, and the median."""
    lines = [f"{model}: first start of a fresh process, seconds (fast: plan, set-up; x the best instanttensor "
             "start of the round)", "| contender | " + " | ".join(f"round {i + 1}" for i in range(len(rounds)))
             + " | median |", "|---" * (len(rounds) + 2) + "|"]
    for c in contenders:
        cells, values = [], []
        for starts in rounds:
            row = starts.get(c, {})
            if not row.get("ok"):
                cells.append("failed" if row else "not run")
                continue
            values.append(row["seconds"])
            cell = f"{row['seconds']:.3f}"
            if row.get("plan_s") is not None:
                cell += f" ({row['plan_s']:.3f}, {row.get('setup_s') or 0:.3f})"
            if "vs_instanttensor_best" in row:
                cell += f" {row['vs_instanttensor_best']:.2f}x"
            cells.append(cell)
        median = f"{statistics.median(values):.3f}" if values else "-"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {median} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dense", help="comma-separated: dense,moe")
    p.add_argument("--contenders", default="fast,instanttensor-mmap,instanttensor-buffered")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--moe-layers", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--size", default=None, help="gpu_bench.py's --size (cpu, tiny: dry runs)")
    p.add_argument("--site-dir", default=None)
    p.add_argument("--ceiling-gb", type=float, default=4.0, help="each process's page-cache ceiling read")
    p.add_argument("--h2d-gib", type=float, default=1.0)
    p.add_argument("--child-budget-s", type=float, default=120.0)
    p.add_argument("--time-budget-s", type=float, default=540.0, help="no new process after this")
    p.add_argument("--out-dir", default=os.path.join(os.environ.get("OUT") or os.getcwd(), "fresh_starts"))
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                   help="run each fast contender with DIR first on PYTHONPATH too, as contender@NAME")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    variants = dict(v.split("=", 1) for v in args.variant)
    contenders = []  # (label, gpu_bench contender, directory first on PYTHONPATH or None)
    for c in (c for c in args.contenders.split(",") if c):
        if variants and c.startswith("fast"):
            contenders += [(f"{c}@{name}", c, directory) for name, directory in variants.items()]
        else:
            contenders.append((c, c, None))
    labels = [label for label, _, _ in contenders]
    os.makedirs(args.out_dir, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_FASTLOAD_PLAN_DIR"}  # each child: an empty store
    began = time.monotonic()
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "models": {}, "skipped": [],
              "processes": {}}
    children = tempfile.mkdtemp(prefix="fresh-starts-")  # the processes' own files, folded into the result
    for model in models:
        result["models"][model] = {"rounds": []}
    for r in range(args.rounds):
        for model in models:
            starts: Dict[str, Dict] = {}
            for name, contender, directory in rotated(contenders, r):
                if time.monotonic() - began > args.time_budget_s:
                    result["skipped"].append(f"{model} round {r + 1} {name}: time budget")
                    continue
                label = f"{model}-r{r + 1}-{name}"
                out = os.path.join(children, label + ".json")
                child_env = dict(env)
                if directory:
                    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (directory, env.get("PYTHONPATH")) if p)
                t0 = time.monotonic()
                done = subprocess.run(child_command(args, model, contender, out), env=child_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                row = start_row(out, model, contender)
                row["package"] = _package_of(out)
                row.update(order=len(starts) + 1, process_s=round(time.monotonic() - t0, 1), rc=done.returncode)
                if done.returncode != 0:
                    row["ok"] = False
                    row["output_tail"] = done.stdout[-2000:]
                starts[name] = row
                try:
                    with open(out) as f:
                        result["processes"][label] = json.load(f)
                except (OSError, ValueError):
                    result["processes"][label] = None
                print(f"[{time.monotonic() - began:6.0f}s] {model} round {r + 1} {name}: "
                      f"{row.get('seconds')} s ok={row['ok']} (process {row['process_s']} s)", flush=True)
                save(result, args.out_dir, starts, model)
            result["models"][model]["rounds"].append(starts)
    for model in models:
        with_ratios(result["models"][model]["rounds"])
    save(result, args.out_dir)
    for model in models:
        print(table(model, labels, result["models"][model]["rounds"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
