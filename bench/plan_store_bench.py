"""Start-up loads with the plan built, read from the plan store, and the store's pieces.

    .venv/bin/python bench/plan_store_bench.py [--layers 48 --experts 128 --repeats 3]

One rank on CPU, in this process (SGLang imported once), on the Qwen3-MoE checkpoint of
``bench/cpu_bench.py`` (48 layers x 128 experts: 18,867 tensors, 2.04 GB). Each start builds
a fresh model and loads it with ``fast``, as a server start does: first with an empty store
(plan built and stored), then ``--repeats`` starts that read the stored plan, then
``--repeats`` starts with the store switched off (built). After each read it also times the
key, the read (parse, decode, check) and a write of the same plan on their own.
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
    session = gb.Session("cpu")
    summaries = gb.FastSummaries()

    from sglang_fastload.checkpoint.safetensors_header import read_header
    from sglang_fastload.loader import plan_key, plan_store
    from sglang_fastload.loader.executor import DEFAULT_CHUNK_BYTES

    plans, shares, pieces = {}, {}, []
    starts = ["empty store"] + ["stored"] * args.repeats + ["store off"] * args.repeats
    for label in starts:
        os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "0" if label == "store off" else "1"
        gb.free_memory("cpu")
        _, model_config, load_config = session.configure(info.directory, gb.CONTENDERS["fast"])
        model, t = session.load(model_config, load_config)
        plan_store.wait_for_writes()  # as the next server process would find it
        s = summaries.items[-1]
        plans.setdefault(s["plan_source"], []).append(s["plan_seconds"])
        shares.setdefault(s["plan_source"], []).append(s["plan_seconds"] / t["load_s"])
        print(f"{label:12s} plan {s['plan_seconds']:.3f} s ({s['plan_source']}), validate {s['validate_seconds']:.3f} s, "
              f"read/copy {s['copy_seconds']:.3f} s, whole load {t['load_s']:.2f} s", flush=True)
        if label == "stored":
            headers = {f: read_header(f) for f in sorted(glob.glob(os.path.join(info.directory, "*.safetensors")))}
            params = dict(model.named_parameters(remove_duplicate=False))
            knobs = plan_key.LoadKnobs(load_config_min_segment(load_config), DEFAULT_CHUNK_BYTES, "cpu")
            t0 = time.perf_counter()
            key = plan_key.plan_key(model, knobs, headers)
            t1 = time.perf_counter()
            plan = plan_store.read_plan(key, headers, params)
            t2 = time.perf_counter()
            if plan is None:
                raise SystemExit("the loader stored its plan under another key than recomputed here")
            plan_store.write_plan(key + "-copy", plan)
            t3 = time.perf_counter()
            pieces.append((t1 - t0, t2 - t1, t3 - t2))
            os.unlink(plan_store.path_for(store, key + "-copy"))
        del model
        gc.collect()
    sizes = [os.path.getsize(os.path.join(store, f)) for f in os.listdir(store)]
    shutil.rmtree(store, ignore_errors=True)
    print()
    print(f"checkpoint: {info.tensors} tensors, {info.nbytes / 1e9:.2f} GB in {len(info.files)} files; "
          f"{os.cpu_count()} CPUs; plan file {sizes[0] if sizes else 0} bytes")
    for source in ("built", "stored"):
        if source in plans:
            print(f"plan {source:6s}: median {statistics.median(plans[source]):.3f} s over {len(plans[source])} starts "
                  f"(min {min(plans[source]):.3f}, max {max(plans[source]):.3f}); "
                  f"median share of the whole load {100 * statistics.median(shares[source]):.1f} %")
    if "built" in plans and "stored" in plans:
        print(f"build / read: {statistics.median(plans['built']) / statistics.median(plans['stored']):.1f} x")
    if pieces:
        key_s, read_s, write_s = (statistics.median(x) for x in zip(*pieces))
        print(f"pieces (median): key {key_s:.3f} s, read+decode+check {read_s:.3f} s, write {write_s:.3f} s")
    return 0


def load_config_min_segment(load_config) -> int:
    from sglang_fastload.loader.plan import DEFAULT_MIN_SEGMENT_BYTES

    extra = dict(getattr(load_config, "model_loader_extra_config", None) or {})
    return int(extra.get("min_segment_bytes", DEFAULT_MIN_SEGMENT_BYTES))


if __name__ == "__main__":
    sys.exit(main())
