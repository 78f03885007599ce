"""Synthetic bf16 safetensors checkpoints shaped like real Qwen3 / Qwen3-MoE releases.

Writes what a Hugging Face ``save_pretrained`` would: ``config.json``, shards named
``model-0000i-of-0000N.safetensors`` (tensors assigned to shards in model order, a new
shard when the next tensor would pass the shard size, names sorted inside each shard as
``safetensors`` does) and ``model.safetensors.index.json``. No tokenizer: loading only.

Content is cheap at GB scale: one random block of ``BLOCK_ELEMS`` bf16 values (drawn
once per seed) is tiled; tensor *i* starts at element ``i * STRIDE mod BLOCK_ELEMS``.
``STRIDE`` is odd and the block a power of two, so every tensor starts at a different
place: two tensors never hold the same bytes, and a loader that puts a tensor in the
wrong parameter (or a slice at the wrong offset) shows up in a bit-exact comparison.
Files are written by our own writer (JSON header + raw bytes straight from the block,
one thread per shard), with no per-tensor allocation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

BLOCK_ELEMS = 1 << 26  # 64 Mi bf16 values = 128 MiB, tiled
STRIDE = 1_000_003  # odd: i * STRIDE mod 2**26 is distinct for every tensor index < 2**26
MARKER = "bench_checkpoint.json"
FORMAT_VERSION = 1

# --------------------------------------------------------------------------------------
# model shapes
# --------------------------------------------------------------------------------------
QWEN3_8B = dict(
    hidden_size=4096,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=12288,
    vocab_size=151936,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
)
QWEN3_30B_A3B = dict(
    hidden_size=2048,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    vocab_size=151936,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
)
# Dry runs: SGLang's normal (GPU) weight-loader branches, a few MB.
TINY_DENSE = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=256,
    vocab_size=1024,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
TINY_MOE = dict(TINY_DENSE, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4)
# The CPU benchmark: Qwen3-30B-A3B's structure and tensor count (48 layers of 128 experts,
# top-8, 32/4 heads, untied: 18,867 tensors) with smaller matrices, so it fits in ~2 GB.
CPU_MOE = dict(
    hidden_size=384,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=1024,
    moe_intermediate_size=128,
    num_experts=128,
    num_experts_per_tok=8,
    vocab_size=32768,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
CPU_DENSE = dict(
    hidden_size=1024,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=4096,
    vocab_size=32768,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


@dataclasses.dataclass
class ModelSpec:
    """One synthetic model: its architecture, config values and a label."""

    kind: str  # "dense" (Qwen3ForCausalLM) or "moe" (Qwen3MoeForCausalLM)
    label: str  # e.g. "Qwen3-8B", "Qwen3-30B-A3B (24 of 48 layers)"
    cfg: Dict

    @property
    def layers(self) -> int:
        return self.cfg["num_hidden_layers"]

    def tensors(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """``(name, shape)`` of every checkpoint tensor, in model order."""
        return tensor_specs(self.kind, self.cfg)

    def nbytes(self) -> int:
        return sum(2 * math.prod(shape) for _, shape in self.tensors())

    def key(self) -> Dict:
        return {"kind": self.kind, "cfg": self.cfg, "format_version": FORMAT_VERSION}


def _attention(cfg: Dict, p: str) -> List[Tuple[str, Tuple[int, ...]]]:
    h, d = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return [
        (p + "input_layernorm.weight", (h,)),
        (p + "self_attn.q_proj.weight", (nq * d, h)),
        (p + "self_attn.k_proj.weight", (nkv * d, h)),
        (p + "self_attn.v_proj.weight", (nkv * d, h)),
        (p + "self_attn.o_proj.weight", (h, nq * d)),
        (p + "self_attn.q_norm.weight", (d,)),
        (p + "self_attn.k_norm.weight", (d,)),
        (p + "post_attention_layernorm.weight", (h,)),
    ]


def tensor_specs(kind: str, cfg: Dict) -> List[Tuple[str, Tuple[int, ...]]]:
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out: List[Tuple[str, Tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += _attention(cfg, p)
        if kind == "dense":
            inter = cfg["intermediate_size"]
            out += [
                (p + "mlp.gate_proj.weight", (inter, h)),
                (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)),
            ]
        elif kind == "moe":
            mi, ne = cfg["moe_intermediate_size"], cfg["num_experts"]
            out.append((p + "mlp.gate.weight", (ne, h)))
            for e in range(ne):
                q = f"{p}mlp.experts.{e}."
                out += [
                    (q + "gate_proj.weight", (mi, h)),
                    (q + "up_proj.weight", (mi, h)),
                    (q + "down_proj.weight", (h, mi)),
                ]
        else:
            raise ValueError(kind)
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h)))
    return out


def hf_config(kind: str, cfg: Dict) -> Dict:
    """config.json as the Qwen3 / Qwen3-MoE releases write it (sizes from ``cfg``)."""
    base = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": cfg["head_dim"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "max_window_layers": cfg["num_hidden_layers"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg["vocab_size"],
    }
    if cfg["vocab_size"] < 151936:
        base["bos_token_id"] = base["eos_token_id"] = cfg["vocab_size"] - 1
    if kind == "dense":
        base.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    else:
        base.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            norm_topk_prob=True,
            num_experts=cfg["num_experts"],
            num_experts_per_tok=cfg["num_experts_per_tok"],
            output_router_logits=False,
            router_aux_loss_coef=0.001,
        )
    return dict(sorted(base.items()))


def dense_spec(size: str = "full") -> ModelSpec:
    cfg = {"full": QWEN3_8B, "tiny": TINY_DENSE, "cpu": CPU_DENSE}[size]
    label = {"full": "Qwen3-8B", "tiny": "Qwen3 (tiny)", "cpu": "Qwen3 (CPU-bench shape)"}[size]
    return ModelSpec("dense", label, dict(cfg))


def moe_spec(size: str = "full", layers: Optional[int] = None) -> ModelSpec:
    cfg = dict({"full": QWEN3_30B_A3B, "tiny": TINY_MOE, "cpu": CPU_MOE}[size])
    full_layers = cfg["num_hidden_layers"]
    if layers is not None:
        cfg["num_hidden_layers"] = int(layers)
    name = {"full": "Qwen3-30B-A3B", "tiny": "Qwen3-MoE (tiny)", "cpu": "Qwen3-MoE (CPU-bench shape)"}[size]
    n = cfg["num_hidden_layers"]
    label = f"{name} ({n} of {full_layers} layers)" if (size == "full" and n != full_layers) else name
    return ModelSpec("moe", label, cfg)


def moe_layer_bytes(size: str = "full") -> Tuple[int, int]:
    """``(bytes of one MoE layer, bytes outside the layers)`` for sizing by free disk."""
    one = moe_spec(size, layers=1).nbytes()
    two = moe_spec(size, layers=2).nbytes()
    per_layer = two - one
    return per_layer, one - per_layer


# --------------------------------------------------------------------------------------
# content
# --------------------------------------------------------------------------------------
_BLOCKS: Dict[int, np.ndarray] = {}
_BLOCK_LOCK = threading.Lock()


def random_block(seed: int) -> np.ndarray:
    """``2 * BLOCK_ELEMS`` uint16 (bf16 bits): the block twice, so any window is contiguous."""
    with _BLOCK_LOCK:
        blk = _BLOCKS.get(seed)
        if blk is None:
            # Finite bf16 values of both signs, magnitudes 2**-11 .. 2**-4 with random
            # mantissas: built from random integers (far cheaper than normal draws).
            r = np.random.default_rng(seed).integers(0, 1 << 16, size=BLOCK_ELEMS, dtype=np.uint16)
            exponent = (np.uint16(0x74) + ((r >> np.uint16(7)) & np.uint16(7))) << np.uint16(7)
            half = (r & np.uint16(0x807F)) | exponent
            blk = np.concatenate([half, half])
            _BLOCKS[seed] = blk
        return blk


def tensor_start(index: int) -> int:
    return (index * STRIDE) % BLOCK_ELEMS


def tensor_pieces(block: np.ndarray, index: int, numel: int):
    """Views of ``block`` whose concatenation is tensor ``index``'s ``numel`` bf16 values."""
    pos = tensor_start(index)
    left = numel
    while left:
        take = min(left, BLOCK_ELEMS)
        yield block[pos : pos + take]
        pos = (pos + take) % BLOCK_ELEMS
        left -= take


