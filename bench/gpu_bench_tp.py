"""Tensor-parallel weight-update benchmark: one process per rank, same run.

    python3 bench/gpu_bench_tp.py --nproc 2 --site-dir /tmp/site --out $OUT/tp.json
    python3 bench/gpu_bench_tp.py --shared-gpu --tp 1,2,4 --site-dir /tmp/site --out $OUT/tp.json
    python3 bench/gpu_bench_tp.py --shared-gpu --tp 2,4,8 --ep tp --site-dir /tmp/site --out $OUT/ep.json

``--shared-gpu``: all ranks on GPU 0 (groups over gloo, no PyNccl: NCCL refuses two ranks on
one GPU and loading needs no device collectives), a proxy for a multi-GPU node where the
host side (page cache, memory bandwidth, reader threads of N ranks at once) is real and the
one PCIe link is shared (host-to-device copies pessimistic). ``--tp 1,2,4`` runs one rank
group per size in turn and adds per-node sums and the expected time of the full
Qwen3-30B-A3B (``--paper-gb``) at the largest size. ``--ep tp``: expert parallelism as wide as
each group's tensor parallelism (SGLang's ``--ep-size``), so each rank loads its own experts
whole instead of a 1/TP slice of every expert.

Per rank, on one synthetic Qwen3-30B-A3B-shaped checkpoint (``--model dense``: Qwen3-8B's
shapes), written once by rank 0:
upstream ``auto`` and ``fast`` — initial load, ``--updates`` warm updates (two unless told) and a cold update through
SGLang's real ``WeightUpdater`` — seconds per rank, bytes read per rank, and a bit-exact
check of ``fast`` against ``auto`` on every rank. Rank 0 also measures the host's raw
page-cache read ceiling (16 threads) in the same run; on CUDA, every rank group also measures
the link its ranks share (``shared_link_ceiling``, after the contenders). Reuses ``gpu_bench.py``'s pieces.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import gpu_bench as gb  # noqa: E402

GB = 10**9


# --alternate: the environment variable it flips and its two values (odd updates, even updates).
ALTERNATIONS = {
    "steal": ("SGLANG_FASTLOAD_STEAL_CHUNKS", ("1", "0"), "steal{}"),
    "deal": ("SGLANG_FASTLOAD_DEAL_CHUNKS", ("runs", "round-robin"), "deal-{}"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nproc", type=int, default=2, help="tensor-parallel size (one process per rank)")
    p.add_argument("--tp", default=None, help="comma-separated sizes, one rank group each (overrides --nproc)")
    p.add_argument("--shared-gpu", action="store_true", help="every rank on GPU 0 (gloo groups)")
    p.add_argument("--paper-gb", type=float, default=61.07, help="checkpoint of the case on paper (full Qwen3-30B-A3B)")
    p.add_argument("--site-dir", default=None)
    p.add_argument("--model", choices=("moe", "dense"), default="moe",
                   help="moe: Qwen3-30B-A3B shapes (--moe-layers of 48); dense: Qwen3-8B shapes")
    p.add_argument("--moe-layers", type=int, default=16)
    p.add_argument("--size", choices=("full", "tiny", "cpu"), default="full",
                   help="cpu: bench/cpu_bench.py's shapes (MoE: --moe-layers of 48), 0.5 GB shards")
    p.add_argument("--workdir", default="/var/tmp/sglang-fastload-bench-tp")
    p.add_argument("--contenders", type=lambda s: s.split(","), default=["auto", "fast"])
    p.add_argument("--updates", type=int, default=2, help="warm updates per contender (update1, update2, ...)")
    p.add_argument("--alternate", choices=sorted(ALTERNATIONS), default=None,
                   help="updates alternate a loader switch (A/B on one model): steal: taking chunks 1 / 0 "
                        "(phases updateN-steal1/0); deal: chunks dealt in runs / round-robin (updateN-deal-runs/-round-robin)")
    p.add_argument("--alternate-steal", dest="alternate", action="store_const", const="steal", help="= --alternate steal")
    p.add_argument("--cold", dest="cold_updates", action="store_const", const=1, default=0,
                   help="also one cold update per contender (after the warm ones)")
    p.add_argument("--cold-updates", type=int, help="this many cold updates per contender (alternated too with --alternate)")
    p.add_argument("--restart", action="store_true",
                   help="after the updates, free the model and load a new one (fast: from the plan store)")
    p.add_argument("--profile-load", action="store_true",
                   help="profile each fast start-up load's calling thread on every rank (cProfile): where the plan's time goes")
    p.add_argument("--ep", default="1",
                   help="expert-parallel size (SGLang's --ep-size) of every rank group: a number, or 'tp' for the group's "
                        "tensor-parallel size (each rank then holds 1/TP of the experts, whole)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: dry run over gloo")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_bench_tp.json"))
    return p.parse_args(argv)


def launch(nproc: int, argv=None) -> int:
    """Start one process per rank (RANK/WORLD_SIZE/MASTER_PORT set) and wait for all."""
    import subprocess

    port = gb._free_port()
    argv = list(sys.argv if argv is None else argv)
    procs = [
        subprocess.Popen([sys.executable, *argv], env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(nproc), MASTER_PORT=str(port)))
        for r in range(nproc)
    ]
    codes = [p.wait() for p in procs]
    return max(codes)


def node_rows(data: dict) -> list:
    """Per contender and phase: the slowest rank's seconds and the bytes all ranks read."""
    out = []
    for key in [(r["contender"], r["phase"], r["cache"]) for r in data["ranks"][0]["rows"]]:
        rows = [next(x for x in g["rows"] if (x["contender"], x["phase"], x["cache"]) == key) for g in data["ranks"]]
        seconds = max(r["seconds"] for r in rows)
        node_bytes = sum(r["bytes_read"] for r in rows)
        ckpt = data["checkpoint"].get("bytes") or data["checkpoint"]["gb"] * GB
        link = data.get("ceiling_shared_link") or {}
        out.append(dict(contender=key[0], phase=key[1], cache=key[2], tp=data["world"], ep=data.get("ep", 1), seconds=seconds,
                        link_gbps=link.get("node_gbps"),
                        rank_seconds=[r["seconds"] for r in rows], rank_bytes=[r["bytes_read"] for r in rows],
                        node_bytes=node_bytes, node_x_checkpoint=round(node_bytes / ckpt, 4),
                        node_gbps=round(node_bytes / seconds / GB, 2)))
    return out


