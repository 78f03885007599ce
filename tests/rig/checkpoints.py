"""Factory of tiny random Hugging Face style checkpoints for the tests (bf16 safetensors).

Every writer produces a directory with ``config.json`` (shaped like the real releases'),
``generation_config.json``, a tiny byte-level BPE tokenizer whose vocabulary has exactly
``vocab_size`` entries (so any id a random model emits detokenizes), and the weights in
one of these layouts:

``single``            one ``model.safetensors``
``sharded``           ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``,
                      tensors in natural (layer) order, split between whole layers
``split_layer``       like ``sharded`` but one layer's tensors are split over two shards
``shuffled_shards``   like ``sharded`` but the shard numbering runs against the layer order
                      (layer 0 lives in the last shard, the final norm in the first)
``shuffled_tensors``  the byte order of the tensors inside each file is a random
                      permutation (files written by hand: ``safetensors.save_file`` always
                      lays tensors out sorted by dtype alignment and name)

The tensors depend only on ``(seed, tensor name, shape)``: a layout or shard count never
changes the weights, the same seed gives byte-identical files, and two seeds give two
different checkpoints (A/B pairs for update tests).
"""

from __future__ import annotations

import functools
import json
import os
import random
import struct
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = [
    "LAYOUTS",
    "QWEN3_DEFAULTS",
    "QWEN3_MOE_DEFAULTS",
    "LLAMA_DEFAULTS",
    "QWEN2_DEFAULTS",
    "write_qwen3",
    "write_qwen3_moe",
    "write_llama",
    "write_qwen2",
    "write_checkpoint",
    "load_tensors",
    "expected_tensors",
    "checkpoint_bytes",
    "safetensors_files",
    "write_safetensors_ordered",
    "tokenizer_files",
    "expected_sglang_params",
]

LAYOUTS = ("single", "sharded", "split_layer", "shuffled_shards", "shuffled_tensors")