def expected_bits(seed: int, index: int, numel: int) -> np.ndarray:
    """The uint16 bit pattern tensor ``index`` holds (for checks; allocates)."""
    return np.concatenate(list(tensor_pieces(random_block(seed), index, numel)))


# --------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckpointInfo:
    directory: str
    label: str
    kind: str
    layers: int
    files: List[str]
    tensors: int
    nbytes: int  # bytes of every file (headers included)
    tensor_bytes: int
    write_s: float = 0.0
    sync_s: float = 0.0
    reused: bool = False

    def as_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d["files"] = [os.path.basename(f) for f in self.files]
        d["gb"] = round(self.nbytes / 1e9, 3)
        return d


def _layout(spec: ModelSpec, shard_bytes: int):
    """Shards: lists of ``(global index, name, shape)``, in model order across shards."""
    shards: List[List[Tuple[int, str, Tuple[int, ...]]]] = [[]]
    size = 0
    for i, (name, shape) in enumerate(spec.tensors()):
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((i, name, shape))
        size += n
    return shards


def _header(entries) -> Tuple[bytes, List[Tuple[int, int, Tuple[int, ...]]]]:
    """safetensors header for ``entries`` sorted by name; returns (bytes, [(index, numel)])."""
    meta = {"__metadata__": {"format": "pt"}}
    order = []
    off = 0
    for i, name, shape in sorted(entries, key=lambda e: e[1]):
        numel = math.prod(shape)
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + 2 * numel]}
        order.append((i, numel, shape))
        off += 2 * numel
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        n = os.write(fd, view)
        view = view[n:]


