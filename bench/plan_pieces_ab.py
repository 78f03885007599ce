"""A plan's Python pieces, this tree against a git ref, alternated in one process (CPU).

    .venv/bin/python bench/plan_pieces_ab.py --model dense --layers 8 --ref 287d920
    .venv/bin/python bench/plan_pieces_ab.py --model moe --layers 4 --ref 287d920
    python3 bench/plan_pieces_ab.py --model moe-small --layers 16 --ref-dir DIR   # DIR: the modules at the ref

Writes (once) a checkpoint of real Qwen3-8B or Qwen3-30B-A3B shapes with fewer layers,
loads it with ``fast`` into SGLang's real model on the CPU (plan store on, in a temporary
directory), then times, for the modules of this tree and the same modules as they were at
``--ref`` (loaded from ``git show``), alternated ``--repeats`` times:

- ``build_plan`` on the copies the load's replay recorded (what a first start pays after
  the replay),
- reading the stored plan back: decompression, JSON parse and ``decode_plan`` of the plan as
  each version encodes it (``encode_plan``, gzip level 1), i.e. what a restart pays,
- ``parse_header`` of every checkpoint file's header and the key's ``checkpoint_layout``,
- ``parse_index`` of the checkpoint's index, repeated to ``--index-entries`` entries.

``--model moe-small`` is the CPU benchmarks' Qwen3-MoE shape (128 experts, small hidden
size): as many tensors per layer as the real model (6,291 at 16 layers) in little disk.

Pieces whose module is unchanged at ``--ref`` time the same code twice (a noise check).
Only this process's interpreter work is measured: no read, no copy.
"""

from __future__ import annotations

import argparse
import contextlib
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


def ref_module(args, relpath: str, name: str):
    """The module ``relpath`` at the reference: ``args.ref`` from git, or from the file under
    ``args.ref_dir`` (a machine without the repository)."""
    if getattr(args, "ref_dir", None):
        with open(os.path.join(args.ref_dir, relpath)) as f:
            return module_from_source(f.read(), name)
    return module_at(args.ref, relpath, name)


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


@contextlib.contextmanager
def build_plan_arguments():
    """While the ``with`` body loads: ``{"args": (args, kwargs)}`` of the loader's last
    ``build_plan`` call (what a first start cuts its plan from), for timing it again."""
    from sglang_fastload.loader import fast_model_loader

    recorded = {}
    build_plan = fast_model_loader.build_plan

    def recording_build_plan(*a, **kw):
        recorded["args"] = (a, kw)
        return build_plan(*a, **kw)

    fast_model_loader.build_plan = recording_build_plan
    try:
        yield recorded
    finally:
        fast_model_loader.build_plan = build_plan


