"""The CPU test rig itself, exercised against upstream SGLang behaviour only (load format
``auto``): the GPU-import stand-ins, the checkpoint factory and its oracle, in-process
loading/updating at TP=1/2 (and EP=2), and a real CPU server with /generate and
/update_weights_from_disk."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.rig import checkpoints as ck
from tests.rig.inprocess import assert_params_equal, compare_params, load_params, upstream_params

# --------------------------------------------------------------------------------------
# GPU-import stand-ins (one interpreter of the venv, as SGLang's schedulers get it)
# --------------------------------------------------------------------------------------
STANDIN_PROBE = textwrap.dedent(
    """
    import importlib.util, json, sys
    out = {}
    import gpu_import_standins_for_tests as g
    out["finder_last"] = type(sys.meta_path[-1]).__name__
    import triton, triton.backends, triton.language as tl
    from triton.runtime.jit import JITFunction
    out["triton_is_standin"] = g.is_standin(triton)
    out["cpu_in_backends"] = "cpu" in triton.backends.backends
    out["backends"] = list(triton.backends.backends)
    out["isinstance_ok"] = isinstance(1, JITFunction) is False
    try:
        triton.runtime.driver.active.get_current_target()
        out["zero_arg_raises"] = False
    except g.StandinUsedError:
        out["zero_arg_raises"] = True

    @triton.autotune(configs=[triton.Config({"B": 1}, num_warps=4)], key=["n"])
    @triton.jit
    def kernel(x, B: tl.constexpr):
        pass

    out["decorated"] = g.is_standin(kernel)
    import torchvision.transforms, torchao, torchaudio.functional
    out["others"] = [g.is_standin(m) for m in (torchvision.transforms, torchao, torchaudio.functional)]
    import numpy, torch
    out["real_untouched"] = not g.is_standin(numpy) and not g.is_standin(torch)
    try:
        import vllm.distributed.parallel_state
        out["vllm_other"] = "imported"
    except ImportError:
        out["vllm_other"] = "ImportError"
    try:
        from vllm._custom_ops import no_such_kernel
        out["vllm_unknown"] = "imported"
    except ImportError:
        out["vllm_unknown"] = "ImportError"
    import torch.utils._triton as tt
    out["torch_has_triton"] = bool(tt.has_triton())
    print("PROBE" + json.dumps(out))
    """
)


def _probe(env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-c", STANDIN_PROBE], capture_output=True, text=True, env=env, timeout=120)
    return proc


def test_installed_package_check_names_every_difference(tmp_path):
    from tests.rig.installed_package import installed_differences, tree_differences

    assert installed_differences() == []  # what the session started with (conftest.py)
    source, installed = tmp_path / "source", tmp_path / "installed"
    for root in (source, installed):
        (root / "loader").mkdir(parents=True)
        (root / "loader" / "plan.py").write_text("A = 1\n")
        (root / "__init__.py").write_text("")
    (installed / "_overlay").mkdir()
    (installed / "_overlay" / "x.py").write_text("")
    (installed / "loader" / "__pycache__").mkdir()
    (installed / "loader" / "__pycache__" / "plan.cpython-311.pyc").write_bytes(b"\0")
    assert tree_differences(str(source), str(installed), skip=frozenset({"_overlay"})) == []
    (source / "loader" / "plan.py").write_text("A = 2\n")
    (source / "loader" / "binding.py").write_text("")
    (installed / "old.py").write_text("")
    assert tree_differences(str(source), str(installed), skip=frozenset({"_overlay"})) == [
        f"changed since installed: {os.path.join('loader', 'plan.py')}",
        f"not installed: {os.path.join('loader', 'binding.py')}",
        "installed, not in the checkout: old.py",
    ]


def test_standins_installed_and_current():
    from tests.rig import install_standins

    assert install_standins.is_current(), "run: .venv/bin/python tests/rig/install_standins.py"


def test_standins_behaviour_in_a_fresh_interpreter():
    proc = _probe()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("PROBE", 1)[1])
    assert out["finder_last"] == "StandinFinder"  # asked only after every real finder
    assert out["triton_is_standin"]
    assert out["cpu_in_backends"] is False and out["backends"] == []
    assert out["isinstance_ok"] and out["zero_arg_raises"] and out["decorated"]
    assert out["others"] == [True, True, True]
    assert out["real_untouched"]
    assert out["vllm_other"] == "ImportError" and out["vllm_unknown"] == "ImportError"
    assert out["torch_has_triton"] is False  # torch must not think it can run triton on CPU


def test_standins_switch_off():
    proc = _probe({"GPU_IMPORT_STANDINS_FOR_TESTS": "0"})
    assert proc.returncode != 0 and "No module named 'gpu_import_standins_for_tests'" not in proc.stderr
    assert "ModuleNotFoundError" in proc.stderr and "triton" in proc.stderr


def test_install_uninstall_roundtrip(tmp_path):
    from tests.rig import install_standins as inst

    target = tmp_path / "site"
    target.mkdir()
    assert not inst.is_current(str(target))
    inst.install(str(target))
    assert inst.is_current(str(target))
    inst.install(str(target))  # idempotent
    assert sorted(p.name for p in target.iterdir()) == [inst.PACKAGE, inst.PTH_NAME]
    assert inst.uninstall(str(target)) and list(target.iterdir()) == []
    assert not inst.uninstall(str(target))


@pytest.mark.slow
def test_vllm_rotary_fallback_matches_sglang_native():
    code = textwrap.dedent(
        """
        import torch
        from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
        from vllm._custom_ops import rotary_embedding
        rope = RotaryEmbedding(32, 32, 2048, 1e6, True, torch.bfloat16)
        pos = torch.tensor([0, 3, 1, 7, 100, 2047])
        g = torch.Generator().manual_seed(0)
        q = torch.randn(6, 4 * 32, generator=g).to(torch.bfloat16)
        k = torch.randn(6, 2 * 32, generator=g).to(torch.bfloat16)
        qn, kn = rope.forward_native(pos, q.clone(), k.clone())
        q2, k2 = q.clone(), k.clone()
        rotary_embedding(pos, q2, k2, 32, rope.cos_sin_cache, True)
        assert torch.equal(qn, q2) and torch.equal(kn, k2)
        print("OK")
        """
    )
    import os

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------
# checkpoint factory
# --------------------------------------------------------------------------------------
def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def test_checkpoints_deterministic_and_seeded(tmp_path):
    a1 = ck.write_qwen3(tmp_path / "a1", tied=False, seed=5)
    a2 = ck.write_qwen3(tmp_path / "a2", tied=False, seed=5)
    b = ck.write_qwen3(tmp_path / "b", tied=False, seed=6)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "generation_config.json"):
        assert (a1 / name).read_bytes() == (a2 / name).read_bytes(), name
    ta, tb = ck.load_tensors(a1), ck.load_tensors(b)
    assert ta.keys() == tb.keys()
    assert all(not torch.equal(ta[k], tb[k]) for k in ta)
    assert all(t.dtype == torch.bfloat16 for t in ta.values())
    assert ck.checkpoint_bytes(a1) == (a1 / "model.safetensors").stat().st_size


def test_checkpoint_names_and_config(tmp_path):
    tied = ck.write_qwen3(tmp_path / "t", tied=True, seed=1)
    untied = ck.write_qwen3(tmp_path / "u", tied=False, seed=1, num_hidden_layers=3)
    moe = ck.write_qwen3_moe(tmp_path / "m", seed=1, num_experts=8)
    names_t, names_u, names_m = (set(ck.load_tensors(p)) for p in (tied, untied, moe))
    assert "lm_head.weight" not in names_t and "lm_head.weight" in names_u
    assert "model.layers.2.self_attn.q_norm.weight" in names_u
    assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(8)} <= names_m
    assert "model.layers.0.mlp.gate.weight" in names_m and "model.layers.0.mlp.gate_proj.weight" not in names_m
    cfg = json.loads((moe / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    tok = json.loads((moe / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) + len(tok["added_tokens"]) == cfg["vocab_size"]
    llama = ck.write_llama(tmp_path / "l", seed=1)
    assert json.loads((llama / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not any("q_norm" in n for n in ck.load_tensors(llama))


def test_checkpoint_layouts(tmp_path):
    ref = ck.load_tensors(ck.write_qwen3_moe(tmp_path / "single", seed=3, num_hidden_layers=3))
    for layout in ck.LAYOUTS[1:]:
        d = ck.write_qwen3_moe(tmp_path / layout, seed=3, num_hidden_layers=3, layout=layout)
        got = ck.load_tensors(d)
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), layout
        files = ck.safetensors_files(d)
        if layout == "shuffled_tensors":
            assert [f.name for f in files] == ["model.safetensors"]
            h = _header(files[0])
            by_offset = sorted(h, key=lambda k: h[k]["data_offsets"][0])
            assert by_offset != sorted(h), "byte order must not be the name order"
            continue
        index = json.loads((d / "model.safetensors.index.json").read_text())
        wm = index["weight_map"]
        assert set(wm) == set(ref) and index["metadata"]["total_size"] == sum(t.numel() * 2 for t in ref.values())
        assert sorted(set(wm.values())) == [f.name for f in files]
        assert all(f.name.startswith("model-0000") and f.name.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
        if layout == "split_layer":
            shards_of_layer1 = {wm[n] for n in wm if n.startswith("model.layers.1.")}
            assert len(shards_of_layer1) == 2
        if layout == "shuffled_shards":
            assert wm["model.layers.0.input_layernorm.weight"] == files[-1].name
            assert wm["model.norm.weight"] == files[0].name
        if layout == "sharded":
            assert wm["model.embed_tokens.weight"] == files[0].name and wm["lm_head.weight"] == files[-1].name
            for i in range(3):  # whole layers per shard
                assert len({wm[n] for n in wm if n.startswith(f"model.layers.{i}.")}) == 1


def test_compare_params_reports_every_kind_of_difference():
    a = {"x": torch.zeros(3, dtype=torch.bfloat16), "y": torch.ones(2), "z": torch.ones(2), "only_a": torch.ones(1)}
    b = {"x": -torch.zeros(3, dtype=torch.bfloat16), "y": torch.ones(3), "z": torch.ones(2, dtype=torch.float16), "only_b": torch.ones(1)}
    diffs = compare_params(a, b)
    assert any(d.startswith("missing in second: only_a") for d in diffs)
    assert any(d.startswith("missing in first: only_b") for d in diffs)
    assert any(d.startswith("x: 3 of 3") for d in diffs)  # -0.0 != 0.0 bitwise
    assert any(d.startswith("y: shape") for d in diffs) and any(d.startswith("z: dtype") for d in diffs)
    assert compare_params(a, dict(a)) == []


# --------------------------------------------------------------------------------------
# in-process loading through SGLang's own code (upstream `auto`)
# --------------------------------------------------------------------------------------
INPROC_CASES = [
    # (kind, tp, ep, also compare with a fresh load of B)
    ("qwen3", 1, 1, True),
    ("qwen3_tied", 2, 1, False),
    ("qwen3_moe", 1, 1, False),
    ("qwen3_moe", 2, 2, True),
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,tp,ep,fresh", INPROC_CASES, ids=[f"{k}-tp{t}-ep{e}" for k, t, e, _ in INPROC_CASES])
def test_inprocess_auto_load_and_update_match_checkpoint(checkpoint_factory, kind, tp, ep, fresh):
    a = checkpoint_factory(kind, seed=1)
    b = checkpoint_factory(kind, seed=2)
    updated = load_params(a, tp_size=tp, ep_size=ep, update_path=b, keep_initial=True)
    assert len(updated) == tp
    for rank, u in enumerate(updated):
        assert u.error is None, u.error
        assert u.update_results == [(True, "Succeeded to update model weights.")]
        assert "Update weights end." in u.log
        assert u.overlay is True  # a rank runs the overlay's SGLang unless told otherwise
        # (a) the start-up load holds exactly the checkpoint's tensors, sharded as SGLang does
        assert_params_equal(u.params_before, ck.expected_sglang_params(a, tp_size=tp, rank=rank, ep_size=ep), what=f"A rank {rank}")
        # (b) after the update: exactly B
        assert_params_equal(u.params, ck.expected_sglang_params(b, tp_size=tp, rank=rank, ep_size=ep), what=f"A->B rank {rank}")
    if fresh:  # (b) A then update to B == a fresh load of B by upstream's own SGLang (the oracle covers the other cases)
        fresh_b = upstream_params(b, tp_size=tp, ep_size=ep)
        assert [r.overlay for r in fresh_b] == [False] * tp
        for rank in range(tp):
            assert_params_equal(updated[rank].params, fresh_b[rank].params, what=f"A->B vs B, rank {rank}")
    if tp > 1:
        assert compare_params(updated[0].params, updated[1].params), "ranks must hold different shards"
    if ep > 1:
        assert updated[0].params["model.layers.0.mlp.experts.w13_weight"].shape[0] == 8 // ep


@pytest.mark.slow
def test_inprocess_every_layout_env_and_failed_update(checkpoint_factory):
    """One process: update through every layout (alternating seeds), then to a bad path."""
    paths = [checkpoint_factory("qwen3_tied", seed=1 + i % 2, layout=layout) for i, layout in enumerate(ck.LAYOUTS)]
    res = load_params(
        paths[0],
        update_path=paths[1:] + ["/nonexistent/checkpoint"],
        keep_initial=True,
        keep_history=True,
        env={"SGLANG_RIG_PROBE": "layouts", "HF_HUB_OFFLINE": None},
    )
    r = res[0]
    assert "SGLANG_RIG_PROBE=layouts" in r.log and "HF_HUB_OFFLINE" not in r.log.split("env:", 1)[1].splitlines()[0]
    assert r.timings["load_s"] > 0 and len(r.timings["update_s"]) == len(paths)
    assert_params_equal(r.params_before, ck.expected_sglang_params(paths[0]), what="single")
    for path, params, (ok, _) in zip(paths[1:], r.params_history, r.update_results):
        assert ok, path
        assert_params_equal(params, ck.expected_sglang_params(path), what=path.name)
    assert r.update_results[-1][0] is False and r.error == r.update_results[-1][1]
    assert_params_equal(r.params, r.params_history[-2], what="a failed iterator leaves the weights alone")


@pytest.mark.slow
def test_inprocess_startup_failure_raises_with_log(qwen3_a):
    from tests.rig.inprocess import RankProcessError

    with pytest.raises(RankProcessError, match="is not a valid LoadFormat") as info:
        load_params(qwen3_a, load_format="no-such-format")
    assert len(info.value.logs) == 1 and not info.value.transient


# --------------------------------------------------------------------------------------
# a real server on CPU
# --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.server
def test_server_generate_and_update_from_disk(qwen3_a, qwen3_b):
    import psutil

    from tests.rig.server import SGLangServer

    prompt = "The quick brown fox"
    with SGLangServer(qwen3_b) as srv_b:
        tokens_b = srv_b.generate(prompt, max_new_tokens=8)
    with SGLangServer(qwen3_a) as srv:
        pids = srv.pids()
        assert len(pids) >= 3  # launcher, scheduler, detokenizer
        assert all(v > 0 for v in srv.rss_bytes().values())
        tokens_a = srv.generate(prompt, max_new_tokens=8)
        assert len(tokens_a) == 8
        assert srv.generate(prompt, max_new_tokens=8) == tokens_a  # deterministic greedy
        ids = srv.generate([1, 2, 3, 4, 5], max_new_tokens=4)
        assert len(ids) == 4
        assert tokens_a != tokens_b, "A and B must be distinguishable"

        status, body = srv.update_weights_from_disk(qwen3_b)
        assert status == 200 and body["success"], body
        assert srv.generate(prompt, max_new_tokens=8) == tokens_b

        status, body = srv.update_weights_from_disk("/nonexistent/checkpoint")
        assert status == 400 and not body["success"]
        assert srv.generate(prompt, max_new_tokens=8) == tokens_b

        status, info = srv.get("/get_model_info")
        assert status == 200 and info["model_path"] == str(qwen3_b)
        assert "Update weights end." in srv.log_text()
    assert not srv.running
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
