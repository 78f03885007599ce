"""Start-up loads with the plan built, read from the plan store, and the store's pieces.

    .venv/bin/python bench/plan_store_bench.py [--layers 48 --experts 128 --repeats 3] [--device cuda]

One rank, in this process (SGLang imported once), on the Qwen3-MoE checkpoint of
``bench/cpu_bench.py`` (48 layers x 128 experts: 18,867 tensors, 2.04 GB; 16 layers: 6,291
tensors, as the 16-layer GPU benchmark). Each start builds a fresh model and loads it with
``fast`` as a new server process does (what the process memoized about files forgotten):
first with an empty store (plan built and stored), then ``--repeats`` starts that read the
stored plan, then ``--repeats`` starts with the store switched off (built). After each read
it times a restart's pieces on their own, again from forgotten memos: the headers, the key
(with the kept source digests, as the loader computes it), the plan file's read and
decompression, its JSON parse, its decode and check, and a write of the same plan. The
per-tensor Python work is what is measured: the checkpoint is small, so ``--device cuda``
times the same pieces with the parameters on the GPU.
"""

from __future__ import annotations

import argparse
import gc
import glob
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from bench import synthetic_checkpoints as sc  # noqa: E402


def moe_arguments(description: str) -> argparse.ArgumentParser:
    """The CPU MoE checkpoint's options (shared with ``replay_bench.py``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="/var/tmp/sglang-fastload-bench-cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p


def cpu_moe_checkpoint(args):
    """Quiet logging, SGLang with the overlay (and, where the image lacks them, the benches'
    import stand-ins for GPU kernel packages), and ``cpu_bench.py``'s MoE checkpoint (written once)."""
    logging.basicConfig(level=logging.ERROR, stream=sys.stdout, force=True)
    gb.activate_site(None)
    from bench import import_standins_for_bench

    import_standins_for_bench.activate()  # a GPU machine's image lacks sgl_kernel (real installs win)
    spec = sc.moe_spec("cpu", layers=args.layers)
    spec.cfg["num_experts"] = args.experts
    return sc.write_checkpoint(os.path.join(args.workdir, f"moe-{args.experts}x{args.layers}"), spec,
                               shard_bytes=int(0.5 * gb.GB), log=gb.log)


def main(argv=None) -> int:
    args = moe_arguments(__doc__).parse_args(argv)

    store = tempfile.mkdtemp(prefix="plan-store-bench-")
    os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "1"
    os.environ["SGLANG_FASTLOAD_PLAN_DIR"] = store
    info = cpu_moe_checkpoint(args)
    gb.raw_read(info.files, 2)  # warm page cache
    session = gb.Session(args.device)
    summaries = gb.FastSummaries()

    from sglang_fastload.loader import plan_store

    plans, shares, pieces = {}, {}, []
    starts = ["empty store"] + ["stored"] * args.repeats + ["store off"] * args.repeats
    for label in starts:
        os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "0" if label == "store off" else "1"
        gb.free_memory(args.device)
        gb.forget_process_memos()  # each start is a new server process
        _, model_config, load_config = session.configure(info.directory, gb.CONTENDERS["fast"])
        model, t = session.load(model_config, load_config)
        plan_store.wait_for_writes()  # as the next server process would find it
        s = summaries.items[-1]
        plans.setdefault(s["plan_source"], []).append(s["plan_seconds"])
        shares.setdefault(s["plan_source"], []).append(s["plan_seconds"] / t["load_s"])
        print(f"{label:12s} plan {s['plan_seconds']:.3f} s ({s['plan_source']}), validate {s['validate_seconds']:.3f} s, "
              f"read/copy {s['copy_seconds']:.3f} s (set-up {s['copy_setup_seconds']:.3f}), "
              f"whole load {t['load_s']:.3f} s", flush=True)
        if label == "stored":
            pieces.append(restart_pieces(info.directory, model, load_config, args.device, store))
        del model
        gc.collect()
    sizes = [os.path.getsize(os.path.join(store, f)) for f in os.listdir(store) if f.endswith(plan_store.SUFFIX)]
    shutil.rmtree(store, ignore_errors=True)
    print()
    print(f"checkpoint: {info.tensors} tensors, {info.nbytes / 1e9:.2f} GB in {len(info.files)} files; "
          f"{os.cpu_count()} CPUs; device {args.device}; plan file {sizes[0] if sizes else 0} bytes")
    for source in ("built", "stored"):
        if source in plans:
            print(f"plan {source:6s}: median {statistics.median(plans[source]):.3f} s over {len(plans[source])} starts "
                  f"(min {min(plans[source]):.3f}, max {max(plans[source]):.3f}); "
                  f"median share of the whole load {100 * statistics.median(shares[source]):.1f} %")
    if "built" in plans and "stored" in plans:
        print(f"build / read: {statistics.median(plans['built']) / statistics.median(plans['stored']):.1f} x")
    if pieces:
        print("restart pieces (median of %d, s): " % len(pieces)
              + ", ".join(f"{name} {statistics.median(p[name] for p in pieces):.4f}" for name in pieces[0]))
    return 0


def restart_pieces(directory: str, model, load_config, device: str, store: str) -> dict:
    """A restart's pieces timed one by one from forgotten memos (see the module's docstring)."""
    import gzip
    import json

    import torch

    from sglang_fastload.checkpoint.safetensors_header import read_header
    from sglang_fastload.loader import plan_key, plan_store
    from sglang_fastload.loader.collector_pause import collector_paused
    from sglang_fastload.loader.executor import DEFAULT_CHUNK_BYTES

    gb.forget_process_memos()
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    params = dict(model.named_parameters(remove_duplicate=False))
    knobs = plan_key.LoadKnobs(load_config_min_segment(load_config), DEFAULT_CHUNK_BYTES, str(torch.device(device)))
    t0 = time.perf_counter()
    headers = {f: read_header(f) for f in files}
    t1 = time.perf_counter()
    key, _ = plan_key.plan_key_and_parts(model, knobs, headers)
    t2 = time.perf_counter()
    path = plan_store.path_for(store, key)
    if not os.path.exists(path):
        raise SystemExit("the loader stored its plan under another key than recomputed here")
    with open(path, "rb") as f:
        text = gzip.decompress(f.read())
    t3 = time.perf_counter()
    with collector_paused():  # as the loader parses and decodes a stored plan
        data = json.loads(text)
        t4 = time.perf_counter()
        plan = plan_store.decode_plan(data, key, headers, params)
        t5 = time.perf_counter()
    plan_store.write_plan(key + "-copy", plan)
    t6 = time.perf_counter()
    os.unlink(plan_store.path_for(store, key + "-copy"))
    return {"headers": t1 - t0, "key": t2 - t1, "file+gunzip": t3 - t2, "json": t4 - t3, "decode": t5 - t4, "write": t6 - t5}


def load_config_min_segment(load_config) -> int:
    from sglang_fastload.loader.plan import DEFAULT_MIN_SEGMENT_BYTES

    extra = dict(getattr(load_config, "model_loader_extra_config", None) or {})
    return int(extra.get("min_segment_bytes", DEFAULT_MIN_SEGMENT_BYTES))


if __name__ == "__main__":
    sys.exit(main())