def raw_header(path: str):
    """``(the file's first bytes through its header, the file's size)``: ``parse_header``'s input."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        f.seek(0)
        return f.read(8 + length), os.fstat(f.fileno()).st_size


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
    p.add_argument("--model", choices=("dense", "moe", "moe-small"), default="dense")
    p.add_argument("--layers", type=int, default=8)
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", help="git ref to compare with (e.g. a commit before a change)")
    ref.add_argument("--ref-dir", help="directory holding the compared modules as in the repository")
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
    elif args.model == "moe":
        spec = sc.moe_spec("full", layers=args.layers)
    else:
        spec = sc.moe_spec("cpu", layers=args.layers)
        spec.cfg["num_experts"] = 128
        from bench import import_standins_for_bench

        import_standins_for_bench.activate()  # a GPU machine's image lacks sgl_kernel (real installs win)
    info = sc.write_checkpoint(os.path.join(args.workdir, f"{args.model}-{args.layers}"), spec,
                               shard_bytes=int(1.5e9), log=gb.log)

    from sglang_fastload.checkpoint import checkpoint_files, safetensors_header
    from sglang_fastload.checkpoint.safetensors_header import read_header
    from sglang_fastload.loader import plan, plan_key, plan_store
    from sglang_fastload.loader.collector_pause import collector_paused

    session = gb.Session("cpu")
    _, model_config, load_config = session.configure(info.directory, gb.CONTENDERS["fast"])
    with build_plan_arguments() as recorded:
        model, _ = session.load(model_config, load_config)
    plan_store.wait_for_writes()

    files = sorted(glob.glob(os.path.join(info.directory, "*.safetensors")))
    headers = {f: read_header(f) for f in files}
    header_bytes = [(f, *raw_header(f)) for f in files]
    params = dict(model.named_parameters(remove_duplicate=False))
    stored = [os.path.join(store, n) for n in os.listdir(store) if n.endswith(plan_store.SUFFIX)]
    with gzip.open(stored[0], "rb") as f:
        key = json.loads(f.read())["key"]
    (index_path,) = glob.glob(os.path.join(info.directory, "*.index.json"))
    with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
    copies = -(-args.index_entries // len(weight_map))
    index = json.dumps({"metadata": {}, "weight_map": {
        f"{name}.{i}" if i else name: shard for i in range(copies) for name, shard in weight_map.items()}}).encode()

    old_plan = ref_module(args, "sglang_fastload/loader/plan.py", "plan_at_ref")
    old_store = ref_module(args, "sglang_fastload/loader/plan_store.py", "plan_store_at_ref")
    old_files = ref_module(args, "sglang_fastload/checkpoint/checkpoint_files.py", "checkpoint_files_at_ref")
    old_header = ref_module(args, "sglang_fastload/checkpoint/safetensors_header.py", "safetensors_header_at_ref")
    old_key = ref_module(args, "sglang_fastload/loader/plan_key.py", "plan_key_at_ref")
    args.ref = args.ref or os.path.basename(os.path.normpath(args.ref_dir))  # the reference's label
    a, kw = recorded["args"]
    built = {"tree": plan.build_plan(*a, **kw), args.ref: old_plan.build_plan(*a, **kw)}
    # Each version's own file for the same plan (the tree's build), as its write_plan makes it.
    files_of = {label: gzip.compress(json.dumps(m.encode_plan(built["tree"], key), separators=(",", ":")).encode(),
                                     compresslevel=1, mtime=0)
                for label, m in (("tree", plan_store), (args.ref, old_store))}

    def read_back(module, blob):
        return module.decode_plan(json.loads(gzip.decompress(blob)), key, headers, params)

    with collector_paused():  # every piece runs inside the loader's collector pause in a load
        times = alternate([
            (f"build_plan {args.ref}", lambda: old_plan.build_plan(*a, **kw)),
            ("build_plan tree", lambda: plan.build_plan(*a, **kw)),
            (f"read stored plan {args.ref}", lambda: read_back(old_store, files_of[args.ref])),
            ("read stored plan tree", lambda: read_back(plan_store, files_of["tree"])),
            (f"parse_header {args.ref}", lambda: [old_header.parse_header(*h) for h in header_bytes]),
            ("parse_header tree", lambda: [safetensors_header.parse_header(*h) for h in header_bytes]),
            (f"checkpoint_layout {args.ref}", lambda: old_key.checkpoint_layout(headers)),
            ("checkpoint_layout tree", lambda: plan_key.checkpoint_layout(headers)),
            (f"parse_index {args.ref}", lambda: old_files.parse_index(index_path, index)),
            ("parse_index tree", lambda: checkpoint_files.parse_index(index_path, index)),
        ], args.repeats)
    for label, blob in files_of.items():
        got = read_back(plan_store if label == "tree" else old_store, blob)
        assert [fp.steps for fp in got.files] == [fp.steps for fp in built["tree"].files], label

    steps = {label: sum(len(fp.steps) for fp in p.files) for label, p in built.items()}
    decoded = sum(len(fp.steps) for fp in built["tree"].files)
    print(f"\n{spec.label}: {info.tensors} tensors, {info.nbytes / 1e9:.2f} GB; plan steps built by the tree "
          f"{steps['tree']}, at {args.ref} {steps[args.ref]}; stored plan {decoded} steps, file "
          f"{len(files_of['tree'])} bytes (at {args.ref} {len(files_of[args.ref])}); "
          f"index {len(weight_map) * copies} entries; {args.repeats} alternated repeats, {os.cpu_count()} CPUs")
    for label, ts in times.items():
        print(f"  {label:32s} median {statistics.median(ts) * 1e3:8.2f} ms   best {min(ts) * 1e3:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
