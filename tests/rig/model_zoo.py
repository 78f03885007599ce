"""Tiny random checkpoints of many architectures, named and shaped like their releases.

The tensor names, shapes and ``config.json`` come from Hugging Face transformers itself:
the writer builds the tiny model from its config and ``save_pretrained``s it, which writes
the release's on-disk layout (per-expert tensors, ``model.language_model.*`` prefixes of the
VL models, ...). The values are then replaced by deterministic random ones that depend
only on ``(seed, tensor name, shape)``, so two seeds give an A/B update pair, and the files
are split into two shards with an index.

Sizes keep SGLang's normal (GPU) weight-loader branches at TP 1 and 2: heads and kv heads
divide by 2, intermediate sizes are multiples of 2*32*2, the vocabulary needs no padding.

    path = write_zoo_checkpoint("qwen2_moe", tmp / "a", seed=1)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from tests.rig.checkpoints import QWEN3_DEFAULTS, _tensor, tokenizer_files

__all__ = ["ZooModel", "ZOO", "SPEED_SIZES", "write_zoo_checkpoint"]

_VOCAB = 1024
# The rig's aligned text sizes (each release class keeps its own norm eps and rope theta).
_TEXT = {k: v for k, v in QWEN3_DEFAULTS.items() if k not in ("rms_norm_eps", "rope_theta")}
_TEXT.update(vocab_size=_VOCAB, tie_word_embeddings=False)
# A "small" checkpoint for speed comparisons (tens of MB instead of a few).
SPEED_SIZES = dict(
    hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, shared_expert_intermediate_size=512,
    num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_hidden_layers=4,
)
_MOE = dict(moe_intermediate_size=128, num_experts_per_tok=2)
_VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, patch_size=16,
               spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
_VISION_NO_DEEPSTACK = dict(_VISION, deepstack_visual_indexes=[])  # as the Qwen3.5 releases
_VISION_DEEPSTACK = dict(_VISION, deepstack_visual_indexes=[0])  # Qwen3-VL feeds a ViT layer to the LM
# The Qwen3.5 releases keep the gated-delta-net decay and norm in fp32 (Qwen3.6: bf16).
_QWEN3_5_DTYPES = {"linear_attn.A_log": "F32", "linear_attn.norm.weight": "F32"}
# Qwen3.5 / Qwen3-Next hybrid layers: linear attention (gated delta net) then full attention.
_HYBRID = dict(
    num_hidden_layers=2,
    layer_types=["linear_attention", "full_attention"],
    full_attention_interval=2,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
)


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One architecture of the zoo: the transformers ``model_type`` and a tiny config."""

    key: str  # short name used by tests and the support table
    architecture: str  # the class name SGLang serves (config.json "architectures")
    model_type: str  # transformers model_type used to build the config
    config: Tuple[Tuple[str, object], ...]  # tiny config fields (text fields at top level)
    moe: bool = False
    vision: bool = False  # a VL model: text fields go to text_config, plus a vision_config
    # Tensors the release stores with the last two dims swapped relative to what
    # transformers 5 writes (fused expert tensors of the VL MoE releases: [E, in, out]).
    release_transposed: Tuple[str, ...] = ()
    # ``{name suffix: safetensors dtype}``: tensors the release stores in another dtype than
    # transformers writes them from a bf16 model.
    release_dtypes: Tuple[Tuple[str, str], ...] = ()
    vision_config: Tuple[Tuple[str, object], ...] = ()

    def config_dict(self) -> dict:
        return json.loads(json.dumps(dict(self.config)))


def _zoo(key, architecture, model_type, *, moe=False, vision=None, release_transposed=(), release_dtypes=None,
         **fields) -> ZooModel:
    return ZooModel(
        key, architecture, model_type, tuple(sorted(fields.items())), moe=moe, vision=vision is not None,
        release_transposed=tuple(release_transposed),
        release_dtypes=tuple(sorted((release_dtypes or {}).items())),
        vision_config=tuple(sorted((vision or {}).items())),
    )


