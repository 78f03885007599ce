"""Time binding a plan as a CUDA reader does (the set-up part of a start-up load), on CPU.

    .venv/bin/python bench/bind_bench.py [--layers 16 --experts 128 --repeats 5 --profile] [--ref REF | --ref-dir DIR]
    .venv/bin/python bench/bind_bench.py --model dense [--repeats 11 --ref REF] [--first-start]

Loads the CPU Qwen3-MoE checkpoint of ``bench/cpu_bench.py`` once with ``fast`` (16 layers x
128 experts: 6,291 tensors, like the 16-layer GPU benchmark), takes its plan, then binds it
``--repeats`` times with readers set up as on CUDA: staged steps, copies planned as device
addresses. The device copy is never called, so this is only the Python work of binding,
which a start-up (and a restart with a stored plan) pays once per model. With ``--ref`` (a
git ref) or ``--ref-dir`` (that version's files), ``loader/binding.py`` as it was there is
timed too, alternated with this tree's in one process. ``--model dense``: the CPU benchmarks'
Qwen3 instead (0.49 GB, 12 layers: ~2,400 chunks of 0.2 MiB of one or two steps each, as
Qwen3-8B's 16.4 GB in 6 MiB chunks on the GPU).
"""

from __future__ import annotations

import cProfile
import dataclasses
import itertools
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from bench import synthetic_checkpoints as sc  # noqa: E402
from bench.plan_pieces_ab import build_plan_arguments, ref_module  # noqa: E402
from bench.plan_store_bench import cpu_moe_checkpoint, moe_arguments  # noqa: E402


class AddressOnlyRuntime:
    """Stands in for the CUDA runtime at binding time: binding reads no runtime state, it only
    records addresses, so nothing here is ever called."""

    def __init__(self):
        self.events = itertools.count(1)

    def new_event(self, blocking=False):
        return next(self.events)


class IdleStream:
    """Stands in for a reader's CUDA stream: nothing is ever queued on it."""

    def synchronize(self):
        pass


