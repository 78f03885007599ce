"""Where the load plan store lives, and how a file gets into it (stdlib only: the CLI's
``status`` reads it without torch)."""

from __future__ import annotations

import os
import threading
import uuid
from typing import Optional

from sglang_fastload import constants

# File name ending of one stored plan.
SUFFIX = ".plan.json.gz"


def store_dir() -> Optional[str]:
    """The store directory, or None when the store is switched off."""
    if os.environ.get(constants.ENV_PLAN_STORE, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    explicit = os.environ.get(constants.ENV_PLAN_DIR)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, *constants.PLAN_STORE_SUBDIR)


def replace_atomically(directory: str, name: str, data: bytes) -> str:
    """Write ``data`` as ``directory/name`` under a unique temporary name, then rename it into
    place: concurrent writers (ranks, servers sharing the directory) each leave a whole file
    and a reader sees a whole file or none. The directory is created private (0700).

    Returns:
        The file's path.

    Raises:
        OSError: the directory or the file could not be written (the temporary is removed).
    """
    path = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def describe() -> str:
    """One line for ``status``: whether the store is on, where, and how many plans it holds."""
    directory = store_dir()
    if directory is None:
        return f"off ({constants.ENV_PLAN_STORE}=0)"
    try:
        count = sum(1 for name in os.listdir(directory) if name.endswith(SUFFIX))
    except OSError:
        count = 0
    return f"on, {directory} ({count} plans; {constants.ENV_PLAN_STORE}=0 switches it off)"
