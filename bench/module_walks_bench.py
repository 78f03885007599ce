"""SGLang's per-update module walks, upstream's functions against the overlay's twins (CPU or GPU).

    .venv/bin/python bench/module_walks_bench.py [--layers 36 --repeats 21]
    python3 bench/module_walks_bench.py --device cuda --site-dir /tmp/site   # on the GPU host
    ... --ref REF | --ref-dir DIR   # also the post-load staging shortcut as at REF, alternated

Builds SGLang's real ``Qwen3ForCausalLM`` (``--layers`` layers: Qwen3-8B has 36, i.e. as many
modules, with small matrices) and the CPU benchmarks' Qwen3-MoE (``--moe-layers``), loads each
with ``fast``, then times, alternated in one process, what every update runs outside its reads
and copies (``sglang_fastload/module_walks.py``): the derived-weight-cache check and the
post-load hooks' module walk, as upstream's functions (the forks keep them as ``__wrapped__``)
and as the twins the forks bind; then ``restore_weights_before_loading`` whole, as upstream's
(kept as ``__wrapped__``) and with the idle hooks skipped (``idle_restores.py``), and
``postprocess_weights`` whole (with the twins), with its two pieces timed alone: the staging
contexts (entered and left around nothing) and the hooks (called without a context). Both
versions must give the same answers. With ``--ref``/``--ref-dir``, the two hook passes are also timed with
``post_load_staging.py`` as it was there (the shortcut the loader fork wraps SGLang's
``device_loading_context`` in; on CUDA only, elsewhere both go through SGLang's own context).
Only interpreter work: no read, no copy.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from bench import synthetic_checkpoints as sc  # noqa: E402
from bench.plan_pieces_ab import ref_module  # noqa: E402
from bench.plan_store_bench import cpu_moe_checkpoint  # noqa: E402


def dense_checkpoint(args):
    """A Qwen3 checkpoint with Qwen3-8B's module count and small matrices (written once)."""
    spec = sc.dense_spec("cpu")
    hidden, intermediate = getattr(args, "hidden_size", 256), getattr(args, "intermediate_size", 512)
    spec.cfg.update(num_hidden_layers=args.layers, hidden_size=hidden, intermediate_size=intermediate, vocab_size=4096)
    size = "" if (hidden, intermediate) == (256, 512) else f"-{hidden}x{intermediate}"
    return sc.write_checkpoint(os.path.join(args.workdir, f"dense-walks-{args.layers}{size}"), spec,
                               shard_bytes=int(0.5 * gb.GB), log=gb.log)


def median_ms(values):
    return statistics.median(values) * 1e3