# Sizes keep SGLang's normal (GPU) weight-loader branches: heads and kv heads divide by
# TP 1/2 (and kv heads by 2 so TP=4 replicates them), intermediate sizes are multiples of
# 4*32, the vocabulary needs no padding. Override any of them per call.
_COMMON = dict(
    vocab_size=1024,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
)
QWEN3_DEFAULTS = dict(_COMMON)
QWEN3_MOE_DEFAULTS = dict(
    _COMMON,
    moe_intermediate_size=128,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
LLAMA_DEFAULTS = dict(_COMMON, rope_theta=10000.0, rms_norm_eps=1e-5)
QWEN2_DEFAULTS = dict(_COMMON)

# Token ids of the special tokens (the last ids of every tokenizer built here).
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


# --------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------
def _tensor(seed: int, name: str, shape: Sequence[int], kind: str) -> torch.Tensor:
    """A deterministic bf16 tensor for ``name`` (independent of every other tensor)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float32)
    if kind == "norm":
        x = 1.0 + 0.1 * x
    elif kind == "bias":
        x = 0.05 * x
    else:  # matrices: std 1/sqrt(fan_in) keeps activations and logits O(1) -> clear argmax
        fan_in = shape[-1] if len(shape) > 1 else 1
        if kind == "embed":
            fan_in = 1
        x = x / (fan_in**0.5)
    return x.to(torch.bfloat16).contiguous()


def _dense_layer_specs(cfg: dict, i: int, *, qk_norm: bool, qkv_bias: bool) -> List[tuple]:
    h, d = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv, inter = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    p = f"model.layers.{i}."
    specs = [
        (p + "input_layernorm.weight", (h,), "norm"),
        (p + "self_attn.q_proj.weight", (nq * d, h), "matrix"),
        (p + "self_attn.k_proj.weight", (nkv * d, h), "matrix"),
        (p + "self_attn.v_proj.weight", (nkv * d, h), "matrix"),
    ]
    if qkv_bias:
        specs += [
            (p + "self_attn.q_proj.bias", (nq * d,), "bias"),
            (p + "self_attn.k_proj.bias", (nkv * d,), "bias"),
            (p + "self_attn.v_proj.bias", (nkv * d,), "bias"),
        ]
    specs.append((p + "self_attn.o_proj.weight", (h, nq * d), "matrix"))
    if qk_norm:
        specs += [(p + "self_attn.q_norm.weight", (d,), "norm"), (p + "self_attn.k_norm.weight", (d,), "norm")]
    specs.append((p + "post_attention_layernorm.weight", (h,), "norm"))
    specs += [
        (p + "mlp.gate_proj.weight", (inter, h), "matrix"),
        (p + "mlp.up_proj.weight", (inter, h), "matrix"),
        (p + "mlp.down_proj.weight", (h, inter), "matrix"),
    ]
    return specs


def _moe_layer_specs(cfg: dict, i: int) -> List[tuple]:
    specs = _dense_layer_specs(cfg, i, qk_norm=True, qkv_bias=False)
    if not _is_sparse_layer(cfg, i):
        return specs
    h, inter, ne = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"]
    p = f"model.layers.{i}.mlp."
    specs = [s for s in specs if not s[0].startswith(p)]
    specs.append((p + "gate.weight", (ne, h), "matrix"))
    for e in range(ne):
        q = f"{p}experts.{e}."
        specs += [
            (q + "gate_proj.weight", (inter, h), "matrix"),
            (q + "up_proj.weight", (inter, h), "matrix"),
            (q + "down_proj.weight", (h, inter), "matrix"),
        ]
    return specs


def _is_sparse_layer(cfg: dict, i: int) -> bool:
    step = cfg.get("decoder_sparse_step", 1) or 1
    return i not in (cfg.get("mlp_only_layers") or []) and cfg["num_experts"] > 0 and (i + 1) % step == 0


def _layer_specs(arch: str, cfg: dict, tied: bool) -> List[List[tuple]]:
    """Groups in natural order: [embed], one group per layer, [final norm (+ lm_head)]."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    groups = [[("model.embed_tokens.weight", (v, h), "embed")]]
    for i in range(cfg["num_hidden_layers"]):
        if arch == "qwen3":
            groups.append(_dense_layer_specs(cfg, i, qk_norm=True, qkv_bias=False))
        elif arch == "qwen3_moe":
            groups.append(_moe_layer_specs(cfg, i))
        elif arch == "qwen2":
            groups.append(_dense_layer_specs(cfg, i, qk_norm=False, qkv_bias=True))
        elif arch == "llama":
            groups.append(_dense_layer_specs(cfg, i, qk_norm=False, qkv_bias=False))
        else:
            raise ValueError(arch)
    last = [("model.norm.weight", (h,), "norm")]
    if not tied:
        last.append(("lm_head.weight", (v, h), "matrix"))
    groups.append(last)
    return groups


# --------------------------------------------------------------------------------------
# configs and tokenizer
# --------------------------------------------------------------------------------------
def _config(arch: str, cfg: dict, tied: bool) -> dict:
    eos = cfg["vocab_size"] - len(_SPECIALS)  # <|endoftext|>
    base = {
        "attention_dropout": 0.0,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_scaling": None,
        "rope_theta": cfg["rope_theta"],
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }
    if arch in ("qwen3", "qwen3_moe", "qwen2"):
        base.update(
            head_dim=cfg["head_dim"],
            max_window_layers=cfg["num_hidden_layers"],
            sliding_window=None,
            use_sliding_window=False,
        )
    if arch == "qwen3":
        base.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False)
    elif arch == "qwen3_moe":
        base.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            attention_bias=False,
            decoder_sparse_step=cfg["decoder_sparse_step"],
            mlp_only_layers=list(cfg["mlp_only_layers"]),
            moe_intermediate_size=cfg["moe_intermediate_size"],
            norm_topk_prob=cfg["norm_topk_prob"],
            num_experts=cfg["num_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"],
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
    elif arch == "qwen2":
        base.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        del base["head_dim"]  # Qwen2 derives it from hidden / heads
    elif arch == "llama":
        base.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            attention_bias=False,
            mlp_bias=False,
            head_dim=cfg["head_dim"],
            pretraining_tp=1,
        )
    for key, value in cfg.get("extra_config", {}).items():
        base[key] = value
    return dict(sorted(base.items()))


