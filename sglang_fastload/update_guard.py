"""Weight updates that never leave a half-written model serving.

Used by the forked ``WeightUpdater.update_weights_from_disk``:
- a ``fast`` checkpoint is fully validated before any parameter is touched, and no rank
  writes unless every tensor-parallel rank validated;
- when a load fails on any rank after parameters were written, every rank loads the
  *previous* checkpoint again with the previous load format (upstream re-reads the new
  path, which is what failed); if that fails too, ``RollbackError`` is raised so the
  server stops instead of serving mixed weights.
"""

from __future__ import annotations

import logging
from typing import Optional

from sglang_fastload.errors import RollbackError

logger = logging.getLogger(__name__)


def validate_before_writing(weights, model, target_device) -> None:
    """Plan and validate a fast checkpoint; other iterators are left as they are.

    Raises:
        CheckpointError: the checkpoint is unusable; nothing was written.
    """
    from sglang_fastload.loader.fast_model_loader import FastCheckpoint

    if isinstance(weights, FastCheckpoint):
        weights.try_prepare(model, target_device)  # unsupported: the loader says so and falls back


def all_ranks_ok(ok: bool) -> bool:
    """Return True only if ``ok`` holds on every tensor-parallel rank (a collective call).

    Every rank of the group must call it at the same point of an update.
    """
    try:
        import torch
        import torch.distributed as dist
        from sglang.srt.distributed import get_tp_group

        group = get_tp_group()
    except Exception:
        return ok
    if group.world_size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return bool(flag.item())


def rejected_message(error: Optional[Exception]) -> str:
    """Message of an update rejected before any write (here or on another rank)."""
    reason = error if error is not None else "another tensor-parallel rank rejected the checkpoint"
    return f"Failed to get weights iterator: {reason}."


def roll_back(model, model_config, previous_load_config, target_device, error: Optional[Exception]) -> str:
    """Reload the previous checkpoint (``model_config.model_path``) after a failed update.

    Args:
        model: the live model.
        model_config: its config, ``model_path`` already set back to the previous path.
        previous_load_config: the load config the previous checkpoint was served with.
        target_device: where the parameters live.
        error: this rank's failure, or None when another rank failed.

    Returns:
        The message for the caller (update failed, previous weights restored).

    Raises:
        RollbackError: the previous weights could not be restored; the server must stop.
    """
    from sglang.srt.model_loader.loader import DefaultModelLoader, get_model_loader

    reason = error if error is not None else "another tensor-parallel rank failed"
    previous_path = model_config.model_path
    logger.error(
        "sglang-fastload: weight update failed after writing parameters (%s); restoring %s",
        reason, previous_path,
    )
    try:
        loader = get_model_loader(previous_load_config, model_config)
        weights = loader._get_weights_iterator(DefaultModelLoader.Source.init_new(model_config, model))
        DefaultModelLoader.restore_weights_before_loading(model, target_device)
        loader.load_weights_and_postprocess(model, weights, target_device)
        restored = True
    except Exception as rollback_error:
        restored = False
        failure = rollback_error
    if not all_ranks_ok(restored):
        message = (
            f"sglang-fastload: weight update failed ({reason}) and restoring the previous "
            f"checkpoint {previous_path} failed too"
            f"{f' ({failure})' if not restored else ' on another rank'}; the model holds mixed "
            "weights and this server refuses to serve it"
        )
        logger.critical(message)
        raise RollbackError(message)
    fmt = previous_load_config.load_format
    logger.info("sglang-fastload: previous weights restored from %s", previous_path)
    return (
        f"Failed to update weights: {reason}.\nRolled back to the previous weights "
        f"({previous_path}, load format {getattr(fmt, 'value', fmt)})."
    )
