"""Where an update's time outside reads and copies goes, timed part by part (CPU or GPU).

    .venv/bin/python bench/update_parts_bench.py [--layers 36 --updates 21]
    python3 bench/update_parts_bench.py --device cuda --site-dir /tmp/site   # on the GPU host

Builds SGLang's real ``Qwen3ForCausalLM`` with Qwen3-8B's module count and small matrices
(``module_walks_bench.py``'s checkpoint, 0.08 GB), loads it with ``fast``, then updates it
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
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from bench.module_walks_bench import dense_checkpoint  # noqa: E402


class PartTimer:
    """Seconds spent in wrapped callables during one update, by part name."""

    def __init__(self):
        self.seconds = {}

    def wrap(self, name, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return timed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36)
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

    from sglang.srt.model_executor.model_runner_components import weight_updater
    from sglang.srt.model_loader.loader import DefaultModelLoader

    from sglang_fastload.loader import fast_model_loader

    timer = PartTimer()
    # Parts of the update in the order they run; the load's own parts are nested in "load".
    top = [
        (weight_updater, "_unsupported_derived_weight_cache_error", "derived-weight-cache check"),
        (weight_updater, "get_model_loader", "loader dispatch"),
        (fast_model_loader.FastModelLoader, "_get_weights_iterator", "weights iterator (validates the checkpoint)"),
        (DefaultModelLoader, "restore_weights_before_loading", "restore_weights_before_loading"),
        (fast_model_loader.FastModelLoader, "load_weights_and_postprocess", "load (execute_plan + postprocess)"),
    ]
    nested = [
        (fast_model_loader, "execute_plan", "  execute_plan (reads and copies)"),
        (DefaultModelLoader, "postprocess_weights", "  postprocess_weights"),
    ]
    for owner, attribute, name in top + nested:
        original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        if isinstance(original, staticmethod):
            setattr(owner, attribute, staticmethod(timer.wrap(name, original.__func__)))
        else:
            setattr(owner, attribute, timer.wrap(name, original))
    object.__setattr__(updater, "update_model_fields", timer.wrap("model fields", updater.update_model_fields))
    top_names = [name for _, _, name in top] + ["model fields"]

    rows = {name: [] for name in top_names + [name for _, _, name in nested]}
    rows["rest (guard, upstream's own lines)"], rows["whole update"], rows["outside execute_plan"] = [], [], []
    for _ in range(args.updates):
        timer.seconds = {}
        t0 = time.perf_counter()
        ok, message = updater.update_weights_from_disk(info.directory, "fast")
        gb.sync(args.device)
        whole = time.perf_counter() - t0
        if not ok:
            raise SystemExit(f"update failed: {message}")
        for name in top_names + [name for _, _, name in nested]:
            rows[name].append(timer.seconds.get(name, 0.0))
        rows["rest (guard, upstream's own lines)"].append(max(0.0, whole - sum(timer.seconds.get(n, 0.0) for n in top_names)))
        rows["whole update"].append(whole)
        rows["outside execute_plan"].append(whole - timer.seconds.get("  execute_plan (reads and copies)", 0.0))
    print(f"{os.cpu_count()} CPUs, device {args.device}, {sum(1 for _ in model.modules())} modules, "
          f"{args.updates} updates, medians in ms")
    print("| part | ms |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
