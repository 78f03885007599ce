"""Checks run on a whole checkpoint before the first byte is written into any parameter."""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional

from sglang_fastload.errors import CheckpointMismatchError

# Tensors upstream's Qwen3 loaders skip on purpose: ignored without a warning.
KNOWN_SKIPS = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# A model's config.json is a few KB; only its "architectures" entry is looked at.
CONFIG_READ_BYTES = 1 << 20


def is_known_skip(name: str) -> bool:
    return any(s in name for s in KNOWN_SKIPS)


def config_note(directory: str, architecture: str) -> Optional[str]:
    """What to tell the user about the directory's config.json, if anything.

    Never a reason to refuse: upstream's update never reads config.json, and at start-up
    SGLang has already read it and chosen the served class, sometimes under another name
    (its own renames, ``--json-model-override-args``). Which tensor feeds which parameter,
    with which shape, is checked by the replay of the served model's own loaders. A
    config.json naming other architectures, or one that cannot be read, is only worth a
    line in the log (a mislabelled or half-written directory).

    Args:
        directory: the checkpoint directory.
        architecture: the class the server runs.

    Returns:
        A warning (naming config.json and the architectures), or None.
    """
    path = os.path.join(directory, "config.json")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(CONFIG_READ_BYTES))
    except FileNotFoundError:
        return None  # a weights-only directory: the served model's config applies, as upstream's
    except (OSError, ValueError) as exc:
        return f"{path} is unreadable ({exc}); its weights are loaded into the served {architecture}"
    if not isinstance(config, dict):
        return f"{path} is not a JSON object; its weights are loaded into the served {architecture}"
    archs = config.get("architectures")
    if archs is None or (isinstance(archs, list) and architecture in archs):
        return None
    return (f"{path} describes architectures {archs!r}, but the server runs {architecture}; its weights "
            f"are loaded into it as upstream's update would load them (every tensor checked against the model)")


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
