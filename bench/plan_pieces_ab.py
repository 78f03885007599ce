"""A plan's Python pieces, this tree against a git ref, alternated in one process (CPU).

    .venv/bin/python bench/plan_pieces_ab.py --model dense --layers 8 --ref 287d920
    .venv/bin/python bench/plan_pieces_ab.py --model moe --layers 4 --ref 287d920

Writes (once) a checkpoint of real Qwen3-8B or Qwen3-30B-A3B shapes with fewer layers,
loads it with ``fast`` into SGLang's real model on the CPU (plan store on, in a temporary
directory), then times, for the modules of this tree and the same modules as they were at
``--ref`` (loaded from ``git show``), alternated ``--repeats`` times:

- ``build_plan`` on the copies the load's replay recorded (what a first start pays after
  the replay),
- ``decode_plan`` of the stored plan (what a restart pays to read it back),
- ``parse_index`` of the checkpoint's index, repeated to ``--index-entries`` entries.

Pieces whose module is unchanged at ``--ref`` time the same code twice (a noise check).
Only this process's interpreter work is measured: no read, no copy.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench import gpu_bench as gb  # noqa: E402
from bench import synthetic_checkpoints as sc  # noqa: E402


def module_at(ref: str, relpath: str, name: str):
    """The module ``relpath`` of the package as it was at ``ref`` (imports resolve to this tree)."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{ref}:{relpath}"], check=True, capture_output=True, text=True).stdout
    return module_from_source(source, name)


def module_from_source(source: str, name: str):
    """A module made from ``source`` under ``name`` (its imports resolve to this tree)."""
    path = os.path.join(tempfile.mkdtemp(prefix="plan-pieces-"), f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def alternate(pieces, repeats: int):
    """``{label: [seconds, ...]}`` for ``pieces`` = ``[(label, callable), ...]``, run in turn."""
    times = {label: [] for label, _ in pieces}
    for _ in range(repeats):
        for label, run in pieces:
            t0 = time.perf_counter()
            run()
            times[label].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("dense", "moe"), default="dense")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ref", required=True, help="git ref to compare with (e.g. a commit before a change)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--index-entries", type=int, default=6300)
    p.add_argument("--workdir", default="/var/tmp/sglang-fastload-bench-pieces")
    args = p.parse_args(argv)

    store = tempfile.mkdtemp(prefix="plan-pieces-store-")
    os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "1"
    os.environ["SGLANG_FASTLOAD_PLAN_DIR"] = store
    logging.basicConfig(level=logging.ERROR, stream=sys.stdout, force=True)
    gb.activate_site(None)
    if args.model == "dense":
        spec = sc.dense_spec("full")
        spec.cfg["num_hidden_layers"] = args.layers
    else:
        spec = sc.moe_spec("full", layers=args.layers)
    info = sc.write_checkpoint(os.path.join(args.workdir, f"{args.model}-{args.layers}"), spec,
                               shard_bytes=int(1.5e9), log=gb.log)

    from sglang_fastload.checkpoint import checkpoint_files
    from sglang_fastload.checkpoint.safetensors_header import read_header
    from sglang_fastload.loader import fast_model_loader, plan, plan_store

    recorded = {}
    build_plan = fast_model_loader.build_plan

    def recording_build_plan(*a, **kw):
        recorded["args"] = (a, kw)
        return build_plan(*a, **kw)

    fast_model_loader.build_plan = recording_build_plan
    session = gb.Session("cpu")
    _, model_config, load_config = session.configure(info.directory, gb.CONTENDERS["fast"])
    model, _ = session.load(model_config, load_config)
    fast_model_loader.build_plan = build_plan
    plan_store.wait_for_writes()

    headers = {f: read_header(f) for f in sorted(glob.glob(os.path.join(info.directory, "*.safetensors")))}
    params = dict(model.named_parameters(remove_duplicate=False))
    stored = [os.path.join(store, n) for n in os.listdir(store) if n.endswith(plan_store.SUFFIX)]
    with gzip.open(stored[0], "rb") as f:
        data = json.loads(f.read())
    key = data["key"]
    (index_path,) = glob.glob(os.path.join(info.directory, "*.index.json"))
    with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    copies = -(-args.index_entries // len(weight_map))
    index = json.dumps({"metadata": {}, "weight_map": {
        f"{name}.{i}" if i else name: shard for i in range(copies) for name, shard in weight_map.items()}}).encode()

    old_plan = module_at(args.ref, "sglang_fastload/loader/plan.py", "plan_at_ref")
    old_store = module_at(args.ref, "sglang_fastload/loader/plan_store.py", "plan_store_at_ref")
    old_files = module_at(args.ref, "sglang_fastload/checkpoint/checkpoint_files.py", "checkpoint_files_at_ref")
    a, kw = recorded["args"]
    built = {"tree": plan.build_plan(*a, **kw), args.ref: old_plan.build_plan(*a, **kw)}
    times = alternate([
        (f"build_plan {args.ref}", lambda: old_plan.build_plan(*a, **kw)),
        ("build_plan tree", lambda: plan.build_plan(*a, **kw)),
        (f"decode_plan {args.ref}", lambda: old_store.decode_plan(data, key, headers, params)),
        ("decode_plan tree", lambda: plan_store.decode_plan(data, key, headers, params)),
        (f"parse_index {args.ref}", lambda: old_files.parse_index(index_path, index)),
        ("parse_index tree", lambda: checkpoint_files.parse_index(index_path, index)),
    ], args.repeats)

    steps = {label: sum(len(fp.steps) for fp in p.files) for label, p in built.items()}
    decoded = sum(len(fp.steps) for fp in plan_store.decode_plan(data, key, headers, params).files)
    print(f"\n{spec.label}: {info.tensors} tensors, {info.nbytes / 1e9:.2f} GB; plan steps built by the tree "
          f"{steps['tree']}, at {args.ref} {steps[args.ref]}; stored plan (the tree's) {decoded} steps; "
          f"index {len(weight_map) * copies} entries; {args.repeats} alternated repeats, {os.cpu_count()} CPUs")
    for label, ts in times.items():
        print(f"  {label:32s} median {statistics.median(ts) * 1e3:8.2f} ms   best {min(ts) * 1e3:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
