"""An opt-in host-memory copy of a rank's weights, so that a failed update can always be undone.

Enabled with ``SGLANG_FASTLOAD_UPDATE_SNAPSHOT=1``. Before each update the rank copies every
parameter and persistent buffer into host buffers (pinned when the model is on an
accelerator) that are allocated once and reused; restoring copies them back. It costs host
memory equal to the rank's weights and one device-to-host copy of them per update.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Tuple

import torch

logger = logging.getLogger(__name__)

_ATTR = "_sglang_fastload_snapshot"


def _unique_tensors(model: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, each storage region once (tied weights share)."""
    seen = set()
    out = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen or t.numel() == 0:
            continue
        seen.add(key)
        out.append((name, t.data))
    return out


_ALIGN = 64


class WeightSnapshot:
    """Host copies of one model's weights, reused between updates."""

    def __init__(self):
        self.host: Dict[str, torch.Tensor] = {}
        self.layout: List[Tuple[str, Tuple[int, ...], torch.dtype]] = []
        self.slab: torch.Tensor = torch.empty(0, dtype=torch.uint8)  # ``host`` are views of it
        self.nbytes = 0
        self.seconds = 0.0

    def _allocate(self, tensors: List[Tuple[str, torch.Tensor]]) -> None:
        # One slab for every buffer: pinning is paid per allocation, and one large
        # registration costs a fraction of pin_memory=True per tensor (host_memory.py).
        offsets, pos = [], 0
        for _, t in tensors:
            pos = -(-pos // _ALIGN) * _ALIGN
            offsets.append(pos)
            pos += t.numel() * t.element_size()
        self.host, self.slab = {}, torch.empty(0, dtype=torch.uint8)
        if any(t.is_cuda for _, t in tensors):
            from sglang_fastload.loader.host_memory import pinned_empty

            self.slab = pinned_empty(pos)
        else:
            self.slab = torch.empty(pos, dtype=torch.uint8)
        for (name, t), off in zip(tensors, offsets):
            nbytes = t.numel() * t.element_size()
            self.host[name] = self.slab.narrow(0, off, nbytes).view(t.dtype).view(t.shape)
        self.layout = [(name, tuple(t.shape), t.dtype) for name, t in tensors]

    def capture(self, model: torch.nn.Module) -> None:
        """Copy the model's weights into the host buffers (allocating them the first time)."""
        t0 = time.perf_counter()
        tensors = _unique_tensors(model)
        if [(name, tuple(t.shape), t.dtype) for name, t in tensors] != self.layout:
            self._allocate(tensors)
        for name, t in tensors:
            self.host[name].copy_(t, non_blocking=t.is_cuda)
        if any(t.is_cuda for _, t in tensors):
            torch.cuda.synchronize()
        self.nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        self.seconds = time.perf_counter() - t0

    def restore(self, model: torch.nn.Module) -> None:
        """Copy the host buffers back into the model's weights."""
        tensors = _unique_tensors(model)
        for name, t in tensors:
            t.copy_(self.host[name], non_blocking=t.is_cuda)
        if any(t.is_cuda for _, t in tensors):
            torch.cuda.synchronize()


def snapshot_of(model: torch.nn.Module) -> WeightSnapshot:
    """The snapshot kept for ``model`` (created empty on first use)."""
    snap = model.__dict__.get(_ATTR)
    if snap is None:
        snap = WeightSnapshot()
        model.__dict__[_ATTR] = snap
    return snap