ZOO: Dict[str, ZooModel] = {
    m.key: m
    for m in (
        _zoo("llama", "LlamaForCausalLM", "llama", **_TEXT),
        _zoo("qwen2", "Qwen2ForCausalLM", "qwen2", **dict(_TEXT, head_dim=None)),
        _zoo("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", moe=True,
             **dict(_TEXT, **_MOE, head_dim=None, num_experts=8, shared_expert_intermediate_size=256)),
        _zoo("mixtral", "MixtralForCausalLM", "mixtral", moe=True,
             **dict(_TEXT, num_local_experts=8, num_experts_per_tok=2, intermediate_size=128)),
        _zoo("qwen3", "Qwen3ForCausalLM", "qwen3", **_TEXT),
        _zoo("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe", moe=True, **dict(_TEXT, **_MOE, num_experts=8)),
        _zoo("qwen3_5", "Qwen3_5ForCausalLM", "qwen3_5_text", release_dtypes=_QWEN3_5_DTYPES, **dict(_TEXT, **_HYBRID)),
        _zoo("qwen3_5_moe", "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", moe=True, release_dtypes=_QWEN3_5_DTYPES,
             **dict(_TEXT, **_HYBRID, **_MOE, num_experts=8, shared_expert_intermediate_size=128)),
        _zoo("qwen3_next", "Qwen3NextForCausalLM", "qwen3_next", moe=True,
             **dict(_TEXT, **_HYBRID, **_MOE, num_experts=8, shared_expert_intermediate_size=128)),
        _zoo("qwen3_5_vl", "Qwen3_5ForConditionalGeneration", "qwen3_5", vision=_VISION_NO_DEEPSTACK, release_dtypes=_QWEN3_5_DTYPES,
             **dict(_TEXT, **_HYBRID)),
        _zoo("qwen3_5_moe_vl", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe", moe=True, vision=_VISION_NO_DEEPSTACK,
             release_dtypes=_QWEN3_5_DTYPES,
             **dict(_TEXT, **_HYBRID, **_MOE, num_experts=8, shared_expert_intermediate_size=128)),
        _zoo("qwen3_vl", "Qwen3VLForConditionalGeneration", "qwen3_vl", vision=_VISION_DEEPSTACK, **_TEXT),
        _zoo("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", moe=True, vision=_VISION_DEEPSTACK,
             release_transposed=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
             **dict(_TEXT, **_MOE, num_experts=8)),
        _zoo("glm4_moe", "Glm4MoeForCausalLM", "glm4_moe", moe=True,
             **dict(_TEXT, **_MOE, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                    n_group=1, topk_group=1, use_qk_norm=True, partial_rotary_factor=0.5)),
        _zoo("gemma3", "Gemma3ForCausalLM", "gemma3_text",
             **dict(_TEXT, sliding_window=64, tie_word_embeddings=True, query_pre_attn_scalar=32)),
        _zoo("deepseek_v3", "DeepseekV3ForCausalLM", "deepseek_v3", moe=True,
             **dict(_TEXT, **_MOE, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                    n_group=1, topk_group=1, moe_layer_freq=1, topk_method="noaux_tc", scoring_func="sigmoid",
                    routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                    qk_rope_head_dim=32, v_head_dim=32, head_dim=32,
                    rope_scaling=dict(type="yarn", rope_type="yarn", factor=32.0, original_max_position_embeddings=64,
                                      beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
        _zoo("gpt_oss", "GptOssForCausalLM", "gpt_oss", moe=True,
             **dict(_TEXT, num_local_experts=8, num_experts_per_tok=2, intermediate_size=128,
                    sliding_window=64, layer_types=["sliding_attention", "full_attention"])),
    )
}


def _hf_config(model: ZooModel, sizes: Tuple[Tuple[str, object], ...] = ()):
    from transformers import AutoConfig

    fields = {k: v for k, v in model.config_dict().items() if v is not None}
    for name, value in sizes:
        if name in fields:
            fields[name] = value
    if "layer_types" in fields:  # repeat the layer pattern over the (new) depth
        pattern = fields["layer_types"]
        fields["layer_types"] = [pattern[i % len(pattern)] for i in range(fields["num_hidden_layers"])]
    if model.vision:
        text = dict(fields)
        tie = text.pop("tie_word_embeddings", False)
        return AutoConfig.for_model(
            model.model_type, text_config=text, vision_config=dict(model.vision_config), tie_word_embeddings=tie
        )
    return AutoConfig.for_model(model.model_type, **fields)


@functools.lru_cache(maxsize=None)
def _release_layout(key: str, sizes: Tuple[Tuple[str, object], ...] = ()) -> Tuple[Tuple[Tuple[str, Tuple[int, ...], str], ...], str]:
    """``((name, shape, dtype), ...)`` and config.json text that transformers writes for ``key``."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    model = ZOO[key]
    config = _hf_config(model, sizes)
    config.architectures = [model.architecture]
    torch.manual_seed(0)
    auto = AutoModelForImageTextToText if model.vision else AutoModelForCausalLM
    hf = auto.from_config(config, dtype=torch.bfloat16)
    tmp = tempfile.mkdtemp(prefix="zoo-")
    try:
        hf.save_pretrained(tmp)
        entries = []
        for name in sorted(os.listdir(tmp)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(tmp, name), "pt") as f:
                    for t in f.keys():
                        s = f.get_slice(t)
                        shape = tuple(s.get_shape())
                        if any(t.endswith(suffix) for suffix in model.release_transposed):
                            shape = shape[:-2] + (shape[-1], shape[-2])
                        entries.append((t, shape, s.get_dtype()))
        config_text = Path(tmp, "config.json").read_text()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cfg = json.loads(config_text)
    cfg["architectures"] = [model.architecture]
    return tuple(entries), json.dumps(cfg, indent=2, sort_keys=True) + "\n"


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _kind(name: str, shape) -> str:
    if len(shape) <= 1:
        return "norm" if "norm" in name else "bias"
    return "embed" if "embed" in name else "matrix"


def write_zoo_checkpoint(
    key: str,
    out_dir,
    *,
    seed: int,
    num_shards: int = 2,
    dtypes: Optional[Dict[str, str]] = None,
    sizes: Optional[Dict[str, object]] = None,
) -> Path:
    """Write a tiny random checkpoint of zoo model ``key`` to ``out_dir`` (``num_shards`` files).

    Args:
        dtypes: ``{name suffix: safetensors dtype}`` for tensors stored in another dtype
            than transformers writes (e.g. ``{"A_log": "F32"}``).
        sizes: text-config fields to override (only those the model has), e.g. a larger
            ``hidden_size`` for a speed measurement.

    Returns:
        The checkpoint directory.
    """
    from safetensors.torch import save_file

    entries, config_text = _release_layout(key, tuple(sorted((sizes or {}).items())))
    dtypes = dict(ZOO[key].release_dtypes, **(dtypes or {}))
    if dtypes:
        entries = tuple(
            (n, shape, next((d for sfx, d in dtypes.items() if n.endswith(sfx)), dtype)) for n, shape, dtype in entries
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = max(1, min(num_shards, len(entries)))
    per = -(-len(entries) // n)
    weight_map, total = {}, 0
    for i in range(n):
        chunk = entries[i * per : (i + 1) * per]
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {
            name: _tensor(seed, name, shape, _kind(name, shape)).to(_DTYPES[dtype]) for name, shape, dtype in chunk
        }
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(config_text)
    for name, text in tokenizer_files(_VOCAB).items():
        (out / name).write_text(text)
    return out
