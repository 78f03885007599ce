"""The support table is true: every class it lists as fast loads bit-identically to upstream's
``auto`` (start-up and update, TP=1, TP=2, and expert parallel for MoE) without falling back,
and every fallback class it can build on CPU loads upstream's way with one log line per load.

The loads of one TP size run in two rank-process groups (``load_cases_beside_upstream``):
`auto` in upstream's own SGLang (the overlay off), `fast` with the overlay, so SGLang is
imported twice per TP size. The measured results are also written to
``.cache/model_support/results-<layout>.json``, which ``tools/support_table.py`` turns into
the README's support table.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from sglang_fastload.model_support import SUPPORT_TABLE
from tests.rig import module_walk_probe
from tests.rig.inprocess import CaseSpec, compare_params, load_cases_beside_upstream
from tests.rig.model_zoo import ZOO, write_zoo_checkpoint

RESULTS_DIR = Path(__file__).resolve().parents[2] / ".cache" / "model_support"
FAST = [e for e in SUPPORT_TABLE if e.fast]
# Fallback classes the CPU rig can build (the others say why in their reason).
FALLBACK = [e for e in SUPPORT_TABLE if not e.fast and e.zoo and "CPU test rig cannot" not in e.reason]
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "tp2-ep2": (2, 2)}
SUMMARY = re.compile(r"sglang-fastload: loaded ")
FALLBACK_LINE = "has no fast-load plan"


def _entries(layout):
    tp, ep = LAYOUTS[layout]
    return [e for e in FAST if ep == 1 or e.moe]


@pytest.fixture(scope="module")
def zoo_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    keys = sorted({e.zoo for e in FAST + FALLBACK})
    return {k: (write_zoo_checkpoint(k, root / f"{k}-a", seed=1), write_zoo_checkpoint(k, root / f"{k}-b", seed=2)) for k in keys}


@pytest.fixture(scope="module")
def group_results(zoo_pairs):
    """``layout -> {(zoo key, load format): RankResults or crash text}``.

    Computed on first use, for all layouts of one TP size at once: two rank-process groups
    per TP size, upstream's and the overlay's (an expert-parallel case rebuilds the process
    groups in the same processes).
    """
    cache = {}

    def get(layout):
        if layout not in cache:
            tp = LAYOUTS[layout][0]
            cases, keys = [], []
            for name, (size, ep) in LAYOUTS.items():
                if size != tp:
                    continue
                for e in _entries(name):
                    a, b = zoo_pairs[e.zoo]
                    for fmt in ("auto", "fast"):
                        cases.append(CaseSpec(a, fmt, b, keep_initial=True, ep_size=ep))
                        keys.append((name, e.zoo, fmt))
                if name == "tp1":
                    for e in FALLBACK:
                        a, b = zoo_pairs[e.zoo]
                        for fmt in ("fast", "auto"):
                            cases.append(CaseSpec(a, fmt, b, keep_initial=True))
                            keys.append((name, e.zoo, fmt))
            # Every model is also probed for the overlay's module walks (test below).
            results = load_cases_beside_upstream(cases, tp_size=tp, timeout=900, env={module_walk_probe.ENV: "1"})
            for (name, key, fmt), res in zip(keys, results):
                cache.setdefault(name, {})[(key, fmt)] = res
            for name in {k[0] for k in keys}:
                _write_results(name, cache[name])
        return cache[layout]

    return get


def _write_results(layout, results):
    """Per class: did fast match, did it run fast, and the update seconds of both loaders."""
    out = {}
    for (key, fmt), res in results.items():
        row = out.setdefault(key, {})
        if isinstance(res, str):
            row[fmt] = {"crash": res[-2000:]}
            continue
        row[fmt] = {
            "errors": [r.error for r in res],
            "startup_s": [r.timings.get("load_s") for r in res],
            "update_s": [(r.timings.get("update_s") or [None])[0] for r in res],
            "fast_lines": sum(len(SUMMARY.findall(r.log)) for r in res),
            "fallback_lines": sum(r.log.count(FALLBACK_LINE) for r in res),
        }
    for key, row in out.items():
        auto, fast = results.get((key, "auto")), results.get((key, "fast"))
        if isinstance(auto, list) and isinstance(fast, list):
            diffs = _diffs(auto, fast)
            row["startup_identical"] = not any(d for d in diffs if " start-up: " in d)
            row["update_identical"] = not any(d for d in diffs if " update: " in d)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"results-{layout}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


def _diffs(upstream, fast):
    out = []
    for rank, (u, f) in enumerate(zip(upstream, fast)):
        out += [f"rank {rank} start-up: {d}" for d in compare_params(u.params_before, f.params_before)]
        out += [f"rank {rank} update: {d}" for d in compare_params(u.params, f.params)]
    return out


CASES = [(e.architecture, layout) for layout in LAYOUTS for e in _entries(layout)]


@pytest.mark.parametrize("architecture,layout", CASES, ids=[f"{a}-{l}" for a, l in CASES])
def test_fast_is_bit_identical_to_upstream(group_results, architecture, layout):
    entry = next(e for e in FAST if e.architecture == architecture)
    results = group_results(layout)
    upstream, fast = results[(entry.zoo, "auto")], results[(entry.zoo, "fast")]
    assert not isinstance(upstream, str), f"upstream could not load {architecture}:\n{upstream[-3000:]}"
    assert not isinstance(fast, str), f"fast could not load {architecture}:\n{fast[-3000:]}"
    assert len(upstream) == len(fast) == LAYOUTS[layout][0]
    assert [r.error for r in upstream] == [r.error for r in fast] == [None] * len(fast)
    diffs = _diffs(upstream, fast)
    assert not diffs, f"{architecture} {layout}: {len(diffs)} differences, e.g. {diffs[:5]}"
    for r in fast:  # the plan really ran, at start-up and on update, on every rank
        assert len(SUMMARY.findall(r.log)) == 2, r.log[-3000:]
        assert FALLBACK_LINE not in r.log, r.log[-3000:]


@pytest.mark.parametrize("architecture", [e.architecture for e in FALLBACK])
def test_fallback_architectures_load_upstream_with_one_line(group_results, architecture):
    entry = next(e for e in FALLBACK if e.architecture == architecture)
    results = group_results("tp1")
    fast, upstream = results[(entry.zoo, "fast")], results[(entry.zoo, "auto")]
    assert not isinstance(fast, str), fast[-3000:]
    assert not isinstance(upstream, str), upstream[-3000:]
    assert fast[0].error is None
    assert not _diffs(upstream, fast)
    lines = [l for l in fast[0].log.splitlines() if FALLBACK_LINE in l]
    assert len(lines) == 2, fast[0].log[-3000:]  # one per load: start-up and update
    assert all(architecture in l and entry.reason[:40] in l for l in lines), lines
    assert not SUMMARY.search(fast[0].log)


@pytest.mark.parametrize("layout", ["tp1", "tp2-ep2"])
def test_module_walks_answer_as_upstream_on_every_model(group_results, layout):
    # sglang_fastload/module_walks.py against the functions the forks wrap, and the plan store
    # key's walks against the same walks by torch's iterators, on every real model class of
    # this layout, every rank, after its update (tests/rig/module_walk_probe.py).
    results = group_results(layout)
    probed = 0
    for (key, fmt), res in sorted(results.items()):
        if isinstance(res, str) or fmt == "auto":
            continue  # a crashed case (its own test reports it), or upstream's own SGLang: no overlay
        for r in res:
            assert r.module_walks is not None, (key, fmt)
            assert not r.module_walks["mismatches"], (key, fmt, r.rank, r.module_walks)
            assert r.module_walks["modules"] > 5 and r.module_walks["quant_methods"] > 0, (key, fmt, r.module_walks)
            probed += 1
    assert probed >= len([k for k in results if k[1] == "fast"])


def test_table_names_each_class_once_with_its_proof():
    names = [(e.module, e.architecture) for e in SUPPORT_TABLE]
    assert len(names) == len(set(names))
    here = Path(__file__).read_text()
    for e in SUPPORT_TABLE:
        assert e.proof.split("::")[-1] in here, e
        if e.fast:
            assert e.zoo in ZOO and ZOO[e.zoo].architecture == e.architecture, e
            assert ZOO[e.zoo].moe == e.moe, e
        else:
            assert e.reason, e


def test_expert_parallel_cases_really_place_experts_by_rank(group_results):
    # Same TP size, same processes: the expert-parallel cases must have rebuilt the groups.
    tp2, ep2 = group_results("tp2"), group_results("tp2-ep2")
    for e in _entries("tp2-ep2"):
        a, b = tp2[(e.zoo, "fast")], ep2[(e.zoo, "fast")]
        experts = [n for n in b[0].params if "experts.w13_weight" in n or "experts.w2_weight" in n]
        assert experts, (e.architecture, sorted(b[0].params)[:20])
        for n in experts:
            # EP=2 holds half of the experts whole; TP=2 holds every expert's half.
            assert b[0].params[n].shape[0] * 2 == a[0].params[n].shape[0], (e.architecture, n)


def test_listed_class_whose_loader_reads_values_falls_back_and_loads(tmp_path, caplog):
    # A class the table lists as fast, whose load_weights needs tensor values (here: a scale
    # read from the checkpoint): the replay cannot plan it, so upstream's path loads it.
    import logging

    import torch
    from safetensors.torch import save_file
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader

    from sglang_fastload.loader.fast_model_loader import FastModelLoader
    from sglang_fastload.model_support import support_entry

    class LlamaForCausalLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 4), requires_grad=False)

        def load_weights(self, weights):
            for _, w in weights:
                self.weight.data.copy_(w / float(w.abs().max()))

    LlamaForCausalLM.__module__ = "sglang.srt.models.llama"
    assert support_entry(LlamaForCausalLM).fast
    w = torch.arange(16, dtype=torch.float32).reshape(4, 4) - 5
    save_file({"weight": w}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))

    # Upstream's iterator reads the published server args, as in a scheduler process.
    from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    from tests.rig.checkpoints import write_llama

    args = ServerArgs(model_path=str(write_llama(tmp_path / "served", seed=1)), device="cpu", load_format="fast",
                      attention_backend="torch_native", sampling_backend="pytorch", disable_cuda_graph=True)
    model = LlamaForCausalLM()
    loader = FastModelLoader(LoadConfig(load_format="fast"))
    source = DefaultModelLoader.Source(str(tmp_path), None)
    reset_context()
    publish(args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
    try:
        with caplog.at_level(logging.INFO, logger="sglang_fastload"):
            loader.load_weights_and_postprocess(model, loader._get_weights_iterator(source), torch.device("cpu"))
    finally:
        reset_context()
    assert torch.equal(model.weight, w / 10)
    lines = [r.getMessage() for r in caplog.records if FALLBACK_LINE in r.getMessage()]
    assert len(lines) == 1 and "needs tensor values" in lines[0], lines