@functools.lru_cache(maxsize=None)
def tokenizer_files(vocab_size: int) -> Dict[str, str]:
    """``{file name: text}`` of a byte-level BPE tokenizer with exactly ``vocab_size`` ids.

    Built once per vocabulary size and process: trained on a fixed synthetic corpus, then
    topped up with filler tokens so every id below ``vocab_size`` decodes. The special
    tokens take the last ids (``<|endoftext|>`` is the eos/pad token).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(_SPECIALS) + 8:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer")
    rng = random.Random(1234)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(600)]
    corpus = [" ".join(rng.choice(words) for _ in range(24)) for _ in range(400)]
    corpus += ["The quick brown fox jumps over the lazy dog. Hello world! 0123456789"] * 20

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_regular = vocab_size - len(_SPECIALS)
    trainer = trainers.BpeTrainer(
        vocab_size=n_regular,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    filler = 0
    while tok.get_vocab_size() < n_regular:
        tok.add_tokens([f"<|filler_{filler}|>"])
        filler += 1
    tok.add_special_tokens(list(_SPECIALS))
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    assert tok.token_to_id(_SPECIALS[0]) == vocab_size - len(_SPECIALS)
    tokenizer_json = tok.to_str()
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": _SPECIALS[0],
        "model_max_length": 2048,
        "pad_token": _SPECIALS[0],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_map = {"eos_token": _SPECIALS[0], "pad_token": _SPECIALS[0]}
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2, sort_keys=True) + "\n",
    }


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
_ST_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors_ordered(path, tensors: Dict[str, torch.Tensor], order: Sequence[str], metadata=None) -> None:
    """Write a valid safetensors file whose data bytes follow ``order`` (not name order).

    ``safetensors.torch.save_file`` always sorts tensors by dtype alignment and name; this
    writer keeps the header's key order and the data offsets in ``order`` instead.
    """
    assert sorted(order) == sorted(tensors), "order must list every tensor exactly once"
    header, offset, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    for name in order:
        t = tensors[name].contiguous()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def _split_even(items: list, n: int) -> List[list]:
    """Split ``items`` into ``n`` non-empty contiguous chunks (sizes differ by at most 1)."""
    n = max(1, min(n, len(items)))
    k, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


def _plan_shards(groups: List[List[tuple]], layout: str, num_shards: Optional[int], num_layers: int) -> List[List[str]]:
    """Return the tensor names of each shard file, in file order (shard 1 first)."""
    if layout == "single" or (layout == "shuffled_tensors" and not num_shards):
        return [[name for g in groups for name, _, _ in g]]
    if layout == "split_layer":
        split = max(0, min(num_layers - 1, num_layers // 2))
        layer = groups[1 + split]
        cut = next(i for i, (n, _, _) in enumerate(layer) if n.endswith("post_attention_layernorm.weight"))
        first = [n for g in groups[: 1 + split] for n, _, _ in g] + [n for n, _, _ in layer[:cut]]
        second = [n for n, _, _ in layer[cut:]] + [n for g in groups[2 + split :] for n, _, _ in g]
        if num_shards and num_shards > 2:
            # Keep the straddling layer on the boundary of shards k and k+1.
            head = _split_even(first, max(1, (num_shards - 1) // 2 + ((num_shards - 1) % 2)))
            tail = _split_even(second, max(1, num_shards - len(head)))
            return head + tail
        return [first, second]
    n = num_shards or min(len(groups), 3)
    shards = [[name for g in chunk for name, _, _ in g] for chunk in _split_even(groups, n)]
    if layout == "shuffled_shards":
        shards.reverse()  # layer 0 ends up in the last file, the final norm in the first
    return shards


def write_checkpoint(
    out_dir,
    *,
    arch: str,
    seed: int,
    tied: bool = False,
    layout: str = "single",
    num_shards: Optional[int] = None,
    sizes: Optional[dict] = None,
) -> Path:
    """Write a checkpoint of ``arch`` ("qwen3", "qwen3_moe", "llama", "qwen2") to ``out_dir``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    defaults = {
        "qwen3": QWEN3_DEFAULTS,
        "qwen3_moe": QWEN3_MOE_DEFAULTS,
        "llama": LLAMA_DEFAULTS,
        "qwen2": QWEN2_DEFAULTS,
    }[arch]
    cfg = dict(defaults)
    for key, value in (sizes or {}).items():
        if key not in cfg and key not in ("num_experts", "extra_config"):
            raise TypeError(f"unknown size override {key!r} for {arch}")
        cfg[key] = value
    if arch == "qwen2":
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.safetensors")) + list(out.glob("*.safetensors.index.json")):
        stale.unlink()

    groups = _layer_specs(arch, cfg, tied)
    specs = {name: (shape, kind) for g in groups for name, shape, kind in g}
    shards = _plan_shards(groups, layout, num_shards, cfg["num_hidden_layers"])
    meta = {"format": "pt"}
    if len(shards) == 1:
        files = ["model.safetensors"]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for fname, names in zip(files, shards):
        tensors = {name: _tensor(seed, name, *specs[name]) for name in names}
        if layout == "shuffled_tensors":
            order = list(names)
            random.Random(seed * 7919 + zlib.crc32(fname.encode())).shuffle(order)
            if order == sorted(order) and len(order) > 1:
                order.reverse()
            write_safetensors_ordered(out / fname, tensors, order, metadata=meta)
        else:
            from safetensors.torch import save_file

            save_file(tensors, str(out / fname), metadata=meta)
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config = _config(arch, cfg, tied)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = config["eos_token_id"]
    gen = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False, "transformers_version": "4.51.0"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    for name, text in tokenizer_files(cfg["vocab_size"]).items():
        (out / name).write_text(text)
    return out


