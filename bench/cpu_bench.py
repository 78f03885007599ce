"""Upstream ``auto`` vs ``fast``, side by side in one process, on a synthetic Qwen3-MoE checkpoint (CPU).

    .venv/bin/python bench/cpu_bench.py                 # 48 layers x 128 experts, ~2 GB
    .venv/bin/python bench/cpu_bench.py --rounds 5 --layers 6 --contenders auto,auto1,fast

Builds SGLang's real ``Qwen3MoeForCausalLM`` on the CPU (one-rank gloo world, as the
scheduler does) and loads it, a fresh model per contender and round (``--load-rounds``,
interleaved), then updates the last model of each from disk through SGLang's real
``WeightUpdater.update_weights_from_disk`` in interleaved rounds (auto, fast, auto, fast,
...), so both see the same machine state; reports medians with their spread. Also
measures the page-cache read ceiling on the same files, and checks that ``fast``'s
parameters are bit-identical to ``auto``'s (poisoned before the last update, so the
check also proves every element was written).

The checkpoint has Qwen3-30B-A3B's structure and tensor count (48 layers of 128 experts,
top-8, 32 query / 4 KV heads, untied embeddings: 18,867 tensors) with smaller matrices
(hidden 384, expert intermediate 128), so it fits in 2 GB. ``auto`` scans the expert mappings as sglang 0.5.23
does (see ``gpu_bench.upstream_expert_scan``). Built from bench/gpu_bench.py's pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import gpu_bench as gb  # noqa: E402
import synthetic_checkpoints as sc  # noqa: E402


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="interleaved update rounds")
    p.add_argument("--load-rounds", type=int, default=2, help="interleaved initial loads (a fresh model each)")
    p.add_argument("--contenders", default="auto,fast", help="of " + ",".join(gb.CONTENDERS))
    p.add_argument("--workdir", default="/var/tmp/sglang-fastload-bench-cpu")
    p.add_argument("--shard-gb", type=float, default=0.5)
    p.add_argument("--out", default=None, help="JSON results (default: none)")
    args = p.parse_args(argv)
    contenders = [c for c in args.contenders.split(",") if c]
    if gb.REFERENCE not in contenders:
        p.error("the contenders must include auto (the reference)")
    contenders = [gb.REFERENCE] + [c for c in contenders if c != gb.REFERENCE]

    import logging

    logging.basicConfig(level=logging.ERROR, stream=sys.stdout, force=True)
    gb.activate_site(None)
    spec = sc.moe_spec("cpu", layers=args.layers)
    spec.cfg["num_experts"] = args.experts
    spec.label = f"Qwen3-MoE shape, {args.experts} experts, {args.layers} layers"
    gb.log(f"load average at start: {loadavg()} ({os.cpu_count()} CPUs)")
    info = sc.write_checkpoint(os.path.join(args.workdir, f"moe-{args.experts}x{args.layers}"), spec,
                               shard_bytes=int(args.shard_gb * gb.GB), log=gb.log)
    paths, nbytes = info.files, info.nbytes
    gb.raw_read(paths, 2)  # prewarm
    ceiling = {f"{n}x{c}MiB": gb.raw_read(paths, n, chunk=c << 20) for c in (64, 1) for n in (1, 2, 8)}
    best_read = max(r["gbps"] for r in ceiling.values())
    gb.log("page-cache read: " + ", ".join(f"{k} {r['gbps']:.2f} GB/s" for k, r in ceiling.items()))

    session = gb.Session("cpu")
    gb.log(f"SGLang imported in {session.import_s:.1f} s; overlay {gb.overlay_state().get('active')}")

    class _Args:
        workdir = args.workdir
        device = "cpu"

    _Args.contenders = contenders
    gb.warmup("moe", _Args, session)
    summaries = gb.FastSummaries()

    updaters, runners = {}, {}
    times = {c: {"load": [], "update": []} for c in contenders}
    fast_updates = {c: [] for c in contenders}
    fast_loads = {c: [] for c in contenders}
    counter = {}
    for r in range(args.load_rounds):
        for c in contenders:
            cont = gb.CONTENDERS[c]
            updaters.pop(c, None), runners.pop(c, None)
            gb.free_memory("cpu")  # the previous model of this contender goes first
            n = len(summaries.items)
            with gb.upstream_expert_scan(cont.upstream_scan, counter):
                _, model_config, load_config = session.configure(info.directory, cont)
                model, t = session.load(model_config, load_config)
            times[c]["load"].append(t["load_s"])
            if len(summaries.items) > n:
                fast_loads[c].append(summaries.items[-1])
            updaters[c], runners[c] = session.updater(model, model_config, load_config)
            del model
            gb.log(f"load round {r + 1}: {c} initial load {t['load_s']:.2f} s (build {t['build_s']:.2f} s)")
    for r in range(args.rounds):
        for c in contenders:
            cont = gb.CONTENDERS[c]
            if r == args.rounds - 1 and c != gb.REFERENCE:
                gb.poison(runners[c].model)
            n = len(summaries.items)
            with gb.upstream_expert_scan(cont.upstream_scan, counter):
                t0 = time.perf_counter()
                ok, msg = updaters[c].update_weights_from_disk(info.directory, cont.load_format)
                dt = time.perf_counter() - t0
            if not ok:
                raise SystemExit(f"{c} update failed: {msg}")
            times[c]["update"].append(dt)
            if len(summaries.items) > n:
                fast_updates[c].append(summaries.items[-1])
            gb.log(f"round {r + 1}: {c} update {dt:.3f} s")
    verdicts = {c: gb.compare_models(runners[gb.REFERENCE].model, runners[c].model) for c in contenders[1:]}

    ref_load = statistics.median(times[gb.REFERENCE]["load"])
    ref_upd = statistics.median(times[gb.REFERENCE]["update"])
    rows = []
    print()
    print(f"{spec.label}: {len(paths)} files, {info.tensors} tensors, {nbytes / 1e9:.2f} GB; "
          f"{os.cpu_count()} CPUs, load average now {loadavg()}")
    print("page-cache read ceiling (os.preadv into reused buffers, threads x buffer): "
          + ", ".join(f"{k} {r['gbps']:.2f}" for k, r in ceiling.items()) + f" GB/s; best {best_read:.2f}")
    print()
    print("| contender | initial load s, median of %d (min–max) | GB/s | × auto | update s, median of %d (min–max) | GB/s | × auto | of read ceiling |"
          % (args.load_rounds, args.rounds))
    print("|---|---|---|---|---|---|---|---|")
    for c in contenders:
        load = statistics.median(times[c]["load"])
        upd = statistics.median(times[c]["update"])
        row = {
            "contender": c,
            "load_s": [round(x, 3) for x in times[c]["load"]],
            "load_median_s": round(load, 3),
            "load_gbps": round(nbytes / load / 1e9, 3),
            "load_speedup": round(ref_load / load, 2),
            "update_s": [round(x, 3) for x in times[c]["update"]],
            "update_median_s": round(upd, 3),
            "update_gbps": round(nbytes / upd / 1e9, 3),
            "update_speedup": round(ref_upd / upd, 2),
            "update_fraction_of_ceiling": round(nbytes / upd / 1e9 / best_read, 3),
        }
        if fast_updates[c]:
            last = fast_updates[c][-1]
            row["fast_last_update"] = {k: last[k] for k in ("plan_seconds", "plan_cached", "plan_source", "validate_seconds", "copy_seconds", "bytes_read")}
            row["fast_last_update"]["outside_read_copy_fraction"] = round(1 - last["copy_seconds"] / times[c]["update"][-1], 3)
        if fast_loads[c]:
            f = fast_loads[c][0]
            row["fast_first_load"] = {k: f[k] for k in ("plan_seconds", "plan_cached", "plan_source", "validate_seconds", "copy_seconds")}
        rows.append(row)
        print(f"| {c} | {load:.2f} ({min(times[c]['load']):.2f}–{max(times[c]['load']):.2f}) | {row['load_gbps']:.2f} | {row['load_speedup']:.2f} | "
              f"{upd:.3f} ({min(times[c]['update']):.3f}–{max(times[c]['update']):.3f}) | "
              f"{row['update_gbps']:.2f} | {row['update_speedup']:.2f} | {row['update_fraction_of_ceiling']:.0%} |")
    for row in rows:
        f = row.get("fast_first_load")
        if f:
            print(f"\n{row['contender']}, first initial load: plan {f['plan_seconds']:.3f} s ({f.get('plan_source') or ('cached' if f['plan_cached'] else 'built')}), "
                  f"validate {f['validate_seconds']:.3f} s, read/copy {f['copy_seconds']:.3f} s (into freshly allocated memory)")
        f = row.get("fast_last_update")
        if f:
            print(f"\n{row['contender']}, last update: plan {f['plan_seconds']:.3f} s ({f.get('plan_source') or ('cached' if f['plan_cached'] else 'built')}), "
                  f"validate {f['validate_seconds']:.3f} s, read/copy {f['copy_seconds']:.3f} s; "
                  f"{f['outside_read_copy_fraction']:.0%} of the update outside reads and copies")
    print()
    for c, v in verdicts.items():
        print(f"{c} vs auto: {'bit-identical' if v['equal'] else 'DIFFERENT ' + str(v['diffs'][:3])} "
              f"({v['tensors']} tensors, after a poisoned last update)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "checkpoint": info.as_dict(),
                       "ceiling": ceiling, "rows": rows, "bit_exact": verdicts, "loadavg_end": loadavg()}, f, indent=1)
    sys.stdout.flush()
    os._exit(0 if all(v["equal"] for v in verdicts.values()) else 1)


if __name__ == "__main__":
    sys.exit(main())