def _write_shard(path: str, entries, block: np.ndarray) -> int:
    header, order = _header(entries)
    tmp = path + ".partial"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, memoryview(header))
        written = len(header)
        for i, numel, _ in order:
            for piece in tensor_pieces(block, i, numel):
                _write_all(fd, memoryview(piece).cast("B"))
                written += piece.nbytes
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return written


def _existing(directory: str, spec: ModelSpec, seed: int, shard_bytes: int) -> Optional[Dict]:
    try:
        with open(os.path.join(directory, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if marker.get("key") != spec.key() or marker.get("seed") != seed or marker.get("shard_bytes") != shard_bytes:
        return None
    for name, size in marker.get("files", {}).items():
        try:
            if os.path.getsize(os.path.join(directory, name)) != size:
                return None
        except OSError:
            return None
    return marker


def write_checkpoint(
    directory: str,
    spec: ModelSpec,
    *,
    seed: int = 1,
    shard_bytes: int = 5 * 10**9,
    threads: int = 8,
    reuse: bool = True,
    sync: bool = True,
    log=print,
) -> CheckpointInfo:
    """Write (or reuse an identical earlier) checkpoint of ``spec`` into ``directory``."""
    shards = _layout(spec, shard_bytes)
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    paths = [os.path.join(directory, nm) for nm in names]
    tensor_bytes = spec.nbytes()
    ntensors = sum(len(s) for s in shards)
    marker = _existing(directory, spec, seed, shard_bytes) if reuse else None
    if marker is not None:
        total = sum(marker["files"].values())
        log(f"reusing {directory}: {spec.label}, {n} files, {ntensors} tensors, {total / 1e9:.2f} GB")
        return CheckpointInfo(directory, spec.label, spec.kind, spec.layers, paths, ntensors, total, tensor_bytes, reused=True)

    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)
    t0 = time.perf_counter()
    block = random_block(seed)
    t_block = time.perf_counter() - t0
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(spec.kind, spec.cfg), f, indent=2)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": [151645, 151643], "transformers_version": "4.51.0"}, f)
    weight_map = {name: names[k] for k, shard in enumerate(shards) for _, name, _ in shard}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": tensor_bytes}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, n))) as pool:
        sizes = list(pool.map(lambda k: _write_shard(paths[k], shards[k], block), range(n)))
    write_s = time.perf_counter() - t0
    sync_s = 0.0
    if sync:
        t1 = time.perf_counter()
        os.sync()
        sync_s = time.perf_counter() - t1
    with open(os.path.join(directory, MARKER), "w") as f:
        json.dump(
            {"key": spec.key(), "seed": seed, "shard_bytes": shard_bytes, "label": spec.label,
             "files": dict(zip(names, sizes))},
            f,
            indent=2,
        )
    total = sum(sizes)
    log(
        f"wrote {directory}: {spec.label}, {n} files, {ntensors} tensors, {total / 1e9:.2f} GB in "
        f"{write_s:.1f} s ({total / 1e9 / max(write_s, 1e-9):.2f} GB/s; random block {t_block:.1f} s), sync {sync_s:.1f} s"
    )
    return CheckpointInfo(directory, spec.label, spec.kind, spec.layers, paths, ntensors, total, tensor_bytes, write_s, sync_s)


def verify_checkpoint(info: CheckpointInfo, spec: ModelSpec, *, seed: int = 1, max_tensors: Optional[int] = None) -> Dict:
    """Open every file with ``safetensors.safe_open`` and compare tensors with the generator.

    Checks names, shapes, dtypes and (for up to ``max_tensors`` tensors spread over the
    model, all when None) the exact bits. Returns a small report; raises AssertionError.
    """
    import torch
    from safetensors import safe_open

    expected = {name: (i, shape) for i, (name, shape) in enumerate(spec.tensors())}
    seen = {}
    for path in info.files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                seen[key] = path
    assert set(seen) == set(expected), f"tensor names differ: {sorted(set(seen) ^ set(expected))[:5]}"
    names = list(expected)
    if max_tensors is not None and max_tensors < len(names):
        step = len(names) / max_tensors
        names = [names[int(k * step)] for k in range(max_tensors)] + [names[-1]]
    checked = 0
    for name in names:
        i, shape = expected[name]
        with safe_open(seen[name], framework="pt") as f:
            t = f.get_tensor(name)
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == tuple(shape), (name, t.dtype, t.shape, shape)
        want = expected_bits(seed, i, math.prod(shape))
        got = t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
        assert np.array_equal(got, want), f"{name}: content differs from the generator"
        checked += 1
    return {"files": len(info.files), "tensors": len(seen), "bits_checked": checked}
