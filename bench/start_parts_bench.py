"""Where a first start's time goes outside its reads, part by part, in a fresh process (GPU or CPU).

    python3 bench/start_parts_bench.py --site-dir /tmp/site --checkpoint /var/tmp/sglang-fastload-bench/dense
    .venv/bin/python bench/start_parts_bench.py --device cpu --checkpoint /var/tmp/sglang-fastload-bench-cpu/dense-cpu

Builds the checkpoint's model (SGLang's real class, as ``gpu_bench.py`` does) and loads it once
with ``fast``, the process's first load, with an empty plan store (a first start), each part of
the load wrapped in a timer (no profiler): the headers, the plan store's key prefix and
listing, the replay of the model's loaders, the plan's cutting (``build_plan``) and coverage
check, the file stamps; in the read/copy set-up, binding (chunk grouping, staged sizes, the
readers' buffers, every chunk's views and addresses) and the opening of the files. Parts
nest (``bind`` holds ``bind_chunk``); ``calls`` says how often each ran. Prints a Markdown
table and the load's own summary (plan, validate, set-up, readers' time); ``--out`` keeps
them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402

# (module, attribute, part name): functions looked up through these module attributes.
PARTS: List[Tuple[str, str, str]] = [
    ("sglang_fastload.loader.fast_model_loader", "read_header", "headers (read_header)"),
    ("sglang_fastload.loader.fast_model_loader", "check_weight_map", "index against headers"),
    ("sglang_fastload.loader.fast_model_loader", "key_start", "plan store: key prefix"),
    ("sglang_fastload.loader.plan_store", "any_stored", "plan store: listing"),
    ("sglang_fastload.loader.fast_model_loader", "stamp_files", "file stamps"),
    ("sglang_fastload.loader.fast_model_loader", "replay_load_weights", "replay of the model's loaders"),
    ("sglang_fastload.loader.fast_model_loader", "parameters_by_name", "parameters by name"),
    ("sglang_fastload.loader.validate", "check_coverage", "coverage check"),
    ("sglang_fastload.loader.fast_model_loader", "build_plan", "build_plan (cutting)"),
    ("sglang_fastload.loader.fast_model_loader", "execute_plan", "execute_plan (set-up, reads, copies)"),
    ("sglang_fastload.loader.executor", "bind", "  bind"),
    ("sglang_fastload.loader.binding", "chunks_of", "    chunks_of"),
    ("sglang_fastload.loader.binding", "wait_prepared", "    wait for the readers' buffers"),
    ("sglang_fastload.loader.binding", "workers_for", "    workers_for"),
    ("sglang_fastload.loader.binding", "staged_size", "    staged_size"),
    ("sglang_fastload.loader.binding", "reserve", "    reserve"),
    ("sglang_fastload.loader.binding", "bind_chunk", "    bind_chunk"),
    ("sglang_fastload.loader.executor", "_check_gather_spans", "  gather spans check"),
    ("sglang_fastload.loader.executor", "reader_pool", "  reader pool"),
]


def install(timer: Dict[str, List[float]]) -> None:
    """Wrap every part of ``PARTS`` (``timer[name] = [seconds, calls]``)."""
    import importlib

    for module_name, attribute, name in PARTS:
        module = importlib.import_module(module_name)
        function = getattr(module, attribute)
        timer[name] = [0.0, 0]

        def timed(*args, _function=function, _slot=timer[name], **kwargs):
            t0 = time.perf_counter()
            try:
                return _function(*args, **kwargs)
            finally:
                _slot[0] += time.perf_counter() - t0
                _slot[1] += 1

        setattr(module, attribute, timed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a gpu_bench.py checkpoint directory")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--site-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ["SGLANG_FASTLOAD_PLAN_DIR"] = tempfile.mkdtemp(prefix="start-parts-plans-")  # a first start
    gb.activate_site(args.site_dir)
    from bench import import_standins_for_bench

    import_standins_for_bench.activate()
    import logging

    logging.basicConfig(level=logging.ERROR, stream=sys.stdout, force=True)
    session = gb.Session(args.device)
    _, model_config, load_config = session.configure(args.checkpoint, gb.CONTENDERS["fast"])
    summaries = gb.FastSummaries()
    timer: Dict[str, List[float]] = {}
    install(timer)
    model, timing = session.load(model_config, load_config)
    summary = summaries.items[-1] if summaries.items else {}
    print(f"{os.cpu_count()} CPUs, device {args.device}, {args.checkpoint}: load {timing['load_s']:.4f} s "
          f"(model build {timing['build_s']:.3f} s)")
    print("| part | calls | ms |\n|---|---|---|")
    for name, (seconds, calls) in timer.items():
        print(f"| {name} | {calls} | {seconds * 1e3:.2f} |")
    phases = summary.get("copy_phases") or {}
    print(f"summary: plan {summary.get('plan_seconds', 0):.4f} ({summary.get('plan_source')}), validate "
          f"{summary.get('validate_seconds', 0):.4f}, set-up {phases.get('setup', 0):.4f}, readers "
          f"{phases.get('threads', 0):.4f}, read/copy {summary.get('copy_seconds', 0):.4f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "device": args.device, "cpus": os.cpu_count(),
                       "load_s": timing["load_s"], "build_s": timing["build_s"],
                       "parts_ms": {n: round(s * 1e3, 3) for n, (s, _) in timer.items()},
                       "calls": {n: c for n, (_, c) in timer.items()},
                       "summary": summary}, f, indent=1, default=str)
    del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
