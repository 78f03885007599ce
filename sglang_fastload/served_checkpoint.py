"""What a model was last loaded from, and whether that checkpoint is still on disk as it was.

A failed update can only "roll back" by re-reading the previous checkpoint if that checkpoint
still holds the bytes the model was serving. RL trainers often save every step into the same
directory, or delete a step's directory once it is loaded, so the record keeps the identity
(device, inode, size, modification time) of every weight file at the end of each successful
load, and ``is_intact`` compares them with what the directory holds now.
"""

from __future__ import annotations

import dataclasses
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
    """

    path: str
    load_format: str
    files: Optional[Dict[str, FileIdentity]]

    def is_intact(self, next_path: str) -> bool:
        """True when re-reading ``path`` would give back exactly the served weights.

        Args:
            next_path: the checkpoint an update is loading now. Without recorded file
                identities, a directory that is also the update's target cannot hold the
                old weights any more (the update reads new ones from it).

        Returns:
            Whether ``path`` still holds the checkpoint the model was serving.
        """
        if not os.path.isdir(self.path):
            # A hub id resolves to an immutable cache snapshot; a missing directory is gone.
            return not os.path.isabs(self.path) and not os.path.exists(self.path)
        if self.files is None:
            return os.path.realpath(self.path) != os.path.realpath(next_path)
        return weight_file_identities(self.path) == self.files

    def describe_loss(self) -> str:
        """Why ``path`` no longer holds the served weights, in words (for messages)."""
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


def served_by(model) -> Optional[ServedCheckpoint]:
    """The last record made by ``record_served`` for ``model``, if any."""
    return model.__dict__.get(_ATTR)
