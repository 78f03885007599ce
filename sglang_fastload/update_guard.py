"""Weight updates that never leave a half-written model serving.

Used by the forked ``WeightUpdater.update_weights_from_disk``:
- a ``fast`` checkpoint is fully validated before any parameter is touched;
- when a load fails after parameters were written, the *previous* checkpoint is loaded
  again with the previous load format (upstream re-reads the new path, which is what
  failed); if that fails too, ``RollbackError`` is raised so the server stops instead of
  serving mixed weights.
"""

from __future__ import annotations

import logging

from sglang_fastload.errors import RollbackError

logger = logging.getLogger(__name__)


def validate_before_writing(weights, model, target_device) -> None:
    """Plan and validate a fast checkpoint; other iterators are left as they are.

    Raises:
        CheckpointError: the checkpoint is unusable; nothing was written.
    """
    from sglang_fastload.loader.fast_model_loader import FastCheckpoint, unsupported_reason

    if isinstance(weights, FastCheckpoint) and unsupported_reason(model, weights.loader.load_config) is None:
        from sglang_fastload.errors import UnsupportedModelError

        try:
            weights.prepare(model, target_device)
        except UnsupportedModelError:
            pass  # the loader falls back to upstream's path and says so


def roll_back(load_previous, previous_path: str, previous_format, error: Exception) -> str:
    """Reload the previous checkpoint after a failed update.

    Args:
        load_previous: callable that loads ``previous_path`` with ``previous_format``.
        previous_path: the checkpoint that was serving before the update.
        previous_format: its load format.
        error: the failure of the update.

    Returns:
        The message for the caller (update failed, previous weights restored).

    Raises:
        RollbackError: the previous weights could not be restored; the server must stop.
    """
    logger.error(
        "sglang-fastload: weight update failed after writing parameters (%s); restoring %s",
        error, previous_path,
    )
    try:
        load_previous()
    except Exception as rollback_error:
        message = (
            f"sglang-fastload: weight update failed ({error}) and restoring the previous "
            f"checkpoint {previous_path} failed too ({rollback_error}); the model holds mixed "
            "weights and this server refuses to serve it"
        )
        logger.critical(message)
        raise RollbackError(message) from rollback_error
    logger.info("sglang-fastload: previous weights restored from %s", previous_path)
    return (
        f"Failed to update weights: {error}.\nRolled back to the previous weights "
        f"({previous_path}, load format {getattr(previous_format, 'value', previous_format)})."
    )
