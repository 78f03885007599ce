"""`fast` accepts every checkpoint upstream `auto` loads correctly, bit-identically, and refuses
(before any write, naming file and tensor) only what upstream loads wrongly.

Each group below is one rank-process group per load format: a start-up load followed by a
sequence of updates, every step compared bit for bit with upstream's own `auto` run of the
same sequence (real SGLang, CPU, in-process ranks).

Why the refusals stay: for an integer, boolean or fp8 tensor where an unquantized float
weight belongs, upstream's weight loaders run ``param.copy_(tensor)``, which casts the raw
values (integers become integral floats, fp8 codes lose their scales) and serves them as
weights without a word. The tests show upstream doing exactly that, and `fast` refusing.
"""

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest
import torch

from tests.rig.checkpoint_variants import derive, first_matrix, to_dtype, write_bin_copy
from tests.rig.checkpoints import safetensors_files, write_qwen3, write_qwen3_moe
from tests.rig.inprocess import compare_params, load_params, upstream_params

FEED_NONE = re.compile(r"sglang-fastload: (\d+) checkpoint tensors feed no parameter on this rank.*?\(e\.g\. (.*)\)")
SUMMARY = "sglang-fastload: loaded"
FALLBACK = "has no fast-load plan"


@dataclass
class Step:
    label: str
    path: Path
    refused_tensor: Optional[str] = None  # set: `fast` must refuse it, naming this tensor
    fast_path: bool = True  # False: `fast` hands it to upstream's path (one log line)


def _write(kind: str, out: Path, seed: int) -> Path:
    if kind == "qwen3":
        return write_qwen3(out, tied=False, seed=seed, layout="sharded")
    if kind == "qwen3_tied":
        return write_qwen3(out, tied=True, seed=seed, layout="sharded")
    return write_qwen3_moe(out, seed=seed, layout="split_layer")


def _index_of_another_sharding(weight_map):
    """The index a trainer kept from another save: every tensor of the first two shards mapped
    to the other one, and one entry for a tensor no shard holds (upstream's loader reads the
    index only to choose the files, then loads every tensor they hold)."""
    first, second = sorted(set(weight_map.values()))[:2]
    swapped = {name: {first: second, second: first}.get(shard, shard) for name, shard in weight_map.items()}
    swapped["model.layers.0.mlp.dropped_by_the_trainer.weight"] = first
    return swapped


def build_sequence(root: Path, kind: str):
    """Start-up checkpoint and the updates every group runs (variants of two random seeds)."""
    a, b = _write(kind, root / "a", 11), _write(kind, root / "b", 22)
    hidden = 128
    tied = kind == "qwen3_tied"
    extras = {
        "v_head.summary.weight": torch.randn(1, hidden).to(torch.bfloat16),  # a PPO value head
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(16),
    }
    if tied:
        # A tied model whose checkpoint also stores the (unused) lm_head.
        extras["lm_head.weight"] = torch.randn(1024, hidden).to(torch.bfloat16)
    # fp32 master weights, with tensors no parameter takes (absent again in the next update)
    start = derive(a, root / "a-f32", convert=to_dtype(torch.float32), add=extras)
    matrix = first_matrix(b)
    first_shard = safetensors_files(b)[0].name
    steps = [
        Step("bf16", b),
        Step("f32", derive(b, root / "b-f32", convert=to_dtype(torch.float32))),
        Step("bf16 + f32 norms", derive(a, root / "a-mixed", convert=to_dtype(torch.float32, norms_only=True))),
        Step("f16", derive(b, root / "b-f16", convert=to_dtype(torch.float16))),
        Step("f64 matrix", derive(a, root / "a-f64", convert=to_dtype(torch.float64, names=[matrix]))),
        Step("unused tensors present", derive(b, root / "b-extra", add=extras)),
        Step("unused tensors absent, weights only", derive(a, root / "a-weights", copy_config=False)),
        Step("shard linked to another step", derive(b, root / "step-12", link=[first_shard])),
        Step("index of another sharding", derive(b, root / "b-index-swapped", index_edit=_index_of_another_sharding)),
        Step("pytorch .bin", write_bin_copy(a, root / "a-bin"), fast_path=False),
        Step("int16 matrix", derive(b, root / "b-int16", convert=to_dtype(torch.int16, names=[matrix])), matrix),
        Step("fp8 matrix", derive(b, root / "b-fp8", convert=to_dtype(torch.float8_e4m3fn, names=[matrix])), matrix),
        Step("bool matrix", derive(b, root / "b-bool", convert=to_dtype(torch.bool, names=[matrix])), matrix),
        Step("bf16 again", b),
    ]
    return start, steps


GROUPS = [
    # (model, tp, --dtype, fast's start-up stream: startup_stream.py, on the host when "on")
    ("qwen3", 1, "bfloat16", "on"),
    ("qwen3", 2, "bfloat16", "auto"),
    ("qwen3_moe", 1, "float32", "on"),
    ("qwen3_moe", 2, "bfloat16", "auto"),
    ("qwen3_tied", 1, "float16", "auto"),
]


