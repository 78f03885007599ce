"""Every exception sglang-fastload raises.

Checkpoint problems always name the file and, where one is involved, the tensor, so a
failed ``/update_weights_from_disk`` tells the caller exactly what to fix.
"""

from typing import Optional


class FastLoadError(Exception):
    """Base class of all sglang-fastload errors."""


class CheckpointError(FastLoadError, ValueError):
    """A checkpoint cannot be loaded as it is on disk.

    Attributes:
        path: the file (or directory) at fault.
        tensor: the tensor name at fault, or None when the problem is not about one tensor.
        reason: what is wrong, in words.
    """

    def __init__(self, path, reason: str, tensor: Optional[str] = None):
        self.path = str(path)
        self.tensor = tensor
        self.reason = reason
        where = self.path if tensor is None else f"{self.path}: tensor {tensor!r}"
        super().__init__(f"{where}: {reason}")


class HeaderError(CheckpointError):
    """A safetensors file's header is malformed, unsafe, or disagrees with the file."""


class CheckpointIndexError(CheckpointError):
    """A checkpoint directory or its ``*.safetensors.index.json`` is unusable or unsafe."""


class CheckpointMismatchError(CheckpointError):
    """A well-formed checkpoint does not fit the model: missing, unknown, wrong shape/dtype."""


class UnsupportedModelError(FastLoadError):
    """The model (architecture or parameter type) has no fast-load plan; use upstream."""


class WeightUpdateError(FastLoadError):
    """A weight update failed after parameters were written, and the old weights were restored."""


class RollbackError(FastLoadError):
    """A failed update could not restore the previous weights: the model must not serve."""


class CudaCallError(FastLoadError, RuntimeError):
    """A CUDA runtime call the loader made itself failed (the load fails like a torch copy would)."""
