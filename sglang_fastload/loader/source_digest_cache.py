"""Source-file digests kept beside the stored plans, so that a new process need not hash them again.

A stored plan's key covers the content of a few hundred source files (``plan_key.py``):
hashing them costs every server start ~10-20 ms (342 files on the CI machine, 9.5 ms of a
17.8 ms key). Here each digest is kept with the file's size, modification time (in ns) and
inode, and is reused only while all three are unchanged: a stricter test than Python's own
for reusing a module's cached bytecode (size and whole seconds). The file is data (JSON, no
code), written as the plans are (``replace_atomically``), and ignored when unreadable.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Dict, Tuple

from sglang_fastload.loader.plan_store_location import replace_atomically

logger = logging.getLogger(__name__)

FILE_NAME = "source-digests.json"
# Entries kept (stale ones never match a file again; the newest are kept).
MAX_ENTRIES = 4096

# (path, size, mtime_ns, inode)
StatKey = Tuple[str, int, int, int]


def load(directory: str) -> Dict[StatKey, str]:
    """The digests stored in ``directory``; empty when there are none or the file is unusable."""
    try:
        with open(os.path.join(directory, FILE_NAME), "rb") as f:
            rows = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    out: Dict[StatKey, str] = {}
    if not isinstance(rows, list):
        return out
    for row in rows:
        if (isinstance(row, list) and len(row) == 5 and isinstance(row[0], str)
                and all(type(x) is int for x in row[1:4]) and isinstance(row[4], str)):
            out[(row[0], row[1], row[2], row[3])] = row[4]
    return out


def save(directory: str, digests: Dict[StatKey, str]) -> None:
    """Store ``digests`` (the newest ``MAX_ENTRIES``) in ``directory``; problems are logged, never raised."""
    rows = [[*key, value] for key, value in list(digests.items())[-MAX_ENTRIES:] if not value.startswith("unreadable:")]
    try:
        replace_atomically(directory, FILE_NAME, json.dumps(rows, separators=(",", ":")).encode())
    except OSError as exc:
        logger.info("sglang-fastload: source digests not kept in %s (%s)", directory, exc)