def time_pairs(pairs, repeats):
    """``{label: [seconds]}`` for ``{label: function}``, every function once per round, in turn."""
    seconds = {label: [] for label in pairs}
    for i in range(repeats):
        labels = list(pairs) if i % 2 == 0 else list(reversed(pairs))
        for label in labels:
            t0 = time.perf_counter()
            pairs[label]()
            seconds[label].append(time.perf_counter() - t0)
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=36, help="dense model layers (Qwen3-8B: 36)")
    p.add_argument("--moe-layers", type=int, default=16)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--site-dir", default=None, help="the device bundle's site directory (GPU host)")
    p.add_argument("--workdir", default="/var/tmp/sglang-fastload-bench-cpu")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref", help="git ref of a post_load_staging.py to compare with")
    ref.add_argument("--ref-dir", help="directory holding that version's files, as in the repository")
    args = p.parse_args(argv)
    os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "0"
    if args.site_dir:
        gb.activate_site(args.site_dir)
    moe = cpu_moe_checkpoint(argparse.Namespace(layers=args.moe_layers, experts=args.experts, workdir=args.workdir))
    dense = dense_checkpoint(args)
    session = gb.Session(args.device)

    import torch
    from sglang.srt.model_executor.model_runner_components import weight_updater
    from sglang.srt.model_loader import loader

    check, walk = weight_updater._unsupported_derived_weight_cache_error, loader._modules_with_quant_method
    if getattr(check, "__wrapped__", None) is None or getattr(walk, "__wrapped__", None) is None:
        raise SystemExit("the forks did not bind the twins (upstream's functions changed?)")
    target = torch.device(args.device)
    shortcut = loader.device_loading_context
    ref_shortcut = None
    if args.ref or args.ref_dir:
        old = ref_module(args, "sglang_fastload/post_load_staging.py", "post_load_staging_at_ref")
        ref_shortcut = old.skip_staging_when_resident(shortcut.__wrapped__)

    restore_upstream = getattr(loader.DefaultModelLoader.restore_weights_before_loading, "__wrapped__", None)
    if restore_upstream is None:
        raise SystemExit("the loader fork did not bind the idle-restore skip (upstream's function changed?)")

    def contexts_only(pairs):
        for module, _ in pairs:
            with loader.device_loading_context(module, target):
                pass

    def with_shortcut(context, hooks):
        def run():
            loader.device_loading_context = context
            try:
                hooks(model, target)
            finally:
                loader.device_loading_context = shortcut
        return run

    print(f"{os.cpu_count()} CPUs, device {args.device}, {args.repeats} rounds alternated, medians in ms")
    print("| model | modules | derived check: upstream / twin | hooks' walk: upstream / twin "
          "| restore: upstream / idle skipped | postprocess (its staging contexts alone, its hooks alone) |")
    print("|---|---|---|---|---|---|")
    for label, info in (("dense", dense), ("moe", moe)):
        _, model_config, load_config = session.configure(info.directory, gb.CONTENDERS["fast"])
        model, _ = session.load(model_config, load_config)
        if check(model) != check.__wrapped__(model):
            raise SystemExit("the derived-weight-cache checks answer differently")
        if [(id(m), id(q)) for m, q in walk(model)] != [(id(m), id(q)) for m, q in walk.__wrapped__(model)]:
            raise SystemExit("the hooks' walks differ")
        gc.disable()  # as in a load (the loader pauses the collector)
        timed = {
            "check upstream": lambda: check.__wrapped__(model),
            "check twin": lambda: check(model),
            "walk upstream": lambda: list(walk.__wrapped__(model)),
            "walk twin": lambda: list(walk(model)),
            "restore": lambda: loader.DefaultModelLoader.restore_weights_before_loading(model, target),
            "restore upstream": lambda: restore_upstream(model, target),
            "postprocess": lambda: loader.DefaultModelLoader.postprocess_weights(model, target),
        }
        pairs = list(walk(model))  # the post-load pass's pieces, over the same modules
        timed["contexts"] = lambda: contexts_only(pairs)
        timed["post hooks"] = lambda: [q.process_weights_after_loading(m) for m, q in pairs]
        if ref_shortcut is not None:
            timed["restore ref"] = with_shortcut(ref_shortcut, loader.DefaultModelLoader.restore_weights_before_loading)
            timed["postprocess ref"] = with_shortcut(ref_shortcut, loader.DefaultModelLoader.postprocess_weights)
        seconds = time_pairs(timed, args.repeats)
        gc.enable()
        ms = {k: median_ms(v) for k, v in seconds.items()}
        ref_ms = (lambda k: f" (ref {ms[k + ' ref']:.2f})") if ref_shortcut is not None else (lambda k: "")
        print(f"| {label} | {sum(1 for _ in model.modules())} | {ms['check upstream']:.2f} / {ms['check twin']:.2f} "
              f"| {ms['walk upstream']:.2f} / {ms['walk twin']:.2f} "
              f"| {ms['restore upstream']:.2f} / {ms['restore']:.2f}{ref_ms('restore')} "
              f"| {ms['postprocess']:.2f}{ref_ms('postprocess')} ({ms['contexts']:.2f}, {ms['post hooks']:.2f}) |")
        del model
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
