"""A load plan's copies out of a scratch that holds the checkpoint files' bytes.

``startup_stream.py`` fills one scratch (device memory on CUDA, host memory on the CPU) with
every file's tensor bytes while the plan is built; this runs the plan out of it. Each step
does what the executor does with the same step's staged bytes: a step whose bytes are its
destination's elements (same dtype, both contiguous) is a plain byte copy, merged with the
next one where both sides continue (on CUDA one ``cudaMemcpyAsync`` each); every other step
(strided, gathered, converted) views the bytes as the checkpoint's dtype and geometry and
lets torch copy them into the parameter, as the executor's device scratch does. The copies
are worked out and queued file by file (``copies_of_file``), so that the stream can queue
each file's as soon as that file has landed, while later files are still read.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch

from sglang_fastload.loader import cuda_runtime
from sglang_fastload.loader.binding import _device_bytes, _param_view, _reads_into_parameter
from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan


def step_source(step: CopyStep, scratch: torch.Tensor, origin: int, dtype: torch.dtype) -> torch.Tensor:
    """The elements ``step`` copies, viewed in ``scratch``.

    Args:
        step: a plan step.
        scratch: uint8 tensor holding the step's file, its byte 0 at index ``origin``
            (which may be negative: only the tensor bytes are held).
        origin: see ``scratch``.
        dtype: the checkpoint tensor's dtype.

    Returns:
        A view (or, for a step of several reads or bytes not aligned to ``dtype``, a
        contiguous copy) with the geometry of the step's ``view``.
    """
    pieces = [scratch.narrow(0, origin + off, n) for off, n in step.reads]
    raw = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()  # a file whose tensors are not aligned to their element size
    off, sizes, strides = step.view
    elements = raw.view(dtype)
    return elements.as_strided(sizes, strides, elements.storage_offset() + off)


@dataclasses.dataclass
class FileCopies:
    """One file's copies out of the scratch, ready to queue.

    Attributes:
        path: the file.
        runs: plain byte copies for the runtime, ``(destination address, scratch address,
            nbytes)``, merged where both sides continue within one parameter.
        dsts, srcs: every other copy (and, without a runtime, the plain ones too), as
            parameter views and scratch views for torch.
    """

    path: str
    runs: List[Tuple[int, int, int]]
    dsts: List[torch.Tensor]
    srcs: List[torch.Tensor]

    def queue(self, runtime: Optional[cuda_runtime.CudaRuntime], stream: int) -> None:
        """Queue the copies (on CUDA on ``stream``; on the CPU they run here)."""
        for address, source, n in self.runs:
            runtime.copy_within_device(address, source, n, stream)
        if self.dsts:
            torch._foreach_copy_(self.dsts, self.srcs)


def zero_fills(plan: LoadPlan, params: Dict[str, torch.Tensor]) -> None:
    """Write the plan's zero-fills (on CUDA queued on the current stream)."""
    for z in plan.zeros:
        _param_view(params[z.param], z.dst).zero_()


def copies_of_file(
    fp: FilePlan,
    params: Dict[str, torch.Tensor],
    scratch: torch.Tensor,
    origin: int,
    runtime: Optional[cuda_runtime.CudaRuntime] = None,
) -> FileCopies:
    """Every step of one file of a plan as a copy out of ``scratch`` (nothing queued yet).

    Args:
        fp: the file's part of the plan.
        params: ``{name: parameter data}``, checked against the plan by the caller.
        scratch: uint8 tensor on the parameters' device holding the files' tensor bytes.
        origin: index in ``scratch`` of the file's byte 0 (negative where the file's header
            is not held).
        runtime: on CUDA, the runtime that will queue the plain byte copies (None: torch
            copies them).
    """
    # Plain byte copies, merged where both sides continue within one parameter (a copy may
    # not run from one allocation into the next, even where their addresses meet).
    runs: List[List] = []  # [destination address, scratch index, nbytes, parameter, byte offset]
    dsts: List[torch.Tensor] = []
    srcs: List[torch.Tensor] = []
    for step in fp.steps:
        param = params[step.param]
        if not step.gather and len(step.reads) == 1 and _reads_into_parameter(step, param.dtype):
            at = step.dst[0] * param.element_size()
            address = param.data_ptr() + at
            index = origin + step.reads[0][0]
            last = runs[-1] if runs else None
            if last and last[3] == step.param and last[0] + last[2] == address and last[1] + last[2] == index:
                last[2] += step.nbytes
            else:
                runs.append([address, index, step.nbytes, step.param, at])
            continue
        dsts.append(_param_view(param, step.dst))
        srcs.append(step_source(step, scratch, origin, step.src_dtype or param.dtype))
    if runtime is None:
        for _, index, n, name, at in runs:
            dsts.append(_device_bytes(params[name], at, n))
            srcs.append(scratch.narrow(0, index, n))
        runs = []
    base = scratch.data_ptr()
    return FileCopies(fp.path, [(a, base + i, n) for a, i, n, _, _ in runs], dsts, srcs)


def copy_plan_from_scratch(
    plan: LoadPlan,
    params: Dict[str, torch.Tensor],
    scratch: torch.Tensor,
    origins: Dict[str, int],
    runtime: Optional[cuda_runtime.CudaRuntime] = None,
    landed: Optional[Callable[[str], bool]] = None,
) -> bool:
    """Write every parameter region of ``plan`` from ``scratch`` (zero-fills first), file by file.

    Args:
        plan, params, scratch, runtime: as for ``copies_of_file``.
        origins: ``{path: index in scratch of the file's byte 0}`` for the plan's files.
            Copies are queued on the current stream; the caller synchronizes.
        landed: called with each file's path before its copies; it waits until the file's
            bytes are in the scratch and answers False if they never will be (None: all are).

    Returns:
        True when every file's copies were queued; False when ``landed`` stopped them.
    """
    zero_fills(plan, params)
    stream = torch.cuda.current_stream(scratch.device).cuda_stream if scratch.is_cuda else 0
    for fp in plan.files:
        if landed is not None and not landed(fp.path):
            return False
        # The device copies this file while the next one's copies are worked out.
        copies_of_file(fp, params, scratch, origins[fp.path], runtime).queue(runtime, stream)
    return True
