"""This process's parallel group, ranks and widths, as SGLang answers them.

SGLang answers them through ``runtime_context.get_parallel()`` (0.5.20 to 0.5.23 have it)
and, since 0.5.21, deprecates the ``parallel_state`` getters (one warning each); a later
release may drop the getters. Every question goes to ``get_parallel()`` first and to the
getter only where it does not answer (nothing published in this process, or a release
without the context), so that no release makes a rank of a tensor-parallel group think it
loads alone.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

# ``get_parallel()`` attribute -> the ``parallel_state`` getter of the same answer.
GETTERS: Dict[str, str] = {
    "tp_group": "get_tp_group",
    "tp_rank": "get_tensor_model_parallel_rank",
    "tp_size": "get_tensor_model_parallel_world_size",
    "launch_world_rank": "get_world_rank",
    "launch_world_size": "get_world_size",
    "attn_tp_rank": "get_attn_tensor_model_parallel_rank",
    "attn_tp_size": "get_attn_tensor_model_parallel_world_size",
    "attn_cp_rank": "get_attn_context_model_parallel_rank",
    "attn_cp_size": "get_attn_context_model_parallel_world_size",
    "pp_rank": "get_pipeline_model_parallel_rank",
    "pp_size": "get_pipeline_model_parallel_world_size",
    "moe_ep_rank": "get_moe_expert_parallel_rank",
    "moe_ep_size": "get_moe_expert_parallel_world_size",
    "moe_tp_rank": "get_moe_tensor_parallel_rank",
    "moe_tp_size": "get_moe_tensor_parallel_world_size",
    "moe_dp_rank": "get_moe_data_parallel_rank",
    "moe_dp_size": "get_moe_data_parallel_world_size",
    "dcp_rank": "get_dcp_rank",
    "dcp_size": "get_dcp_world_size",
}

# The groups a load plan's placement names, each as (rank, width) attributes.
PLACEMENT_GROUPS: Dict[str, Tuple[str, str]] = {
    "world": ("launch_world_rank", "launch_world_size"),
    "tp": ("tp_rank", "tp_size"),
    "attn_tp": ("attn_tp_rank", "attn_tp_size"),
    "attn_cp": ("attn_cp_rank", "attn_cp_size"),
    "pp": ("pp_rank", "pp_size"),
    "moe_ep": ("moe_ep_rank", "moe_ep_size"),
    "moe_tp": ("moe_tp_rank", "moe_tp_size"),
    "moe_dp": ("moe_dp_rank", "moe_dp_size"),
    "dcp": ("dcp_rank", "dcp_size"),
    "attn_dp": ("attn_dp_rank", "attn_dp_size"),
}


def parallel_value(name: str) -> Optional[Any]:
    """``get_parallel().<name>``, else the answer of its ``parallel_state`` getter (``GETTERS``).

    Args:
        name: a ``get_parallel()`` attribute (``"tp_size"``, ``"tp_group"``, ...).

    Returns:
        The answer, or None where neither SGLang's context nor its getter answers here
        (nothing published, no groups built, an older or newer release).
    """
    try:
        from sglang.srt.runtime_context import get_parallel

        return getattr(get_parallel(), name)
    except Exception:  # noqa: BLE001 - not published here, or a release without it
        pass
    getter = GETTERS.get(name)
    if getter is None:
        return None
    try:
        from sglang.srt.distributed import parallel_state

        return getattr(parallel_state, getter)()
    except Exception:  # noqa: BLE001 - no group here, or a release without the getter
        return None


def parallel_int(name: str) -> Optional[int]:
    """``parallel_value(name)`` as an int (None where there is no answer)."""
    value = parallel_value(name)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def tp_size() -> Optional[int]:
    """This process's tensor-parallel width, or None where SGLang has none here."""
    return parallel_int("tp_size")


def tp_rank() -> Optional[int]:
    """This process's tensor-parallel rank, or None where SGLang has none here."""
    return parallel_int("tp_rank")


def tp_group():
    """SGLang's tensor-parallel ``GroupCoordinator`` for this process, or None."""
    return parallel_value("tp_group")


def placement() -> Dict[str, Optional[int]]:
    """Every group's rank and width in this process (``PLACEMENT_GROUPS``; None: no answer).

    Returns:
        ``{"tp_rank": 0, "tp_size": 2, ...}``: ``<group>_rank`` and ``<group>_size`` keys.
    """
    out: Dict[str, Optional[int]] = {}
    for group, (rank, size) in PLACEMENT_GROUPS.items():
        out[f"{group}_rank"] = parallel_int(rank)
        out[f"{group}_size"] = parallel_int(size)
    return out
