"""Timers around the parts of an update outside its reads and copies (no profiler).

Shared by ``update_parts_bench.py`` and ``gpu_bench.py --time-parts``: each part of SGLang's
``update_weights_from_disk`` (the derived-weight-cache check, the loader dispatch, the weights
iterator, SGLang's ``restore_weights_before_loading`` and ``postprocess_weights``, the fast
loader's load with its ``execute_plan`` nested, the model fields' update) is wrapped in a
timer; ``rest`` is the update's time outside all of them (the update guard, upstream's own lines).
"""

from __future__ import annotations

import functools
import time
from typing import Dict, List, Optional

EXECUTE = "  execute_plan (reads and copies)"
REST = "rest (guard, upstream's own lines)"


class PartTimer:
    """Seconds spent in wrapped callables during one update, by part name."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.top: List[str] = []  # parts that do not nest in one another, in the order they run
        self.nested: List[str] = []

    def wrap(self, name, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def reset(self) -> None:
        """Forget what was timed so far (call before the update to split)."""
        self.seconds = {}

    def names(self) -> List[str]:
        return self.top + self.nested

    def split(self, whole: float) -> Dict[str, float]:
        """The last update's parts, plus ``rest``, ``whole update`` and ``outside execute_plan``
        (seconds), from its measured ``whole`` time; then starts over."""
        out = {name: self.seconds.get(name, 0.0) for name in self.names()}
        out[REST] = max(0.0, whole - sum(out[name] for name in self.top))
        out["whole update"] = whole
        out["outside execute_plan"] = whole - out[EXECUTE]
        self.reset()
        return out


_TIMER: Optional[PartTimer] = None


def install(updater) -> PartTimer:
    """Wrap the parts of ``updater``'s updates in the process's one timer (the classes'
    functions are replaced once, so every later update in this process is timed too).

    Args:
        updater: SGLang's ``WeightUpdater`` of the model being updated.

    Returns:
        The timer; ``reset`` it before an update and ``split`` it after.
    """
    global _TIMER
    if _TIMER is None:
        _TIMER = _install_on_classes()
    timer = _TIMER
    fields = updater.update_model_fields
    if not getattr(fields, "_part_timed", False):
        fields = timer.wrap("model fields", fields)
        fields._part_timed = True
        object.__setattr__(updater, "update_model_fields", fields)
    return timer


def _install_on_classes() -> PartTimer:
    from sglang.srt.model_executor.model_runner_components import weight_updater
    from sglang.srt.model_loader.loader import DefaultModelLoader

    from sglang_fastload.loader import fast_model_loader

    timer = PartTimer()
    top = [
        (weight_updater, "_unsupported_derived_weight_cache_error", "derived-weight-cache check"),
        (weight_updater, "get_model_loader", "loader dispatch"),
        (fast_model_loader.FastModelLoader, "_get_weights_iterator", "weights iterator (validates the checkpoint)"),
        (DefaultModelLoader, "restore_weights_before_loading", "restore_weights_before_loading"),
        (fast_model_loader.FastModelLoader, "load_weights_and_postprocess", "load (execute_plan + postprocess)"),
    ]
    nested = [
        (fast_model_loader, "execute_plan", EXECUTE),
        (DefaultModelLoader, "postprocess_weights", "  postprocess_weights"),
    ]
    for owner, attribute, name in top + nested:
        original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
        if isinstance(original, staticmethod):
            setattr(owner, attribute, staticmethod(timer.wrap(name, original.__func__)))
        else:
            setattr(owner, attribute, timer.wrap(name, original))
    timer.top = [name for _, _, name in top] + ["model fields"]
    timer.nested = [name for _, _, name in nested]
    return timer
