"""Post-load hooks without staging when there is nothing to stage.

Upstream runs every quantization method's ``process_weights_after_loading`` (after each load
and update) and ``restore_weights_before_loading`` (before each update) inside
``device_loading_context``, which stages the module's tensors on the target device
(``stage_module_for_post_load``) and puts every tensor back where it was afterwards. For a
module whose tensors all already live on the target device, that staging moves nothing, yet
it snapshots and re-walks every tensor: on an H200 host ~30 us per context under the
profiler, ~10 ms of every update of an 8B dense model (two contexts per linear layer), all
of it time in which no byte moves.

Here such a module's hook runs directly; afterwards, as upstream's restore would, every
tensor the hook left elsewhere is brought onto the target device and a meta tensor is an
error. Anything else (a tensor on another device or parked on the meta device, a target
that is not CUDA) goes through upstream's context unchanged.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

__all__ = ["registered_tensors", "resident_on", "resolved_cuda", "settle_on", "skip_staging_when_resident"]

META_TENSOR_ERROR = "Post-load processing produced a meta tensor"  # upstream's own message


_MODULES = torch.nn.Module.modules
_NAMED_MODULES = torch.nn.Module.named_modules


def registered_tensors(module: torch.nn.Module) -> List[torch.Tensor]:
    """Every parameter and buffer slot of ``module`` and its submodules (aliases included:
    the registries themselves, as upstream's staging walks them)."""
    cls = type(module)
    if not module._modules and cls.modules is _MODULES and cls.named_modules is _NAMED_MODULES:
        owners = (module,)  # a leaf (most hooked layers): no walk to set up
    else:
        owners = module.modules()
    return [t for owner in owners for registry in (owner._parameters, owner._buffers)
            for t in registry.values() if t is not None]


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """``tensor.device == device``; for an indexed CUDA device without making a device object."""
    if device.type == "cuda" and device.index is not None:
        return tensor.is_cuda and tensor.get_device() == device.index
    return tensor.device == device


def resident_on(module: torch.nn.Module, device: torch.device) -> bool:
    """True when every registered tensor of ``module`` lives on ``device`` (none on meta)."""
    for tensor in registered_tensors(module):
        if not _on(tensor, device):
            return False
    return True


def settle_on(module: torch.nn.Module, device: torch.device) -> None:
    """What upstream's staging does after a hook on a module that was all on ``device``:
    every tensor ends on ``device``.

    Raises:
        RuntimeError: the hook left a meta tensor (upstream raises the same).
    """
    for tensor in registered_tensors(module):
        if tensor.is_meta:
            raise RuntimeError(META_TENSOR_ERROR)
        if not _on(tensor, device):
            tensor.data = tensor.data.to(device)


class _HookInPlace:
    """The shortcut's context: the hook runs on the module as it is, then every tensor is
    settled on ``device`` (also when the hook raised, as upstream's staging restores)."""

    __slots__ = ("module", "device")

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module = module
        self.device = device

    def __enter__(self) -> torch.nn.Module:
        return self.module

    def __exit__(self, exc_type, exc, tb) -> bool:
        settle_on(self.module, self.device)
        return False


_CUDA_DEVICES: Dict[int, torch.device] = {}  # index -> device: made once, not per layer


def resolved_cuda(target_device: torch.device) -> Optional[torch.device]:
    """The CUDA device ``target_device`` names (the current one when it has no index, as
    upstream's staging moves tensors to), or None off CUDA."""
    if target_device.type != "cuda":
        return None
    if target_device.index is not None:
        return target_device
    index = torch.cuda.current_device()
    device = _CUDA_DEVICES.get(index)
    if device is None:
        device = _CUDA_DEVICES[index] = torch.device("cuda", index)
    return device


def skip_staging_when_resident(upstream_context: Callable) -> Callable:
    """Wrap upstream's ``device_loading_context`` (see the module docstring).

    Args:
        upstream_context: upstream's context manager factory ``(module, target_device)``.

    Returns:
        A factory with the same arguments and effect.
    """

    def device_loading_context(module: torch.nn.Module, target_device: torch.device):
        # A plain context object: this runs twice per hooked layer and update.
        device = resolved_cuda(target_device)
        if device is None or not resident_on(module, device):
            return upstream_context(module, target_device)
        return _HookInPlace(module, device)

    device_loading_context.__wrapped__ = upstream_context
    return device_loading_context
