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


class WeightSnapshot:
    """Host copies of one model's weights, reused between updates."""

    def __init__(self):
        self.host: Dict[str, torch.Tensor] = {}
        self.nbytes = 0
        self.seconds = 0.0

    def capture(self, model: torch.nn.Module) -> None:
        """Copy the model's weights into the host buffers (allocating them the first time)."""
        t0 = time.perf_counter()
        tensors = _unique_tensors(model)
        for name, t in tensors:
            buf = self.host.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
                self.host[name] = buf
            buf.copy_(t, non_blocking=t.is_cuda)
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
