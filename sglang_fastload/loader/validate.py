"""Checks run on a whole checkpoint before the first byte is written into any parameter."""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

from sglang_fastload.errors import CheckpointError, CheckpointMismatchError

# Tensors upstream's Qwen3 loaders skip on purpose: ignored without a warning.
KNOWN_SKIPS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def is_known_skip(name: str) -> bool:
    return any(s in name for s in KNOWN_SKIPS)


def check_config(directory: str, architecture: str) -> None:
    """A config.json in the directory must name the served architecture.

    A weights-only directory (no config.json) is loaded with the served model's config, as
    upstream does: the model it loads into is already built, and the replay checks every
    tensor against it.

    Raises:
        CheckpointError: an unreadable config.json, or one naming other architectures.
    """
    path = os.path.join(directory, "config.json")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(1 << 20))
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"unreadable: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(path, f"unreadable: a JSON object was expected, got {type(config).__name__}")
    archs = config.get("architectures")
    if archs is None:
        return  # names no architecture, so none that differs
    if not isinstance(archs, list) or architecture not in archs:
        raise CheckpointError(
            path, f"describes architectures {archs!r}, but the server runs {architecture}"
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
