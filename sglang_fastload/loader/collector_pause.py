"""Python's cyclic garbage collector paused while a fast load runs.

A full collection walks every object of the server process (millions once SGLang and the
model are built: 0.34 s on a 2-CPU host) while holding the interpreter lock, so the reader
threads stop with it. A start-up load allocates enough small objects (parsed headers, the
replay's records, the plan's steps) to set one off. Reference counting still frees what a
load drops as it goes; only the search for unreachable cycles waits until the load ends.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

_LOCK = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic collector for the ``with`` body (loads on several threads nest).

    The collector runs again when the last paused load ends, and only if it was running
    when the first one began: a process that turned it off keeps it off.
    """
    global _depth, _was_enabled
    with _LOCK:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _LOCK:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
