"""Time the replay (the plan's main cost at a first start) on the CPU Qwen3-MoE checkpoint.

    .venv/bin/python bench/replay_bench.py [--layers 48 --experts 128 --repeats 3]

Builds the model of ``bench/cpu_bench.py`` once (18,867 tensors at 48 x 128), then times
``replay_load_weights`` as the loader runs it, interleaved with a variant whose meta probes
are made one by one while the recorder is active (how it was done before 2026-12-01 late),
so both see the same machine state.
"""

from __future__ import annotations

import glob
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import gpu_bench as gb  # noqa: E402
from bench.plan_store_bench import cpu_moe_checkpoint, moe_arguments  # noqa: E402


def main(argv=None) -> int:
    args = moe_arguments(__doc__).parse_args(argv)
    os.environ["SGLANG_FASTLOAD_PLAN_STORE"] = "0"
    info = cpu_moe_checkpoint(args)
    session = gb.Session("cpu")
    _, model_config, load_config = session.configure(info.directory, gb.CONTENDERS["fast"])
    model, _ = session.load(model_config, load_config)

    import torch

    from sglang_fastload.checkpoint.safetensors_header import read_header, torch_dtype_name
    from sglang_fastload.loader import replay

    order = [
        (name, entry.shape, getattr(torch, torch_dtype_name(entry.dtype)))
        for path in sorted(glob.glob(os.path.join(info.directory, "*.safetensors")))
        for name, entry in read_header(path).tensors.items()
    ]

    def probes_made_under_the_recorder(model, tensors, load_weights):
        params = dict(model.named_parameters(remove_duplicate=False))
        recorder = replay._CopyRecorder(params)

        def probes():
            for name, shape, dtype in tensors:
                probe = torch.empty(shape, dtype=dtype, device="meta")
                recorder.probes[probe.untyped_storage()._cdata] = name
                recorder.current = name
                yield name, probe

        with recorder:
            load_weights(model, probes())
        return replay.ReplayResult(recorder.copies, recorder.zeros, recorder.used)

    variants = {"loader": replay.replay_load_weights, "probes made under the recorder": probes_made_under_the_recorder}
    seconds = {label: [] for label in variants}
    for _ in range(args.repeats):
        for label, replay_fn in variants.items():
            t0 = time.perf_counter()
            result = replay_fn(model, order, lambda m, it: m.load_weights(it))
            seconds[label].append(time.perf_counter() - t0)
            assert len(result.copies) >= len(order), "every tensor feeds a parameter at TP=1"
    print(f"{len(order)} tensors, {os.cpu_count()} CPUs")
    for label, values in seconds.items():
        print(f"{label:32s} median {statistics.median(values):.3f} s  {[round(v, 3) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
