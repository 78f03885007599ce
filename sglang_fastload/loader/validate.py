"""Checks run on a whole checkpoint before the first byte is written into any parameter."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Mapping, Tuple

from sglang_fastload.errors import CheckpointError, CheckpointMismatchError

# Tensors upstream's Qwen3 loaders skip on purpose; never "unknown".
KNOWN_SKIPS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def is_known_skip(name: str) -> bool:
    return any(s in name for s in KNOWN_SKIPS)


def check_config(directory: str, architecture: str) -> None:
    """The directory's config.json must exist and name the served architecture.

    Raises:
        CheckpointError: missing/unreadable config.json, or another architecture.
    """
    path = os.path.join(directory, "config.json")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        raise CheckpointError(path, "missing: a checkpoint directory needs its config.json") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"unreadable: {exc}") from None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(archs, list) or architecture not in archs:
        raise CheckpointError(
            path, f"describes architectures {archs!r}, but the server runs {architecture}"
        )


def check_against_reference(
    tensors: Mapping[str, Tuple[str, Tuple[int, ...], str]],
    reference: Mapping[str, Tuple[Tuple[int, ...], str]],
    directory: str,
) -> None:
    """An update must carry exactly the tensors, shapes and dtypes the model was loaded with.

    Args:
        tensors: ``{name: (file, shape, safetensors dtype)}`` of the new checkpoint.
        reference: ``{name: (shape, dtype)}`` of the checkpoint first loaded.
        directory: the new checkpoint's directory (for messages).

    Raises:
        CheckpointMismatchError: the first problem found, naming file and tensor.
    """
    for name in sorted(reference.keys() - tensors.keys()):
        raise CheckpointMismatchError(
            directory, "missing: the served model was loaded with it", tensor=name
        )
    for name in sorted(tensors.keys() - reference.keys()):
        if not is_known_skip(name):
            raise CheckpointMismatchError(
                tensors[name][0], "unknown: the served model has no such tensor", tensor=name
            )
    for name, (path, shape, dtype) in sorted(tensors.items()):
        ref = reference.get(name)
        if ref is None:
            continue
        if tuple(shape) != tuple(ref[0]):
            raise CheckpointMismatchError(
                path, f"has shape {list(shape)}, the model expects {list(ref[0])}", tensor=name
            )
        if dtype != ref[1]:
            raise CheckpointMismatchError(
                path, f"has dtype {dtype}, the model expects {ref[1]}", tensor=name
            )


def check_coverage(
    param_numels: Mapping[str, int],
    written: Mapping[str, int],
    directory: str,
    ignore: Iterable[str] = (),
) -> None:
    """Every parameter must be fully written by the checkpoint (padding zero-fills count).

    Raises:
        CheckpointMismatchError: naming the first parameter no tensor (fully) feeds.
    """
    ignored = set(ignore)
    for name, n in sorted(param_numels.items()):
        if name in ignored:
            continue
        got = written.get(name, 0)
        if got == 0:
            raise CheckpointMismatchError(
                directory, f"no tensor in the checkpoint feeds parameter {name!r} (missing tensor)"
            )
        if got < n:
            raise CheckpointMismatchError(
                directory,
                f"parameter {name!r} is only partly fed ({got} of {n} elements; missing tensor)",
            )
