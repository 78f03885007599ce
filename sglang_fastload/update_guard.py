"""Weight updates that never leave a half-written model serving.

``guard_update_weights_from_disk`` wraps SGLang's ``WeightUpdater.update_weights_from_disk``
(installed at the end of the forked module, so upstream's body stays untouched):

- while an update runs, ``current_update()`` tells the loaders about it: the fast loader
  validates the whole checkpoint when upstream asks for its weights iterator, and no rank
  writes unless every tensor-parallel rank validated (a refusal is upstream's own
  "Failed to get weights iterator" answer, nothing written); the loader dispatch fills in
  the server's extra config;
- when a load fails on any rank after parameters may have been written, every rank
  restores consistent weights, in this order: the host snapshot (opt-in,
  ``SGLANG_FASTLOAD_UPDATE_SNAPSHOT=1``); the previous checkpoint, if it is still on disk as
  it was loaded; else the update's own checkpoint read again (the previous one is gone or was
  rewritten, e.g. a trainer that reuses one directory), reported as such. If none of these
  loads, ``RollbackError`` stops the server instead of serving mixed weights.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import gc
import logging
import os
import time
from typing import Callable, Iterator, List, Optional, Tuple

from sglang_fastload import constants, parallel_ranks
from sglang_fastload.errors import RollbackError
from sglang_fastload.served_checkpoint import ServedCheckpoint, keep_record, record_served, served_by

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class UpdateInProgress:
    """What the loaders need to know about the update that is running in this thread.

    Attributes:
        model: the live model being updated.
        target_device: where its parameters live.
        server_load_format: the server's start-up ``--load-format``.
        server_extra_config: the server's ``--model-loader-extra-config``.
        loader_requested: upstream asked ``get_model_loader`` for a loader (before that,
            an update cannot have written anything).
        iterators_requested: how many weights iterators the fast loader handed out (a
            second one is upstream's own rollback re-read, which this module replaces).
        wrote: whether parameters were written; None when the loader does not say (any
            loader but the fast one).
        first_error: the load failure, as the fast loader saw it.
    """

    model: object
    target_device: object
    server_load_format: Optional[str]
    server_extra_config: dict
    loader_requested: bool = False
    iterators_requested: int = 0
    wrote: Optional[bool] = None
    first_error: Optional[BaseException] = None

    def certainly_untouched(self, message: Optional[str]) -> bool:
        """True when no parameter of this rank can have been written by the failed update."""
        if not self.loader_requested:
            return True
        if self.wrote is not None:
            return not self.wrote
        # Upstream answers these before it loads anything.
        return bool(message) and message.startswith(_UPSTREAM_PRE_LOAD_FAILURES)


# Upstream's messages for failures that happen before any parameter is written.
_UPSTREAM_PRE_LOAD_FAILURES = ("Failed to get weights iterator", "Failed to get model loader")


class RestoreByUpdateGuard(Exception):
    """Raised instead of upstream's re-read of a failed update: the guard restores weights."""


_CURRENT: contextvars.ContextVar[Optional[UpdateInProgress]] = contextvars.ContextVar(
    "sglang_fastload_update", default=None
)


def current_update() -> Optional[UpdateInProgress]:
    """The update running in this thread, or None (start-up loads, other callers)."""
    return _CURRENT.get()


def all_ranks_ok(ok: bool) -> bool:
    """Return True only if ``ok`` holds on every tensor-parallel rank (a collective call).

    Every rank of the group must call it at the same point of an update.
    """
    import torch
    import torch.distributed as dist

    group = parallel_ranks.tp_group()
    if group is None or group.world_size == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group.cpu_group)
    return bool(flag.item())


def rejected_message(error: Optional[BaseException]) -> str:
    """Message of an update rejected before any write (here or on another rank)."""
    reason = error if error is not None else "another tensor-parallel rank rejected the checkpoint"
    return f"Failed to get weights iterator: {reason}."


def snapshot_enabled() -> bool:
    return os.environ.get(constants.ENV_UPDATE_SNAPSHOT, "").strip() == "1"


def _load_format_name(load_format) -> str:
    return str(getattr(load_format, "value", load_format))


