"""TEST-ONLY ``vllm._custom_ops`` stand-in, mapped onto SGLang's own pure-torch code.

Without ``SGLANG_USE_CPU_ENGINE`` (which the rig leaves unset so the linear/MoE weight
loaders take their normal GPU branches), SGLang 0.5.23 treats the host as "not CPU" and
``RotaryEmbedding.__init__`` imports ``vllm._custom_ops.rotary_embedding`` as its fallback
kernel. This module provides that function (and vllm's two RMSNorm entry points) with
vllm's in-place calling conventions, computed by SGLang's ``apply_rotary_emb`` and the
same float32 arithmetic as SGLang's ``RMSNorm.forward_native``. Any other name raises
``ImportError`` on ``from vllm._custom_ops import ...``, as if vllm were absent.
"""

from __future__ import annotations


def rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox):
    """vllm's in-place ``rotary_embedding(positions, query, key, head_size, cache, is_neox)``."""
    from sglang.srt.layers.rotary_embedding.utils import apply_rotary_emb

    positions = positions.flatten()
    num_tokens = positions.shape[0]
    cos_sin = cos_sin_cache.index_select(0, positions)
    cos, sin = cos_sin.chunk(2, dim=-1)
    rot_dim = cos_sin_cache.shape[-1]
    for x in (query, key):
        if x is None:
            continue
        view = x.view(num_tokens, -1, head_size)
        view[..., :rot_dim] = apply_rotary_emb(view[..., :rot_dim], cos, sin, is_neox)


def rms_norm(out, input, weight, eps):
    """vllm's ``rms_norm(out, input, weight, eps)``: writes into ``out``."""
    import torch

    x = input.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    out.copy_((x * weight.to(torch.float32)).to(out.dtype))


def fused_add_rms_norm(input, residual, weight, eps):
    """vllm's in-place ``fused_add_rms_norm``: ``residual += input``; ``input = norm(residual)``."""
    import torch

    summed = input.to(torch.float32) + residual.to(torch.float32)
    residual.copy_(summed.to(residual.dtype))
    x = summed * torch.rsqrt(summed.pow(2).mean(dim=-1, keepdim=True) + eps)
    input.copy_((x * weight.to(torch.float32)).to(input.dtype))


def fill_custom_ops(module) -> None:
    module.rotary_embedding = rotary_embedding
    module.rms_norm = rms_norm
    module.fused_add_rms_norm = fused_add_rms_norm
