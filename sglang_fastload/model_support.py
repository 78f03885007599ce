"""Which SGLang model classes ``--load-format fast`` loads itself, and why the others fall back.

Support is decided by evidence: a class is listed as ``fast`` only when a test loads tiny
release-shaped checkpoints with it at start-up and on update, at TP=1 and TP=2 (and expert
parallel for MoE), and finds every parameter bit-identical to upstream's ``auto`` load.
The match is on the exact class (module and name): a subclass may load differently, so it
falls back until it is listed itself. A listed class whose replay meets something that
cannot be planned still falls back (``UnsupportedModelError``), it never fails.

This module is the one place that knows about model architectures; adding a model needs a
line here and a case in ``tests/loader/test_model_support.py``, no forked file.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

__all__ = ["ArchitectureSupport", "SUPPORT_TABLE", "support_entry", "unsupported_architecture_reason"]

_PROOF = "tests/loader/test_model_support.py::test_fast_is_bit_identical_to_upstream"
_FALLBACK_PROOF = "tests/loader/test_model_support.py::test_fallback_architectures_load_upstream_with_one_line"


@dataclasses.dataclass(frozen=True)
class ArchitectureSupport:
    """One SGLang model class and how ``fast`` treats it.

    Attributes:
        architecture: the class name (as in a checkpoint's ``config.json`` "architectures").
        module: the module that defines the class in SGLang 0.5.23.
        fast: True when ``fast`` plans its loads; False when upstream's loader runs.
        proof: the test that proves the entry.
        reason: for a fallback, what the class's loading does that a plan cannot express.
        zoo: the test checkpoint writer's key for this class (``tests/rig/model_zoo.py``).
        moe: a mixture-of-experts model (tested with expert parallelism too).
    """

    architecture: str
    module: str
    fast: bool
    proof: str
    reason: str = ""
    zoo: str = ""
    moe: bool = False


def _fast(architecture: str, module: str, zoo: str, *, moe: bool = False) -> ArchitectureSupport:
    return ArchitectureSupport(architecture, f"sglang.srt.models.{module}", True, _PROOF, zoo=zoo, moe=moe)


def _fallback(architecture: str, module: str, zoo: str, reason: str, *, moe: bool = False) -> ArchitectureSupport:
    return ArchitectureSupport(
        architecture, f"sglang.srt.models.{module}", False, _FALLBACK_PROOF, reason=reason, zoo=zoo, moe=moe
    )


_MLA_REASON = (
    "load_weights ends in post_load_weights, which computes the MLA absorbed matrices (w_kc, w_vc) "
    "from the loaded kv_b_proj values; a replay on probes would compute them from the old weights"
)
_GPT_OSS_REASON = (
    "not proven: SGLang 0.5.23 builds it only with a GPU attention backend (attention sinks), "
    "so the CPU test rig cannot load it; its release checkpoints are MXFP4-quantized, which "
    "upstream loads in any case"
)

SUPPORT_TABLE: Tuple[ArchitectureSupport, ...] = (
    _fast("Qwen3ForCausalLM", "qwen3", "qwen3"),
    _fast("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3_moe", moe=True),
    _fast("Qwen3_5ForCausalLM", "qwen3_5_text", "qwen3_5"),
    _fast("Qwen3_5MoeForCausalLM", "qwen3_5_text", "qwen3_5_moe", moe=True),
    _fast("Qwen3_5ForConditionalGeneration", "qwen3_5", "qwen3_5_vl"),
    _fast("Qwen3_5MoeForConditionalGeneration", "qwen3_5", "qwen3_5_moe_vl", moe=True),
    _fast("Qwen3NextForCausalLM", "qwen3_next", "qwen3_next", moe=True),
    _fast("Qwen3VLForConditionalGeneration", "qwen3_vl", "qwen3_vl"),
    _fast("Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", "qwen3_vl_moe", moe=True),
    _fast("LlamaForCausalLM", "llama", "llama"),
    _fast("Qwen2ForCausalLM", "qwen2", "qwen2"),
    _fast("Qwen2MoeForCausalLM", "qwen2_moe", "qwen2_moe", moe=True),
    _fast("MixtralForCausalLM", "mixtral", "mixtral", moe=True),
    _fast("Glm4MoeForCausalLM", "glm4_moe", "glm4_moe", moe=True),
    _fast("Gemma3ForCausalLM", "gemma3_causal", "gemma3"),
    _fallback("DeepseekV2ForCausalLM", "deepseek_v2", "", _MLA_REASON, moe=True),
    _fallback("DeepseekV3ForCausalLM", "deepseek_v2", "deepseek_v3", _MLA_REASON, moe=True),
    _fallback("GptOssForCausalLM", "gpt_oss", "gpt_oss", _GPT_OSS_REASON, moe=True),
)

_BY_CLASS: Dict[Tuple[str, str], ArchitectureSupport] = {(e.module, e.architecture): e for e in SUPPORT_TABLE}


def support_entry(model_class: type) -> Optional[ArchitectureSupport]:
    """The table's entry for exactly ``model_class`` (module and name), or None."""
    return _BY_CLASS.get((model_class.__module__, model_class.__name__))


def unsupported_architecture_reason(model_class: type) -> Optional[str]:
    """Why ``fast`` leaves ``model_class`` to upstream's loader, or None when it plans it.

    Args:
        model_class: the class of the model being loaded.

    Returns:
        None for a class listed as fast; otherwise a one-line reason for the log.
    """
    entry = support_entry(model_class)
    if entry is None:
        return f"{model_class.__name__} is not in the fast-load support table"
    if not entry.fast:
        return f"{model_class.__name__} falls back: {entry.reason}"
    return None