def _server_load_settings() -> Tuple[Optional[str], dict]:
    """The server's start-up ``--load-format`` and ``--model-loader-extra-config`` (a dict).

    Read from SGLang's raw server arguments: its resolved config follows every update's
    load format, the raw input keeps what the server was started with.
    """
    try:
        from sglang.srt.runtime_context import get_context

        args = get_context().server_args
        load_format, extra = args.load_format, args.model_loader_extra_config or {}
    except Exception:
        return None, {}
    if isinstance(extra, (str, bytes)):
        import json

        extra = json.loads(extra)
    return load_format, dict(extra)


def _served_before(updater, model) -> ServedCheckpoint:
    record = served_by(model)
    path = updater.model_config.model_path
    if record is not None and record.path == path and record.replaced_by is None:
        return record
    from sglang.srt.runtime_context import get_model

    # Weights written from a trainer's tensors since: no checkpoint holds them (is_intact).
    replaced_by = record.replaced_by if record is not None else None
    return ServedCheckpoint(path, _load_format_name(get_model().load_format), None, replaced_by)


@contextlib.contextmanager
def _recapture_deferred(updater) -> Iterator[List[bool]]:
    """While upstream's update runs, its CUDA-graph recapture is only noted (in the list yielded).

    The recapture makes collective calls on every rank; a rank whose load failed is in the
    guard's vote by then, and the two would wait for each other for ever. The guard recaptures
    once every rank has succeeded. (``WeightUpdater`` is a frozen dataclass: its field is set
    past the freeze, and always put back.)
    """
    requested: List[bool] = []
    real = getattr(updater, "recapture_cuda_graph", None)
    if real is None:
        yield requested
        return
    object.__setattr__(updater, "recapture_cuda_graph", lambda: requested.append(True))
    try:
        yield requested
    finally:
        object.__setattr__(updater, "recapture_cuda_graph", real)


def guard_update_weights_from_disk(original: Callable) -> Callable:
    """Wrap ``WeightUpdater.update_weights_from_disk`` (see the module docstring).

    Args:
        original: upstream's method.

    Returns:
        The method to install in its place; same arguments and ``(success, message)``.
    """

    @functools.wraps(original)
    def update_weights_from_disk(self, model_path, load_format, *args, **kwargs) -> Tuple[bool, str]:
        model = self.get_model()
        previous = _served_before(self, model)
        import torch

        update = UpdateInProgress(model, torch.device(self.device), *_server_load_settings())
        if snapshot_enabled():
            from sglang_fastload.weight_snapshot import snapshot_of

            snapshot = snapshot_of(model)
            snapshot.capture(model)
            logger.info(
                "sglang-fastload: host snapshot of %d bytes of weights taken in %.3f s", snapshot.nbytes, snapshot.seconds
            )
        token = _CURRENT.set(update)
        failure: Optional[BaseException] = None
        with _recapture_deferred(self) as recapture:
            try:
                ok, message = original(self, model_path, load_format, *args, **kwargs)
            except Exception as exc:  # upstream's own rollback re-read raised, or ours refused it
                ok, message, failure = False, None, exc
            finally:
                _CURRENT.reset(token)
        if all_ranks_ok(ok):
            record_served(self.get_model(), model_path, load_format)
            if recapture:
                self.recapture_cuda_graph()
            return ok, message
        reason = update.first_error or failure or message or "another tensor-parallel rank failed"
        if all_ranks_ok(update.certainly_untouched(message)):
            # No rank touched a parameter: the served weights are intact.
            self.model_config.model_path = previous.path
            if message is None:
                message = rejected_message(update.first_error or failure)
            return False, message
        return _restore(self, previous, model_path, load_format, reason)

    update_weights_from_disk.__sglang_fastload_guard__ = True
    return update_weights_from_disk


