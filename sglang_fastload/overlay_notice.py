"""The one log line a process writes once the overlay's forked loader is in use."""

import os

from sglang_fastload import constants

_logged = False


def log_overlay_active_once(logger) -> None:
    """Log ``sglang-fastload overlay active`` once per process (at INFO)."""
    global _logged
    if _logged:
        return
    _logged = True
    logger.info("%s (pid %d)", constants.ACTIVE_NOTICE, os.getpid())