def write_qwen3(out_dir, *, tied: bool, seed: int, layout: str = "single", num_shards: Optional[int] = None, **size_overrides) -> Path:
    """Tiny Qwen3ForCausalLM (q/k norms; ``lm_head.weight`` absent when ``tied``)."""
    return write_checkpoint(out_dir, arch="qwen3", seed=seed, tied=tied, layout=layout, num_shards=num_shards, sizes=size_overrides)


def write_qwen3_moe(
    out_dir,
    *,
    seed: int,
    num_experts: int = 8,
    layout: str = "single",
    tied: bool = False,
    num_shards: Optional[int] = None,
    **size_overrides,
) -> Path:
    """Tiny Qwen3MoeForCausalLM: ``num_experts`` experts, top-2, every layer sparse by default."""
    sizes = dict(size_overrides, num_experts=num_experts)
    return write_checkpoint(out_dir, arch="qwen3_moe", seed=seed, tied=tied, layout=layout, num_shards=num_shards, sizes=sizes)


def write_llama(out_dir, *, seed: int, tied: bool = False, layout: str = "single", num_shards: Optional[int] = None, **size_overrides) -> Path:
    """Tiny LlamaForCausalLM (a non-Qwen3 architecture)."""
    return write_checkpoint(out_dir, arch="llama", seed=seed, tied=tied, layout=layout, num_shards=num_shards, sizes=size_overrides)


def write_qwen2(out_dir, *, seed: int, tied: bool = False, layout: str = "single", num_shards: Optional[int] = None, **size_overrides) -> Path:
    """Tiny Qwen2ForCausalLM (q/k/v biases, no q/k norms; a non-Qwen3 architecture)."""
    return write_checkpoint(out_dir, arch="qwen2", seed=seed, tied=tied, layout=layout, num_shards=num_shards, sizes=size_overrides)


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def safetensors_files(ckpt_dir) -> List[Path]:
    """The checkpoint's ``*.safetensors`` files, sorted by name."""
    return sorted(Path(ckpt_dir).glob("*.safetensors"))


def load_tensors(ckpt_dir) -> Dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by name (CPU, as stored)."""
    from safetensors.torch import load_file

    out: Dict[str, torch.Tensor] = {}
    for f in safetensors_files(ckpt_dir):
        for name, t in load_file(str(f)).items():
            assert name not in out, f"{name} appears in two shards"
            out[name] = t
    return out


def expected_tensors(ckpt_dir) -> Dict[str, torch.Tensor]:
    """Alias of :func:`load_tensors` (the checkpoint is the ground truth)."""
    return load_tensors(ckpt_dir)


def checkpoint_bytes(ckpt_dir) -> int:
    """Total size in bytes of the checkpoint's ``*.safetensors`` files (headers included)."""
    return sum(os.path.getsize(f) for f in safetensors_files(ckpt_dir))


