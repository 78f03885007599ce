"""Where the load plan store lives (stdlib only: the CLI's ``status`` reads it without torch)."""

from __future__ import annotations

import os
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
