"""The replay (a first start's plan) of this tree against another version, alternated (CPU).

    .venv/bin/python bench/replay_bench.py --ref 810e815 [--layers 16 --experts 128 --repeats 9]
    python3 bench/replay_bench.py --ref-dir DIR ...   # DIR holds the two files as at the ref

Builds the CPU Qwen3-MoE checkpoint of ``bench/cpu_bench.py`` once (``--layers`` x
``--experts``: 6,291 tensors at 16 x 128, as the 16-layer GPU benchmark), loads it with
``fast``, then times ``replay_load_weights`` in one process, alternating this tree's
``loader/replay.py`` and ``expert_mapping.py`` (which the forked Qwen3-MoE ``load_weights``
uses) with the same two modules at ``--ref`` (from git) or from ``--ref-dir`` (for a machine
without the repository). Both replays must record the same copies, zero-fills and tensors.
The collector is paused, as in a load. Only interpreter work is measured: no read, no copy.
"""

from __future__ import annotations

import argparse
import gc
import glob
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from bench.plan_pieces_ab import ref_module  # noqa: E402
from bench.plan_store_bench import cpu_moe_checkpoint, moe_arguments  # noqa: E402

REPLAY = "sglang_fastload/loader/replay.py"
EXPERT_MAPPING = "sglang_fastload/expert_mapping.py"


def reference_modules(args: argparse.Namespace):
    """``(replay module, ExpertMappingIndex class)`` as at the reference."""
    return (ref_module(args, REPLAY, "replay_at_ref"),
            ref_module(args, EXPERT_MAPPING, "expert_mapping_at_ref").ExpertMappingIndex)


def recorded(result):
    """What a replay recorded, comparable across module versions."""
    return (
        [(c.tensor, c.param, c.src, c.dst) for c in result.copies],
        [(z.param, z.dst) for z in result.zeros],
        sorted(result.tensors_used),
    )


def main(argv=None) -> int:
    p = moe_arguments(__doc__)
    p.set_defaults(layers=16, repeats=9)
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", help="git ref of the version to compare with")
    ref.add_argument("--ref-dir", help="directory holding that version's two files, as in the repository")
    args = p.parse_args(argv)
    os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "0"
    info = cpu_moe_checkpoint(args)
    session = gb.Session("cpu")
    _, model_config, load_config = session.configure(info.directory, gb.CONTENDERS["fast"])
    model, _ = session.load(model_config, load_config)

    import torch

    from sglang_fastload import expert_mapping
    from sglang_fastload.checkpoint.safetensors_header import read_header, torch_dtype_name
    from sglang_fastload.loader import replay

    old_replay, old_index = reference_modules(args)
    versions = {"tree": (replay, expert_mapping.ExpertMappingIndex), "ref": (old_replay, old_index)}
    order = [
        (name, entry.shape, getattr(torch, torch_dtype_name(entry.dtype)))
        for path in sorted(glob.glob(os.path.join(info.directory, "*.safetensors")))
        for name, entry in read_header(path).tensors.items()
    ]
    seconds = {label: [] for label in versions}
    results = {}
    gc.disable()
    for i in range(args.repeats):
        labels = list(versions) if i % 2 == 0 else list(reversed(versions))
        for label in labels:
            module, index = versions[label]
            expert_mapping.ExpertMappingIndex = index  # what the forked load_weights imports
            t0 = time.perf_counter()
            results[label] = module.replay_load_weights(model, order, lambda m, it: m.load_weights(it))
            seconds[label].append(time.perf_counter() - t0)
    expert_mapping.ExpertMappingIndex = versions["tree"][1]
    gc.enable()
    if recorded(results["tree"]) != recorded(results["ref"]):
        raise SystemExit("the two versions recorded different copies")
    print(f"{len(order)} tensors, {os.cpu_count()} CPUs, reference {args.ref or args.ref_dir}")
    for label, values in seconds.items():
        print(f"{label:5s} median {statistics.median(values):.3f} s  {[round(v, 3) for v in values]}")
    print(f"tree / ref: {statistics.median(seconds['tree']) / statistics.median(seconds['ref']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