def main(argv=None) -> int:
    p = moe_arguments(__doc__)
    p.set_defaults(layers=16, repeats=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--model", choices=("moe", "dense"), default="moe")
    # The CPU checkpoint's tensors are ~50 x smaller than the GPU one's: 0.2 MiB chunks give
    # about as many steps per chunk as 6 MiB chunks on the 16-layer GPU checkpoint.
    p.add_argument("--chunk-mib", type=float, default=0.2)
    p.add_argument("--with-build", action="store_true",
                   help="time build_plan on the load's recorded copies too (a first start's cutting before it binds)")
    p.add_argument("--first-start", action="store_true",
                   help="also time a first start's plan and binding both ways, alternated: steps cut when the "
                        "plan is built then bound chunk by chunk, against steps left whole and large straight "
                        "steps bound as pieces (binding.staged_items, what the loader does)")
    p.add_argument("--streamed-build", action="store_true",
                   help="also time build_plan as a streamed first start calls it (steps left whole: cut=False)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref", help="git ref of a binding.py to compare with")
    ref.add_argument("--ref-dir", help="directory holding that version's files, as in the repository")
    args = p.parse_args(argv)
    os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "0"
    info = cpu_moe_checkpoint(args)  # also sets up logging and SGLang
    if args.model == "dense":
        info = sc.write_checkpoint(os.path.join(args.workdir, "dense-cpu"), sc.dense_spec("cpu"),
                                   shard_bytes=int(0.5 * gb.GB), log=gb.log)
    session = gb.Session("cpu")
    chunk = int(args.chunk_mib * (1 << 20))
    # The plan is built for the chunk size it is bound with, as the loader does.
    contender = dataclasses.replace(gb.CONTENDERS["fast"], extra={"chunk_mb": args.chunk_mib})
    _, model_config, load_config = session.configure(info.directory, contender)
    from sglang_fastload.loader import plan as plan_module

    with build_plan_arguments() as recorded:
        model, _ = session.load(model_config, load_config)

    import torch

    from sglang_fastload.loader import binding, staging
    from sglang_fastload.loader.checkpoint_state import state_of

    plan = next(reversed(state_of(model).plans.values()))
    params = {n: t.data for n, t in model.named_parameters(remove_duplicate=False)}
    chunks = binding.chunks_of(plan, chunk)
    workers = []
    for _ in range(16):
        w = staging.Worker(torch.device("cpu"), chunk)
        w.cuda = True  # bind as a CUDA reader does
        w.runtime = AddressOnlyRuntime()
        w.stream = IdleStream()
        workers.append(w)
    staging.reserve(workers, [(chunk, chunk)] * len(workers))

    def bind_all(module=binding, plans=plan_module):
        built = plan
        tb = time.perf_counter()
        if args.with_build:
            a, kw = recorded["args"]
            built = plans.build_plan(*a, **kw)
        t0 = time.perf_counter()
        times["build"].append(t0 - tb)
        n = module.chunks_of(built, chunk)
        t1 = time.perf_counter()
        for c in n:  # the buffer sizes ``bind`` reserves before binding
            module.staged_size(c, True, params)
        t2 = time.perf_counter()
        for i, c in enumerate(n):
            module.bind_chunk(c, 0, params, workers[i % 16], (i // 16) % 2)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    versions = {"tree": (binding, plan_module)}
    if args.ref or args.ref_dir:
        versions[args.ref or os.path.basename(os.path.normpath(args.ref_dir))] = (
            ref_module(args, "sglang_fastload/loader/binding.py", "binding_at_ref"),
            ref_module(args, "sglang_fastload/loader/plan.py", "plan_at_ref") if args.with_build else plan_module)
    times = {label: [] for label in versions}
    builds = {label: [] for label in versions}
    for _ in range(args.repeats):
        for label, (module, plans) in versions.items():
            times["build"] = builds[label]
            times[label].append(bind_all(module, plans))
    times.pop("build")
    lone = sum(1 for c in chunks if len(c.steps) == 1)
    print(f"{plan_tensors(plan)} steps, {len(chunks)} chunks of {args.chunk_mib:g} MiB ({lone} of one step); {args.repeats} repeats"
          + (", alternated" if len(versions) > 1 else ""))
    for label, ts in times.items():
        bind_ms = statistics.median(b for _, _, b in ts) * 1e3
        total_ms = statistics.median(sum(t) for t in ts) * 1e3
        print(f"{label:12s} chunks: median {statistics.median(t for t, _, _ in ts) * 1e3:.1f} ms; "
              f"sizes: median {statistics.median(z for _, z, _ in ts) * 1e3:.1f} ms; "
              f"bind: median {bind_ms:.1f} ms ({bind_ms / len(chunks) * 1e3:.1f} us per chunk); "
              f"all three: median {total_ms:.1f} ms"
              + (f"; build_plan: median {statistics.median(builds[label]) * 1e3:.1f} ms" if args.with_build else ""))
    if args.streamed_build:
        a, kw = recorded["args"]
        cut, whole = [], []
        for _ in range(args.repeats):
            for label, out, flag in (("cut", cut, True), ("whole", whole, False)):
                t0 = time.perf_counter()
                plan_module.build_plan(*a, **dict(kw, cut=flag))
                out.append(time.perf_counter() - t0)
        print(f"build_plan, this tree, alternated: cut into chunks (unstreamed start) median "
              f"{statistics.median(cut) * 1e3:.1f} ms; steps left whole (streamed start) median "
              f"{statistics.median(whole) * 1e3:.1f} ms")
    if args.first_start:
        first_start_ab(args, recorded["args"], plan_module, binding, params, workers, chunk)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        times["build"] = []
        bind_all()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


def first_start_ab(args, build_args, plan_module, binding, params, workers, chunk) -> None:
    """Print a first start's ``build_plan`` and binding (chunks, sizes, bound chunks) both ways."""
    a, kw = build_args

    def cut_then_bound():
        plan = plan_module.build_plan(*a, **dict(kw, cut=True))
        items = binding.chunks_of(plan, chunk)
        return plan, items, binding.bind_chunk

    def whole_then_pieces():
        plan = plan_module.build_plan(*a, **dict(kw, cut=False))
        items = binding.staged_items(plan, chunk, params)
        return plan, items, binding.bind_staged

    ways = {"cut at build, chunk by chunk": cut_then_bound, "whole steps, pieces": whole_then_pieces}
    times = {label: [] for label in ways}
    counts = {}
    for _ in range(args.repeats):
        for label, way in ways.items():
            t0 = time.perf_counter()
            _, items, bind = way()
            for c in items:
                binding.staged_size(c, True, params)
            for i, c in enumerate(items):
                bind(c, 0, params, workers[i % 16], (i // 16) % 2)
            times[label].append(time.perf_counter() - t0)
            counts[label] = len(items)
    for label, ts in times.items():
        print(f"first start, {label}: plan and binding median {statistics.median(ts) * 1e3:.2f} ms "
              f"({counts[label]} chunks)")


def plan_tensors(plan) -> int:
    return sum(len(f.steps) for f in plan.files)


if __name__ == "__main__":
    sys.exit(main())