# --------------------------------------------------------------------------------------
# an independent oracle: what SGLang's parameters should hold after loading a checkpoint
# --------------------------------------------------------------------------------------
def _rows(t: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
    n = t.shape[0] // parts
    return t[rank * n : (rank + 1) * n]


def _cols(t: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
    n = t.shape[1] // parts
    return t[:, rank * n : (rank + 1) * n]


def expected_sglang_params(ckpt_dir, *, tp_size: int = 1, rank: int = 0, ep_size: int = 1) -> Dict[str, torch.Tensor]:
    """The parameters SGLang's Qwen3 / Qwen3-MoE / Llama / Qwen2 classes should hold on ``rank``.

    Computed from the checkpoint alone (no SGLang code): fused ``qkv_proj`` (q, k, v row
    shards; kv heads replicated when ``tp_size`` exceeds them), fused ``gate_up_proj``,
    row/column shards of the other linears, vocab-row shards of the embedding and
    ``lm_head`` (``lm_head.weight`` is the embedding when tied), replicated norms and MoE
    router, and ``experts.w13_weight``/``w2_weight`` holding this rank's experts (EP) and
    intermediate slice (MoE-TP = tp_size / ep_size). Valid for the aligned sizes this
    module writes (no vocabulary or intermediate padding).
    """
    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    ckpt = load_tensors(ckpt_dir)
    tp, r = tp_size, rank
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // nq
    if cfg["vocab_size"] % (64 * tp) and cfg["vocab_size"] % tp:
        raise ValueError("oracle assumes a vocabulary that needs no padding")
    out: Dict[str, torch.Tensor] = {}
    out["model.embed_tokens.weight"] = _rows(ckpt["model.embed_tokens.weight"], r, tp)
    out["lm_head.weight"] = _rows(ckpt.get("lm_head.weight", ckpt["model.embed_tokens.weight"]), r, tp)
    out["model.norm.weight"] = ckpt["model.norm.weight"]
    kv_rank, kv_parts = (r, tp) if tp <= nkv else (r // (tp // nkv), nkv)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = ckpt[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = ckpt[p + "post_attention_layernorm.weight"]
        out[a + "qkv_proj.weight"] = torch.cat(
            [
                _rows(ckpt[a + "q_proj.weight"], r, tp),
                _rows(ckpt[a + "k_proj.weight"], kv_rank, kv_parts),
                _rows(ckpt[a + "v_proj.weight"], kv_rank, kv_parts),
            ]
        )
        if a + "q_proj.bias" in ckpt:
            out[a + "qkv_proj.bias"] = torch.cat(
                [
                    _rows(ckpt[a + "q_proj.bias"], r, tp),
                    _rows(ckpt[a + "k_proj.bias"], kv_rank, kv_parts),
                    _rows(ckpt[a + "v_proj.bias"], kv_rank, kv_parts),
                ]
            )
        out[a + "o_proj.weight"] = _cols(ckpt[a + "o_proj.weight"], r, tp)
        for norm in ("q_norm", "k_norm"):
            if f"{a}{norm}.weight" in ckpt:
                out[f"{a}{norm}.weight"] = ckpt[f"{a}{norm}.weight"]
        m = p + "mlp."
        if m + "gate.weight" in ckpt:
            ne = cfg["num_experts"]
            moe_tp, ep_rank, moe_tp_rank = tp // ep_size, r // (tp // ep_size), r % (tp // ep_size)
            local = range(ep_rank * ne // ep_size, (ep_rank + 1) * ne // ep_size)
            out[m + "gate.weight"] = ckpt[m + "gate.weight"]
            out[m + "experts.w13_weight"] = torch.stack(
                [
                    torch.cat(
                        [
                            _rows(ckpt[f"{m}experts.{e}.gate_proj.weight"], moe_tp_rank, moe_tp),
                            _rows(ckpt[f"{m}experts.{e}.up_proj.weight"], moe_tp_rank, moe_tp),
                        ]
                    )
                    for e in local
                ]
            )
            out[m + "experts.w2_weight"] = torch.stack(
                [_cols(ckpt[f"{m}experts.{e}.down_proj.weight"], moe_tp_rank, moe_tp) for e in local]
            )
        else:
            out[m + "gate_up_proj.weight"] = torch.cat(
                [_rows(ckpt[m + "gate_proj.weight"], r, tp), _rows(ckpt[m + "up_proj.weight"], r, tp)]
            )
            out[m + "down_proj.weight"] = _cols(ckpt[m + "down_proj.weight"], r, tp)
    return {k: v.contiguous() for k, v in out.items()}
