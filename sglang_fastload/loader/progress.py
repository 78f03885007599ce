"""A start-up load's progress bar, fed by every reader thread after each chunk."""

from __future__ import annotations

import threading
from typing import Callable

# Bars move in steps of about this share of the load: a load finishes thousands of chunks,
# and a bar's update (arithmetic, a clock read, sometimes a redraw) per chunk is interpreter
# time the readers share.
STEP_SHARE = 0.01


class ChunkProgress:
    """Adds up the bytes of finished chunks from any thread and hands them to ``update``
    about every ``STEP_SHARE`` of ``total`` (a bar's own counter is not thread-safe)."""

    def __init__(self, update: Callable[[int], object], total: int):
        self.update = update
        self.step = max(1, int(total * STEP_SHARE))
        self.pending = 0
        self.lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        """Count ``nbytes`` more (called by the readers)."""
        with self.lock:
            self.pending += nbytes
            if self.pending < self.step:
                return
            nbytes, self.pending = self.pending, 0
            self.update(nbytes)

    def flush(self) -> None:
        """Hand over what is still counted (after the load)."""
        with self.lock:
            nbytes, self.pending = self.pending, 0
            if nbytes:
                self.update(nbytes)
