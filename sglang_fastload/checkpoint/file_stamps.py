"""Detect a shard that changed while it was being read (a writer still appending, a copy
replacing it): compare each file's size and modification time before and after."""

from __future__ import annotations

import os
from typing import Dict, Iterable, Tuple

from sglang_fastload.errors import CheckpointError

Stamps = Dict[str, Tuple[int, int]]


def stamp_files(paths: Iterable[str]) -> Stamps:
    """Return ``{path: (size, mtime in ns)}`` of each file (links followed)."""
    stamps = {}
    for p in sorted(paths):
        st = os.stat(p)
        stamps[p] = (st.st_size, st.st_mtime_ns)
    return stamps


def check_unchanged(before: Stamps) -> None:
    """Raise unless every file still has the size and mtime recorded in ``before``.

    Raises:
        CheckpointError: naming the first shard that changed or vanished.
    """
    for path, (size, mtime) in before.items():
        try:
            st = os.stat(path)
        except OSError as exc:
            raise CheckpointError(path, f"shard vanished while it was being loaded: {exc.strerror or exc}") from None
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            grew = f" (size {size} -> {st.st_size} bytes)" if st.st_size != size else ""
            raise CheckpointError(path, f"shard changed while it was being loaded{grew}")
