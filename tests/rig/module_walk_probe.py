"""Compare the overlay's per-update module walks with upstream's own on a real model (run in a
rank worker when ``SGLANG_RIG_PROBE_MODULE_WALKS=1``; see ``sglang_fastload/module_walks.py``),
and the plan store key's walks with the same walks done by torch's own iterators."""

from __future__ import annotations

import sys
from typing import Dict, List


def source_modules_by_torchs_walks(model) -> List[str]:
    """``plan_key.model_source_modules`` as written with ``model.modules()`` and ``model.parameters()``."""
    from sglang_fastload.loader.plan_key import SOURCE_PACKAGES

    classes = {type(m) for m in model.modules()}
    loaders = {}
    for p in model.parameters():
        classes.add(type(p))
        loader = getattr(p, "weight_loader", None)
        func = getattr(loader, "__func__", loader)
        loaders[id(func)] = func
    names = {c.__module__ for cls in classes for c in cls.__mro__}
    names.update(m for m in (getattr(f, "__module__", None) for f in loaders.values()) if m)
    names.update(n for n in list(sys.modules) if n.startswith(SOURCE_PACKAGES))
    return sorted(n for n in names if n == "sglang" or n.startswith("sglang."))


def parameter_layout_by_torchs_walk(model) -> List[list]:
    """``plan_key.parameter_layout`` as written with ``model.named_parameters(remove_duplicate=False)``."""
    out, first = [], {}
    for i, (name, p) in enumerate(model.named_parameters(remove_duplicate=False)):
        storage = p.untyped_storage()._cdata
        out.append([name, list(p.shape), str(p.dtype), first.setdefault(storage, i), p.storage_offset()])
    return out

ENV = "SGLANG_RIG_PROBE_MODULE_WALKS"


def probe(model) -> Dict[str, object]:
    """``{"modules": n, "quant_methods": n, "mismatches": [...]}`` for ``model``: the module walk,
    the parameters by name, the post-load hooks' walk and the derived-weight-cache check (as is, then with a reason and
    a weight split planted on a module, then both) against the functions the forks wrap."""
    from sglang.srt.model_executor.model_runner_components import weight_updater
    from sglang.srt.model_loader import loader

    from sglang_fastload.loader import plan_key
    from sglang_fastload.module_walks import parameters_by_name, walk_modules

    mismatches: List[str] = []
    modules = list(model.modules())
    if [id(m) for m in walk_modules(model)] != [id(m) for m in modules]:
        mismatches.append("walk_modules differs from model.modules()")
    named = list(model.named_parameters(remove_duplicate=False))
    if [(n, id(p)) for n, p in parameters_by_name(model).items()] != [(n, id(p)) for n, p in named]:
        mismatches.append("parameters_by_name differs from named_parameters(remove_duplicate=False)")
    if plan_key.model_source_modules(model) != source_modules_by_torchs_walks(model):
        mismatches.append("plan_key.model_source_modules differs from the same walk by torch's iterators")
    if plan_key.parameter_layout(model) != parameter_layout_by_torchs_walk(model):
        mismatches.append("plan_key.parameter_layout differs from the same walk by torch's iterators")
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