def shared_link_ceiling(total_bytes: int, world: int, repeats: int = 3) -> dict:
    """The link every rank's process shares, at full speed: all ranks at once copy their
    share of ``total_bytes`` (at most 2 GB each) from pinned host memory to the device.

    On the shared-GPU proxy the ranks' processes take turns on the one GPU, so N ranks may
    move fewer bytes per second than one process: a TP=N update cannot beat this rate.

    Returns:
        Bytes per rank, the slowest rank's seconds of the best repeat, and the node's GB/s.
    """
    import torch

    n = min(total_bytes // world, 2 * GB)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # first touch of both out of the timing
    torch.cuda.synchronize()
    on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # where the group reduces
    best = None
    for _ in range(repeats):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        mine = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=on)
        torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
        best = mine.item() if best is None else min(best, mine.item())
    del host, dev
    return dict(bytes_per_rank=n, ranks=world, seconds=round(best, 4), node_gbps=round(n * world / best / GB, 2))


def run_sizes(args) -> int:
    """One rank group per TP size, then a combined JSON and table (per rank and per node)."""
    sizes = [int(x) for x in args.tp.split(",") if x]
    base = [a for a in sys.argv if not a.startswith("--tp")]
    if "--tp" in sys.argv:  # "--tp 1,2,4" as two words
        i = sys.argv.index("--tp")
        base = sys.argv[:i] + sys.argv[i + 2:]
    runs, rc = [], 0
    for n in sizes:
        out = f"{os.path.splitext(args.out)[0]}-tp{n}.json"
        code = launch(n, base + ["--nproc", str(n), "--out", out])
        rc = max(rc, code)
        if os.path.exists(out):
            with open(out) as f:
                runs.append(json.load(f))
    table = [row for data in runs for row in node_rows(data)]
    paper = None
    fast_warm = [r for r in table if r["contender"] == "fast" and r["phase"].startswith("update") and r["cache"] == "warm"]
    if fast_warm and args.model == "moe":
        top_tp = max(r["tp"] for r in fast_warm)
        updates = sorted((r for r in fast_warm if r["tp"] == top_tp), key=lambda r: r["node_gbps"])
        top = updates[len(updates) // 2]  # the median warm update (the upper one of an even count)
        # The full model reads the same bytes per node (x checkpoint) at the same per-node rate.
        node_gb = args.paper_gb * top["node_x_checkpoint"]
        paper = dict(tp=top["tp"], checkpoint_gb=args.paper_gb, node_x_checkpoint=top["node_x_checkpoint"],
                     node_gb=round(node_gb, 2), node_gbps=top["node_gbps"], of_updates=len(updates),
                     expected_update_s=round(node_gb / top["node_gbps"], 3),
                     arithmetic=f"{args.paper_gb} GB x {top['node_x_checkpoint']} / {top['node_gbps']} GB/s (median of {len(updates)} warm updates)")
    combined = dict(command=" ".join(["python3"] + sys.argv), shared_gpu=args.shared_gpu, runs=runs, node=table, paper=paper)
    with open(args.out, "w") as f:
        json.dump(combined, f, indent=1, default=str)
    print("| TP | EP | contender | phase | cache | slowest rank s | per-rank s | node GB read | x checkpoint | node GB/s | shared link GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['tp']} | {r['ep']} | {r['contender']} | {r['phase']} | {r['cache']} | {r['seconds']:.3f} | "
              f"{' / '.join(f'{x:.2f}' for x in r['rank_seconds'])} | {r['node_bytes'] / GB:.2f} | "
              f"{r['node_x_checkpoint']:.3f} | {r['node_gbps']:.1f} | {r['link_gbps'] or '—'} |")
    if paper:
        print(f"on paper: {paper}")
    return rc


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        # Rank processes inherit an empty plan store (one directory per contender below it):
        # start-up loads are first starts.
        os.environ.setdefault("SGLANG_FASTLOAD_PLAN_DIR", tempfile.mkdtemp(prefix="gpu-bench-tp-plans-"))
        if args.tp:
            return run_sizes(args)
        return launch(args.nproc)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    gb.activate_site(args.site_dir)
    import torch

    import synthetic_checkpoints as sc

    if args.device == "cuda":
        import import_standins_for_bench

        import_standins_for_bench.activate()
    spec = sc.dense_spec(args.size) if args.model == "dense" else sc.moe_spec(args.size, layers=args.moe_layers)
    shard_bytes = {"full": 5 * GB, "tiny": 10**6, "cpu": GB // 2}[args.size]
    directory = os.path.join(args.workdir, args.model)
    ready = os.path.join(args.workdir, f"ready-{os.environ.get('MASTER_PORT', '0')}")
    ceiling = None
    if rank == 0:
        try:
            os.makedirs(directory, exist_ok=True)
            info = sc.write_checkpoint(directory, spec, shard_bytes=shard_bytes, log=gb.log)
            ceiling = gb.raw_read(info.files, 16)
        except BaseException as exc:
            with open(ready, "w") as f:  # the other ranks stop instead of waiting for ever
                f.write(f"failed: {type(exc).__name__}: {exc}")
            raise
        open(ready, "w").close()
    else:
        while not os.path.exists(ready):
            time.sleep(0.2)
        time.sleep(0.1)  # a failure note is written right after the file appears
        with open(ready) as f:
            note = f.read()
        if note:
            raise SystemExit(f"rank {rank}: rank 0 could not write the checkpoint ({note})")
        info = sc.write_checkpoint(directory, spec, shard_bytes=shard_bytes, log=lambda *_: None)
    ep = world if args.ep == "tp" else int(args.ep)
    session = gb.Session(args.device, rank=rank, world=world, shared_gpu=args.shared_gpu, ep=ep)
    summaries = gb.FastSummaries()
    rows, models, profiles, collectors = [], {}, {}, {}
    plan_base = os.environ["SGLANG_FASTLOAD_PLAN_DIR"]
    for name in args.contenders:
        cont = gb.CONTENDERS[name]
        gb.as_first_start(cont, plan_base)

        def start(phase: str):
            """Build and load a model (all ranks together); its updater, and the phase row."""
            _, model_config, load_config = session.configure(info.directory, cont)
            torch.distributed.barrier()
            n = len(summaries.items)
            profiler = cProfile.Profile() if args.profile_load and cont.load_format == "fast" else None
            if profiler is not None:
                profiler.enable()
            with gb.CollectorClock() as collector:
                model, t = session.load(model_config, load_config)
            collectors[(name, phase)] = collector.summary(t["window"])  # the load, not the model's build
            if profiler is not None:
                profiler.disable()
                profiles[(name, phase)] = gb.top_functions(profiler)
            updater, runner = session.updater(model, model_config, load_config)
            return updater, runner, (phase, "warm", t["load_s"], summaries.items[-1] if len(summaries.items) > n else None)

        with gb.upstream_expert_scan(cont.upstream_scan, {}), gb.environment_of(cont):
            updater, runner, row = start("load")
            phases = [row]
            warm = [(f"update{i}", "warm") for i in range(1, args.updates + 1)]
            cold = [(f"update{args.updates + i}", "cold") for i in range(1, (args.cold_updates or 0) + 1)]
            for phase, cache in warm + cold:
                if cache == "cold" and rank == 0:
                    gb.drop_page_cache(info.files)
                torch.distributed.barrier()
                n = len(summaries.items)
                if args.alternate:
                    variable, values, label = ALTERNATIONS[args.alternate]
                    value = values[0] if int(phase[len("update"):]) % 2 else values[1]
                    os.environ[variable] = value
                    phase = f"{phase}-{label.format(value)}"
                with gb.CollectorClock() as collector:
                    t0 = time.perf_counter()
                    ok, message = updater.update_weights_from_disk(info.directory, cont.load_format)
                    gb.sync(args.device)
                    seconds = time.perf_counter() - t0
                collectors[(name, phase)] = collector.summary()
                assert ok, message
                fs = summaries.items[-1] if len(summaries.items) > n else None
                phases.append((phase, cache, seconds, fs))
            if args.restart:  # a server restart: the plan comes from the store, not from memory
                del updater, runner
                gb.free_memory(args.device)
                if cont.load_format == "fast":
                    gb.forget_process_memos()  # a new server process has none
                updater, runner, row = start("restart")
                phases.append(row)
        for phase, cache, seconds, fs in phases:
            bytes_read = fs["bytes_read"] if fs else info.nbytes  # upstream maps and iterates every file
            rows.append(dict(rank=rank, contender=name, phase=phase, cache=cache, seconds=round(seconds, 4),
                             bytes_read=bytes_read, gbps_of_checkpoint=round(info.nbytes / seconds / GB, 2),
                             fast_summary=fs, profile=profiles.get((name, phase)), gc=collectors.get((name, phase))))
        models[name] = runner.model
    # After the contenders: their first ``configure`` made the process group this needs.
    link = shared_link_ceiling(info.nbytes, world) if args.device == "cuda" else None
    # Every other contender against upstream's load of the same checkpoint, parameter by parameter.
    verdict = {name: gb.compare_models(models["auto"], m) for name, m in models.items() if name != "auto"} if "auto" in models else None
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, dict(rows=rows, verdict=verdict))
    if rank == 0:
        data = dict(
            date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=" ".join(["python3"] + sys.argv),
            world=world, ep=ep, shared_gpu=args.shared_gpu, gpu=torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", checkpoint=dict(model=spec.label, layers=spec.layers, gb=round(info.nbytes / GB, 3), bytes=info.nbytes, tensors=info.tensors, files=len(info.files)),
            ceiling_page_cache_16_threads=ceiling, ceiling_shared_link=link, ranks=gathered,
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1, default=str)
        print(f"TP={world}, EP={ep}, {data['gpu']}, checkpoint {data['checkpoint']}, page-cache ceiling {ceiling and ceiling.get('gbps')} GB/s, "
              f"shared link {link}")
        print("| contender | phase | cache | " + " | ".join(f"rank {r} s | rank {r} GB read" for r in range(world)) + " |")
        print("|---|---|---|" + "---|---|" * world)
        keys = [(r["contender"], r["phase"], r["cache"]) for r in gathered[0]["rows"]]
        for key in keys:
            cells = []
            for g in gathered:
                r = next(x for x in g["rows"] if (x["contender"], x["phase"], x["cache"]) == key)
                cells += [f"{r['seconds']:.3f}", f"{r['bytes_read'] / GB:.2f}"]
            print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
        for r, g in enumerate(gathered):
            print(f"rank {r}: against auto: {g['verdict']}")
        for r, g in enumerate(gathered):
            spent = ", ".join(f"{x['contender']} {x['phase']} {x['gc']['seconds']:.3f} s ({x['gc']['collections'][2]} full)"
                              for x in g["rows"] if x.get("gc"))
            print(f"rank {r}: garbage collector: {spent}")
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
