"""SGLang's pre-load restore pass without the staged hook calls that would do nothing.

Before every update upstream's ``DefaultModelLoader.restore_weights_before_loading`` walks the
model and, for each module with a quantization method, stages the module on the target device
and calls ``quant_method.restore_weights_before_loading(module)``. For unquantized layers that
hook is ``QuantizeMethodBase``'s, whose body is ``return``: the pass then moves nothing and
changes nothing, yet enters a staging context per layer. With a CPU target that context is all
that is saved (a 36-layer dense model's pass: 1.8 -> 1.3 ms on a 2-CPU host); on CUDA the
staging shortcut (``post_load_staging.py``) already made it cheap, and the residency test both
need remains (0.07 ms saved of ~1 ms on an H200 host, docs/benchmarks.md).

Here upstream's pass runs as written except for the modules where it would do nothing: the
hook's body provably does nothing (its code is a bare ``return None``) and staging would move
nothing (a CPU target, or every tensor of the module already on the target CUDA device). The
loader fork installs it only while upstream's function is the one it was written from
(``constants.UPSTREAM_WALK_SOURCES``), as with ``module_walks``' twins.
"""

from __future__ import annotations

import dis
import functools
import inspect
import types
from typing import Callable, Dict

import torch

from sglang_fastload.module_walks import unchanged_upstream
from sglang_fastload.post_load_staging import resident_on, resolved_cuda

__all__ = ["does_nothing", "skip_idle_restores"]

_ASYNC_OR_GENERATOR = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR
# What a body of only ``return`` / ``pass`` / a docstring compiles to (3.12+, then 3.11).
_RETURN_NONE_BODIES = ([("RETURN_CONST", None)], [("LOAD_CONST", None), ("RETURN_VALUE", None)])
_NO_EFFECT_OPS = frozenset(("RESUME", "NOP", "CACHE"))
_IDLE_CODES: Dict[types.CodeType, bool] = {}


def does_nothing(function: object) -> bool:
    """Whether calling ``function`` certainly has no effect: a plain Python function (or a
    method bound to one) whose whole body is ``return None``.

    Args:
        function: what upstream would call.

    Returns:
        True only for such a body; False for anything else (builtins, partials, wrappers).
    """
    if isinstance(function, types.MethodType):
        function = function.__func__
    if not isinstance(function, types.FunctionType):
        return False
    code = function.__code__
    idle = _IDLE_CODES.get(code)
    if idle is None:
        idle = _IDLE_CODES[code] = not (code.co_flags & _ASYNC_OR_GENERATOR) and [
            (i.opname, i.argval) for i in dis.get_instructions(code) if i.opname not in _NO_EFFECT_OPS
        ] in _RETURN_NONE_BODIES
    return idle


def _idle(module: torch.nn.Module, quant_method: object, target_device: torch.device) -> bool:
    """Whether upstream's staged hook call does nothing for this module (module docstring)."""
    if not does_nothing(quant_method.restore_weights_before_loading):
        return False
    if target_device.type == "cpu":
        return True  # upstream's context stages nothing for a CPU target
    device = resolved_cuda(target_device)
    return device is not None and resident_on(module, device)


def skip_idle_restores(upstream: Callable, loader: types.ModuleType) -> Callable:
    """Upstream's ``DefaultModelLoader.restore_weights_before_loading`` (sglang 0.5.23) without
    the staged calls that would do nothing.

    Args:
        upstream: upstream's function ``(model, target_device)``.
        loader: the module it lives in; its walk, staging context, reload test and hook base
            class are looked up there at each call, as upstream's body does.

    Returns:
        A function with the same arguments and effect, or ``upstream`` itself when its source
        is not the recorded one.
    """
    if not unchanged_upstream(upstream):
        return upstream

    def restore_weights_before_loading(model, target_device):
        if loader.QuantizedRLModelLoader.is_reload_scenario(model):
            return
        device = torch.device(target_device)
        for module, quant_method in loader._modules_with_quant_method(model):
            if isinstance(quant_method, loader.QuantizeMethodBase) and not _idle(module, quant_method, device):
                with loader.device_loading_context(module, target_device):
                    quant_method.restore_weights_before_loading(module)

    return functools.update_wrapper(restore_weights_before_loading, upstream)