def _run(start, steps, load_format, tp, dtype, extra_config=None):
    """The sequence through ``load_format``; `auto` through upstream's own SGLang."""
    load = upstream_params if load_format == "auto" else functools.partial(load_params, load_format=load_format)
    return load(
        start,
        tp_size=tp,
        update_path=[s.path for s in steps],
        keep_initial=True,
        keep_history=True,
        server_args={"dtype": dtype},
        extra_config=extra_config,
        timeout=600,
    )


@pytest.mark.parametrize("kind,tp,dtype,stream", GROUPS, ids=[f"{k}-tp{t}-{d}" for k, t, d, _ in GROUPS])
def test_checkpoints_upstream_loads_are_loaded_bit_identically(tmp_path, kind, tp, dtype, stream):
    start, steps = build_sequence(tmp_path, kind)
    upstream = _run(start, steps, "auto", tp, dtype)
    fast = _run(start, steps, "fast", tp, dtype, {"startup_stream": stream})
    for rank in fast:
        # The F32 start-up checkpoint (with tensors no parameter takes) went through the
        # stream where asked (converted on the way out of the scratch); never an update.
        assert rank.log.count("of it while the plan was built") == (1 if stream == "on" else 0), rank.log[-3000:]
    for ref, got in zip(upstream, fast):
        rank = ref.rank
        # Start-up: an F32 checkpoint into a model of --dtype.
        diffs = compare_params(ref.params_before, got.params_before)
        assert not diffs, f"rank {rank} start-up: {diffs[:5]}"
        served = -1  # index into the history of the weights `fast` serves now (-1: start-up)
        for i, step in enumerate(steps):
            ok, message = got.update_results[i]
            up_ok, up_message = ref.update_results[i]
            assert up_ok, f"rank {rank}: upstream failed on {step.label}: {up_message}"
            if step.refused_tensor is None:
                assert ok, f"rank {rank}: fast refused {step.label}: {message}"
                diffs = compare_params(ref.params_history[i], got.params_history[i])
                assert not diffs, f"rank {rank} after {step.label}: {diffs[:5]}"
                served = i
                continue
            # Refused before any write, naming the shard file and the tensor...
            assert not ok, f"rank {rank}: fast accepted {step.label}"
            assert "Rolled back" not in message, message
            shard = next(p.name for p in safetensors_files(step.path) if step.refused_tensor in _names(p))
            assert step.refused_tensor in message and shard in message, message
            # ...and the weights served before keep serving.
            before = got.params_before if served < 0 else got.params_history[served]
            assert not compare_params(before, got.params_history[i]), step.label
            # Upstream loaded the raw values as weights (what the refusal protects from): its
            # parameters are not the float checkpoint's (the last step loads that one).
            assert compare_params(ref.params_history[i], ref.params), step.label
        assert not compare_params(ref.params, got.params)
    _check_fast_logs(fast, steps)


def _names(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _check_fast_logs(fast, steps):
    for rank in fast:
        log = rank.log
        accepted_fast = 1 + sum(1 for s in steps if s.refused_tensor is None and s.fast_path)
        # Every accepted safetensors load went through the fast path (no silent fallback)...
        assert log.count(SUMMARY) == accepted_fast, log[-4000:]
        # ...and only the .bin checkpoint was handed to upstream, with one line.
        fallbacks = [l for l in log.splitlines() if FALLBACK in l]
        assert len(fallbacks) == 1 and "bin weights" in fallbacks[0], fallbacks
        # Tensors that feed no parameter: one warning line per checkpoint that has them
        # (start-up and one update), naming them; skipped rotary buffers are not worth one.
        warned = FEED_NONE.findall(log)
        assert len(warned) == 2, warned
        for count, names in warned:
            assert "v_head.summary.weight" in names and "inv_freq" not in names, warned
        # An index that no longer says where the tensors are: one line, naming the index.
        noted = [l for l in log.splitlines() if "disagrees with the shards" in l]
        assert len(noted) == 1 and "model.safetensors.index.json" in noted[0], noted


def test_bin_checkpoint_at_start_up_loads_through_upstream(tmp_path):
    a = write_qwen3(tmp_path / "a", tied=False, seed=5, layout="single")
    b = write_qwen3(tmp_path / "b", tied=False, seed=6, layout="sharded")
    a_bin = write_bin_copy(a, tmp_path / "a-bin")
    upstream = upstream_params(a_bin, update_path=b, keep_initial=True)
    fast = load_params(a_bin, load_format="fast", update_path=b, keep_initial=True)
    assert fast[0].error is None, fast[0].error
    assert not compare_params(upstream[0].params_before, fast[0].params_before)
    assert not compare_params(upstream[0].params, fast[0].params)
    log = fast[0].log
    assert log.count(FALLBACK) == 1 and log.count(SUMMARY) == 1, log[-3000:]  # then B goes fast
