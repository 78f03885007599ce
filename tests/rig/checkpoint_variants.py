"""Derive a checkpoint from another, the way trainers and checkpoint managers vary them.

    derive(b, tmp / "b-f32", convert=to_dtype(torch.float32))          # fp32 master weights
    derive(b, tmp / "b-mixed", convert=to_dtype(torch.float32, norms_only=True))
    derive(a, tmp / "a-vhead", add={"v_head.summary.weight": torch.zeros(1, 128)})
    derive(b, tmp / "b-weights", copy_config=False)                     # shards + index only
    derive(b, tmp / "step-12", link=[first_shard_name])                 # link to b's file

Shard names, tensor order within each shard and the index stay as in the source, so only
the property under test changes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.rig.checkpoints import safetensors_files

INDEX_NAME = "model.safetensors.index.json"
Convert = Callable[[str, torch.Tensor], torch.Tensor]


def to_dtype(dtype: torch.dtype, *, norms_only: bool = False, names: Optional[Iterable[str]] = None) -> Convert:
    """A converter casting every tensor (or only norms, or only ``names``) to ``dtype``."""
    wanted = set(names) if names is not None else None

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        if wanted is not None and name not in wanted:
            return t
        if norms_only and "norm" not in name:
            return t
        return t.to(dtype)

    return convert


def first_matrix(ckpt) -> str:
    """Name of the first 2-D non-norm tensor in the checkpoint's first shard."""
    with safe_open(str(safetensors_files(ckpt)[0]), framework="pt") as f:
        return next(k for k in sorted(f.keys()) if len(f.get_slice(k).get_shape()) == 2 and "norm" not in k)


def derive(
    src,
    dst,
    *,
    convert: Optional[Convert] = None,
    add: Optional[Dict[str, torch.Tensor]] = None,
    drop: Iterable[str] = (),
    copy_config: bool = True,
    link: Iterable[str] = (),
    index_edit: Optional[Callable[[Dict[str, str]], Dict[str, str]]] = None,
) -> Path:
    """Write ``dst``: ``src``'s shards with tensors converted, added or dropped.

    Args:
        convert: ``(name, tensor) -> tensor`` applied to every tensor.
        add: extra tensors, appended to the last shard (and the index).
        drop: tensor names left out (and removed from the index).
        copy_config: False writes a weights-only directory (shards and index, no
            config.json, tokenizer or generation config).
        link: shard file names written as relative symlinks to ``src``'s files instead.
        index_edit: ``weight map -> weight map`` applied to the index written (one that no
            longer tells where the tensors are, as a trainer's copy of another save's index).
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    drop = set(drop)
    link = set(link)
    shards = safetensors_files(src)
    placed: Dict[str, str] = {}
    for i, shard in enumerate(shards):
        if shard.name in link:
            os.symlink(os.path.relpath(shard, dst), dst / shard.name)
            with safe_open(str(shard), framework="pt") as f:
                placed.update({k: shard.name for k in f.keys()})
            continue
        with safe_open(str(shard), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        if convert is not None:
            tensors = {k: convert(k, t).contiguous() for k, t in tensors.items()}
        if add and i == len(shards) - 1:
            tensors.update(add)
        save_file(tensors, str(dst / shard.name), metadata=metadata)
        placed.update({k: shard.name for k in tensors})
    if (src / INDEX_NAME).exists():
        index = json.loads((src / INDEX_NAME).read_text())
        index["weight_map"] = dict(sorted(placed.items()))
        if index_edit is not None:
            index["weight_map"] = index_edit(index["weight_map"])
        (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if copy_config:
        for p in src.iterdir():
            if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX_NAME:
                shutil.copy2(p, dst / p.name)
    return dst


def write_bin_copy(src, dst) -> Path:
    """``src`` as a PyTorch ``pytorch_model.bin`` checkpoint (what older trainers save)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    tensors = {}
    for shard in safetensors_files(src):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    torch.save(tensors, dst / "pytorch_model.bin")
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX_NAME:
            shutil.copy2(p, dst / p.name)
    return dst
