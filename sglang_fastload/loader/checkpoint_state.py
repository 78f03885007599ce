"""What a model remembers between fast loads: whether it was loaded yet, and cached plans.

Kept on the model object itself, so it lives and dies with the model.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Optional

from sglang_fastload.loader.plan import LoadPlan

_ATTR = "_sglang_fastload_state"
_MAX_PLANS = 2  # RL alternates between checkpoints of one layout; keep a spare


@dataclasses.dataclass
class ModelLoadState:
    """Per-model fast-load memory.

    Attributes:
        loaded: a fast load into this model finished (later loads are updates). Updates need
            not carry the start-up checkpoint's tensor set: each new layout is replayed
            against the model's own loader, which decides what it consumes.
        plans: layout key -> plan, most recent last.
        plan_builds / plan_hits / plan_reads: plans built, reused from memory, read from
            the plan store (observable in logs and tests).
        executor_cache: the executor's views bound to this model's parameters (reused by
            the next load of the same plan).
    """

    loaded: bool = False
    plans: "collections.OrderedDict" = dataclasses.field(default_factory=collections.OrderedDict)
    plan_builds: int = 0
    plan_hits: int = 0
    plan_reads: int = 0
    executor_cache: dict = dataclasses.field(default_factory=dict)

    def cached_plan(self, key) -> Optional[LoadPlan]:
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
            self.plan_hits += 1
        return plan

    def remember_plan(self, key, plan: LoadPlan, *, built: bool = True) -> None:
        """Keep ``plan`` for ``key``; ``built`` False: it was read from the plan store."""
        if built:
            self.plan_builds += 1
        else:
            self.plan_reads += 1
        self.plans[key] = plan
        while len(self.plans) > _MAX_PLANS:
            self.plans.popitem(last=False)


def state_of(model) -> ModelLoadState:
    """Return (creating if needed) the fast-load state attached to ``model``."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        state = ModelLoadState()
        model.__dict__[_ATTR] = state
    return state