def _load(updater, path: str, load_format) -> None:
    """Load ``path`` into the live model the way an update does (raises on failure)."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.model_loader.loader import DefaultModelLoader, get_model_loader
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    import torch

    model = updater.get_model()
    target_device = torch.device(updater.device)
    updater.model_config.model_path = path
    load_config = LoadConfig(load_format=load_format)
    token = _CURRENT.set(UpdateInProgress(model, target_device, *_server_load_settings()))
    try:
        # Within a "restore", the dispatch fills the extra config and the fast loader
        # validates before writing, exactly as in an update.
        loader = get_model_loader(load_config, updater.model_config)
        with set_default_torch_dtype(updater.model_config.dtype):
            weights = loader._get_weights_iterator(DefaultModelLoader.Source.init_new(updater.model_config, model))
            restore = getattr(DefaultModelLoader, "restore_weights_before_loading", None)
            if restore is not None:  # absent before sglang 0.5.21
                restore(model, target_device)
            loader.load_weights_and_postprocess(model, weights, target_device)
    finally:
        _CURRENT.reset(token)
    record_served(model, path, load_format)
    _set_model_fields(updater, path, load_format)


def _set_model_fields(updater, path: str, load_format) -> None:
    """Tell the model runner which checkpoint it serves now (upstream does so after an update)."""
    from sglang.srt.configs.load_config import LoadConfig

    updater.model_config.model_path = path
    updater.update_model_fields(
        updater.get_model(),
        model_path=path,
        load_format=_load_format_name(load_format),
        load_config=LoadConfig(load_format=load_format),
    )


def _attempt(what: str, action: Callable[[], None]) -> Optional[BaseException]:
    try:
        action()
        return None
    except Exception as exc:  # every failure leads to the next way of restoring
        logger.error("sglang-fastload: %s failed: %s", what, exc)
        return exc


def _restore(updater, previous: ServedCheckpoint, target: str, load_format, reason) -> Tuple[bool, str]:
    """Bring every rank back to one consistent set of weights after a failed update."""
    model = updater.get_model()
    gc.collect()
    logger.error(
        "sglang-fastload: weight update from %s failed after writing parameters (%s); restoring", target, reason
    )
    failures: List[str] = []

    if all_ranks_ok(snapshot_enabled() and model.__dict__.get("_sglang_fastload_snapshot") is not None):
        from sglang_fastload.weight_snapshot import snapshot_of

        err = _attempt("restoring the host snapshot", lambda: snapshot_of(model).restore(model))
        if all_ranks_ok(err is None):
            _set_model_fields(updater, previous.path, previous.load_format)
            keep_record(model, previous)
            logger.info("sglang-fastload: previous weights restored from the host snapshot")
            return False, (
                f"Failed to update weights: {reason}.\nRolled back to the previous weights "
                f"(host snapshot of {previous.path})."
            )
        failures.append(f"host snapshot: {err or 'failed on another rank'}")

    if all_ranks_ok(previous.is_intact(target)):
        err = _attempt(
            f"restoring the previous checkpoint {previous.path}",
            lambda: _load(updater, previous.path, previous.load_format),
        )
        if all_ranks_ok(err is None):
            logger.info("sglang-fastload: previous weights restored from %s", previous.path)
            return False, (
                f"Failed to update weights: {reason}.\nRolled back to the previous weights "
                f"({previous.path}, load format {previous.load_format})."
            )
        failures.append(f"previous checkpoint {previous.path}: {err or 'failed on another rank'}")
    else:
        failures.append(f"previous checkpoint: {previous.describe_loss()}")

    # The old weights cannot be reached: the only consistent weights left are the update's own.
    for attempt in range(1, constants.UPDATE_REREAD_ATTEMPTS + 1):
        time.sleep(constants.UPDATE_REREAD_PAUSE_S * attempt)
        err = _attempt(f"reading {target} again (try {attempt})", lambda: _load(updater, target, load_format))
        if all_ranks_ok(err is None):
            logger.warning(
                "sglang-fastload: the model now holds the checkpoint in %s, read again after a failed "
                "update (%s)", target, failures[-1],
            )
            return True, (
                f"Succeeded to update model weights: the first read of {target} failed after writing "
                f"({reason}), and the previous weights could not be restored ({'; '.join(failures)}), so "
                f"{target} was read again (try {attempt}): the model now holds the checkpoint that "
                f"{target} holds now."
            )
        failures.append(f"{target} try {attempt}: {err or 'failed on another rank'}")

    message = (
        f"sglang-fastload: weight update from {target} failed ({reason}) and no consistent weights "
        f"could be restored ({'; '.join(failures)}); the model holds mixed weights and this server "
        "refuses to serve it"
    )
    logger.critical(message)
    raise RollbackError(message)


def note_writing() -> None:
    """Called by the fast loader right before it writes parameters during an update."""
    update = current_update()
    if update is not None:
        update.wrote = True


def on_weights_iterator_requested(update: UpdateInProgress) -> None:
    """Called by the fast loader each time upstream asks for a weights iterator in an update.

    Raises:
        RestoreByUpdateGuard: on the second request, which is upstream's own rollback re-read.
    """
    update.iterators_requested += 1
    if update.iterators_requested > 1:
        raise RestoreByUpdateGuard("the update guard restores the weights")
    update.wrote = False
