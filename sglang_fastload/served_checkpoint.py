"""What a model was last loaded from, and whether that checkpoint is still on disk as it was.

A failed update can only "roll back" by re-reading the previous checkpoint if that checkpoint
still holds the bytes the model was serving. RL trainers often save every step into the same
directory, or delete a step's directory once it is loaded, so the record keeps the identity
(device, inode, size, modification time) of every weight file at the end of each successful
load, and ``is_intact`` compares them with what the directory holds now.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Dict, Optional, Tuple

from sglang_fastload import constants

# (st_dev, st_ino, st_size, st_mtime_ns) of a file, its symlinks followed.
FileIdentity = Tuple[int, int, int, int]

_ATTR = "_sglang_fastload_served"


@dataclasses.dataclass(frozen=True)
class ServedCheckpoint:
    """The checkpoint a model's parameters were last loaded from.

    Attributes:
        path: the checkpoint directory (or hub id) as given to SGLang.
        load_format: the load format it was loaded with (a string).
        files: identity of each weight file at the end of that load; None when the load
            was not observed (e.g. a start-up load through upstream's own path).
        replaced_by: the update API that has written the parameters since (from a trainer's
            tensors, not from disk: no checkpoint holds the served weights), or None.
    """

    path: str
    load_format: str
    files: Optional[Dict[str, FileIdentity]]
    replaced_by: Optional[str] = None

    def is_intact(self, next_path: str) -> bool:
        """True when re-reading ``path`` would give back exactly the served weights.

        Args:
            next_path: the checkpoint an update is loading now. Without recorded file
                identities, a directory that is also the update's target cannot hold the
                old weights any more (the update reads new ones from it).

        Returns:
            Whether ``path`` still holds the checkpoint the model was serving.
        """
        if self.replaced_by is not None:
            return False
        if not os.path.isdir(self.path):
            # A hub id resolves to an immutable cache snapshot; a missing directory is gone.
            return not os.path.isabs(self.path) and not os.path.exists(self.path)
        if self.files is None:
            return os.path.realpath(self.path) != os.path.realpath(next_path)
        return weight_file_identities(self.path) == self.files

    def describe_loss(self) -> str:
        """Why ``path`` no longer holds the served weights, in words (for messages)."""
        if self.replaced_by is not None:
            return f"the served weights came from {self.replaced_by} after {self.path} was loaded"
        if not os.path.exists(self.path):
            return f"{self.path} no longer exists"
        if self.files is None:
            # ``is_intact`` without identities: the update read this directory itself.
            return (f"{self.path} is the directory the failed update read, and its files were not "
                    "recorded when the served weights were loaded (another loader), so it may hold other weights now")
        return f"{self.path} has been rewritten since it was loaded"


def weight_file_identities(directory: str) -> Dict[str, FileIdentity]:
    """Identity of each weight file (see ``constants.WEIGHT_FILE_SUFFIXES``) in ``directory``.

    Args:
        directory: a checkpoint directory.

    Returns:
        ``{file name: (device, inode, size, mtime_ns)}``; files that vanish while listing
        are left out, an unreadable directory gives ``{}``.
    """
    out: Dict[str, FileIdentity] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return out
    for name in names:
        if not name.endswith(constants.WEIGHT_FILE_SUFFIXES):
            continue
        try:
            st = os.stat(os.path.join(directory, name))
        except OSError:
            continue
        out[name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def record_served(model, path: str, load_format, files: Optional[Dict[str, FileIdentity]] = None) -> ServedCheckpoint:
    """Remember that ``model`` now serves the checkpoint at ``path``.

    Args:
        model: the live model (the record lives on it).
        path: the checkpoint just loaded.
        load_format: the format it was loaded with (enum or string).
        files: the identities observed by the loader; read from the directory when None.

    Returns:
        The record.
    """
    if files is None and os.path.isdir(path):
        files = weight_file_identities(path)
    record = ServedCheckpoint(str(path), str(getattr(load_format, "value", load_format)), files)
    model.__dict__[_ATTR] = record
    return record


def keep_record(model, record: ServedCheckpoint) -> None:
    """Make ``record`` the model's record again (its weights were restored from a host snapshot
    of what it described)."""
    model.__dict__[_ATTR] = record


def record_replaced(model, api: str) -> None:
    """Remember that ``api`` (an update from tensors, not from disk) is writing ``model``'s
    parameters: no checkpoint on disk holds them any more, so a failed disk update cannot
    roll back by reading one (the host snapshot still can)."""
    record = served_by(model)
    path, load_format = (record.path, record.load_format) if record is not None else ("", "")
    model.__dict__[_ATTR] = ServedCheckpoint(path, load_format, None, api)


def forget_on_update(api: str, original):
    """Wrap a ``WeightUpdater`` method that writes parameters from a trainer's tensors so
    that it calls ``record_replaced`` first.

    Args:
        api: the method's name, for messages.
        original: upstream's method.

    Returns:
        The method to install in its place.
    """

    @functools.wraps(original)
    def update(self, *args, **kwargs):
        record_replaced(self.get_model(), api)
        return original(self, *args, **kwargs)

    return update


def served_by(model) -> Optional[ServedCheckpoint]:
    """The last record made by ``record_served`` for ``model``, if any."""
    return model.__dict__.get(_ATTR)
