"""Compare the overlay's per-update module walks with upstream's own on a real model (run in a
rank worker when ``SGLANG_RIG_PROBE_MODULE_WALKS=1``; see ``sglang_fastload/module_walks.py``)."""

from __future__ import annotations

from typing import Dict, List

ENV = "SGLANG_RIG_PROBE_MODULE_WALKS"


def probe(model) -> Dict[str, object]:
    """``{"modules": n, "quant_methods": n, "mismatches": [...]}`` for ``model``: the module walk,
    the parameters by name, the post-load hooks' walk and the derived-weight-cache check (as is, then with a reason and
    a weight split planted on a module, then both) against the functions the forks wrap."""
    from sglang.srt.model_executor.model_runner_components import weight_updater
    from sglang.srt.model_loader import loader

    from sglang_fastload.module_walks import parameters_by_name, walk_modules

    mismatches: List[str] = []
    modules = list(model.modules())
    if [id(m) for m in walk_modules(model)] != [id(m) for m in modules]:
        mismatches.append("walk_modules differs from model.modules()")
    named = list(model.named_parameters(remove_duplicate=False))
    if [(n, id(p)) for n, p in parameters_by_name(model).items()] != [(n, id(p)) for n, p in named]:
        mismatches.append("parameters_by_name differs from named_parameters(remove_duplicate=False)")
    quant = loader._modules_with_quant_method
    theirs = [(id(m), id(q)) for m, q in quant.__wrapped__(model)]
    if [(id(m), id(q)) for m, q in quant(model)] != theirs:
        mismatches.append("_modules_with_quant_method differs")
    check = weight_updater._unsupported_derived_weight_cache_error
    plants = [[], [(modules[-1], "_derived_weight_cache_error", "planted reason")],
              [(modules[len(modules) // 2], "_hc_ffn_bf16_parts", ("planted",))]]
    plants.append(plants[1] + plants[2])
    for planted in plants:
        for module, name, value in planted:
            module.__dict__[name] = value
        try:
            expected = check.__wrapped__(model)
            if check(model) is not expected or (expected is None) != (not planted):
                mismatches.append(f"derived-weight-cache check differs with {[n for _, n, _ in planted]}")
        finally:
            for module, name, _ in planted:
                module.__dict__.pop(name, None)
    return {"modules": len(modules), "quant_methods": len(theirs), "mismatches": mismatches}
