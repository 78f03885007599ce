"""Where an update's time outside reads and copies goes, timed part by part (CPU or GPU).

    .venv/bin/python bench/update_parts_bench.py [--layers 36 --updates 21]
    python3 bench/update_parts_bench.py --device cuda --site-dir /tmp/site   # on the GPU host

Builds SGLang's real ``Qwen3ForCausalLM`` with Qwen3-8B's module count and small matrices
(``module_walks_bench.py``'s checkpoint, 0.08 GB; ``--hidden-size``/``--intermediate-size``
make the matrices larger, so that each update reads more bytes through the same module
tree), loads it with ``fast``, then updates it
``--updates`` times through SGLang's own ``update_weights_from_disk`` (the update guard and
the forks included) with each part of the update wrapped in a timer, without a profiler: the
derived-weight-cache check, the loader dispatch, the weights iterator, SGLang's
``restore_weights_before_loading`` and ``postprocess_weights``, the fast loader's prepare
(headers and plan lookup) and its ``execute_plan`` (reads and copies: what the benchmarks
call "inside"), the model fields' update. ``rest`` is the update's time outside all of these.
Medians over the updates, in ms. The parts outside ``execute_plan`` cost the same for a
checkpoint of the real sizes: they depend on the module and tensor counts, not on bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from bench import update_parts  # noqa: E402
from bench.module_walks_bench import dense_checkpoint  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--hidden-size", type=int, default=256, help="larger matrices: more bytes per update, same modules")
    p.add_argument("--intermediate-size", type=int, default=512)
    p.add_argument("--updates", type=int, default=21)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--site-dir", default=None)
    p.add_argument("--workdir", default="/var/tmp/sglang-fastload-bench-cpu")
    args = p.parse_args(argv)
    os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "0"
    import logging

    logging.basicConfig(level=logging.ERROR, stream=sys.stdout, force=True)
    gb.activate_site(args.site_dir)
    from bench import import_standins_for_bench

    import_standins_for_bench.activate()
    info = dense_checkpoint(args)
    session = gb.Session(args.device)
    _, model_config, load_config = session.configure(info.directory, gb.CONTENDERS["fast"])
    model, _ = session.load(model_config, load_config)
    updater, _ = session.updater(model, model_config, load_config)

    timer = update_parts.install(updater)
    rows = {}
    for _ in range(args.updates):
        t0 = time.perf_counter()
        ok, message = updater.update_weights_from_disk(info.directory, "fast")
        gb.sync(args.device)
        whole = time.perf_counter() - t0
        if not ok:
            raise SystemExit(f"update failed: {message}")
        for name, seconds in timer.split(whole).items():
            rows.setdefault(name, []).append(seconds)
    print(f"{os.cpu_count()} CPUs, device {args.device}, {sum(1 for _ in model.modules())} modules, "
          f"{info.nbytes / gb.GB:.2f} GB, {args.updates} updates, medians in ms")
    print("| part | ms |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
