"""SGLang's per-update walks over the model's modules, with the same answers and less work.

Before and after every update, upstream walks the whole module tree: the derived-weight-cache
check (``_unsupported_derived_weight_cache_error``: two walks, five attribute probes per
module) and the post-load hooks (``_modules_with_quant_method``, once before the load and once
after). Most probes miss, and a missing attribute of a ``torch.nn.Module`` goes through its
Python ``__getattr__``, which builds and raises an ``AttributeError`` for ``getattr`` to
catch: ~4 us each on a 2-CPU host, ~9 ms of every update of a 36-layer dense model there.

``attribute_or_none`` answers ``getattr(module, name, None)`` exactly without raising where the
module uses ``nn.Module``'s own attribute machinery, and ``walk_modules`` yields
``model.named_modules()``'s modules in the same order without a generator per level. The
forks install the replacements below only while upstream's function is the one they were
written from (``constants.UPSTREAM_WALK_SOURCES``: a digest of its source text); otherwise
upstream's own stays, with one warning, until the replacement is reviewed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from sglang_fastload import constants

logger = logging.getLogger(__name__)

_MODULE = torch.nn.Module
_OBJECT_GETATTRIBUTE = object.__getattribute__
_MODULE_GETATTR = torch.nn.Module.__getattr__
_REGISTRIES = ("_parameters", "_buffers", "_modules")  # nn.Module.__getattr__'s, in its order


def _plain_lookup(cls: type, names: Tuple[str, ...]) -> bool:
    """Whether an instance of ``cls`` finds each of ``names`` only in its own ``__dict__`` or
    in ``nn.Module.__getattr__``'s registries: neither lookup hook overridden, and no class
    (or metaclass) attribute of that name."""
    if cls.__getattribute__ is not _OBJECT_GETATTRIBUTE or cls.__getattr__ is not _MODULE_GETATTR:
        return False
    for name in names:
        if hasattr(cls, name):
            return False
    return True


def _named_anywhere(state: dict, wanted: frozenset) -> bool:
    """Whether one of ``wanted`` is in a module's ``__dict__`` (``state``) or its registries."""
    if not state.keys().isdisjoint(wanted):
        return True
    for registry in _REGISTRIES:
        entries = state.get(registry)
        if entries and not entries.keys().isdisjoint(wanted):
            return True
    return False


def attribute_or_none(module: torch.nn.Module, name: str) -> object:
    """``getattr(module, name, None)``, without raising when the attribute is missing.

    Args:
        module: the module.
        name: the attribute.

    Returns:
        The attribute, or None where ``getattr`` would raise ``AttributeError``.
    """
    state = module.__dict__
    if name in state or not _plain_lookup(type(module), (name,)) or _registered(state, name):
        return getattr(module, name, None)  # a hit, or the exact way
    return None


def _registered(state: dict, name: str) -> bool:
    """Whether ``name`` is in one of a module's registries (``state``: its ``__dict__``)."""
    for registry in _REGISTRIES:
        entries = state.get(registry)
        if entries and name in entries:
            return True
    return False


def possible_holders(modules: List[torch.nn.Module], names: Tuple[str, ...]) -> List[torch.nn.Module]:
    """``modules`` without those for which ``getattr(module, name, None)`` certainly misses
    (quietly, running no code) for every one of ``names``, in order. For one check during which
    no class changes: each class is looked at once."""
    wanted = frozenset(names)
    plain_classes: dict = {}
    holders = []
    for module in modules:
        cls = type(module)
        plain = plain_classes.get(cls)
        if plain is None:
            plain = plain_classes[cls] = _plain_lookup(cls, names)
        if not plain or _named_anywhere(module.__dict__, wanted):
            holders.append(module)
    return holders


def walk_modules(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The modules of ``model.named_modules()``, lazily and in its order (pre-order, duplicates
    and ``None`` children skipped); a module whose class walks itself differently is asked
    for its own walk, with the same memo and prefix, as ``named_modules`` would."""
    own_walk = _MODULE.named_modules
    if type(model).named_modules is not own_walk:
        yield from (module for _, module in model.named_modules())
        return
    memo = set()
    # Each level: the children still to visit and the parent's prefix.
    stack = [(iter((("", model),)), None)]
    while stack:
        children, parent = stack[-1]
        for name, module in children:
            if module is None:
                continue
            prefix = name if not parent else parent + "." + name
            if type(module).named_modules is not own_walk:
                for _, inner in module.named_modules(memo, prefix, True):
                    yield inner
                continue
            if module in memo:
                continue
            memo.add(module)
            yield module
            stack.append((iter(module._modules.items()), prefix))
            break
        else:
            stack.pop()


def parameters_by_name(model: torch.nn.Module) -> Dict[str, torch.nn.Parameter]:
    """``dict(model.named_parameters(remove_duplicate=False))``, without a generator per level.

    Same names, parameters and order: pre-order over every path to a module (a shared module
    under each of its names), ``None`` entries skipped; a module whose class walks itself
    differently is asked for its own walk with the prefix, as ``named_modules`` would; a model
    whose class lists its parameters itself is asked directly.
    """
    cls = type(model)
    own_walk = _MODULE.named_modules
    if (cls.named_parameters is not _MODULE.named_parameters or cls._named_members is not _MODULE._named_members
            or cls.named_modules is not own_walk):
        return dict(model.named_parameters(remove_duplicate=False))
    memo: set = set()  # passed on as named_modules does (never filled without duplicate removal)
    out: Dict[str, torch.nn.Parameter] = {}
    stack = [("", model)]
    while stack:
        prefix, module = stack.pop()
        if type(module).named_modules is not own_walk:
            walked = module.named_modules(memo, prefix, False)
        else:
            walked = ((prefix, module),)
            children = [(name if not prefix else prefix + "." + name, child)
                        for name, child in module._modules.items() if child is not None]
            stack.extend(reversed(children))
        for module_prefix, inner in walked:
            dot = "." if module_prefix else ""
            for name, parameter in inner._parameters.items():
                if parameter is not None:
                    out[module_prefix + dot + name] = parameter
    return out


def source_digest(function: Callable) -> Optional[str]:
    """SHA-256 of ``function``'s source text (None when its source cannot be read)."""
    try:
        return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()
    except Exception:  # no source to read (e.g. compiled files only): keep upstream's function
        return None


def unchanged_upstream(upstream: Callable) -> bool:
    """Whether ``upstream``'s source is the one its faster twin here was written from
    (``constants.UPSTREAM_WALK_SOURCES``); warns once per function when it is not."""
    name = upstream.__qualname__  # "Class.method" for a method
    expected = constants.UPSTREAM_WALK_SOURCES.get(name)
    if expected is not None and source_digest(upstream) == expected:
        return True
    logger.warning("sglang-fastload: upstream's %s differs from the one its faster twin was written from; "
                   "upstream's is kept", name)
    return False


# The attributes upstream's derived-weight-cache check probes, in its order.
_SPLIT_ATTRIBUTES = ("_hc_attn_tf32_parts", "_hc_ffn_tf32_parts", "_hc_attn_bf16_parts", "_hc_ffn_bf16_parts")
_CACHE_ERROR_ATTRIBUTE = "_derived_weight_cache_error"


def faster_derived_weight_cache_check(upstream: Callable) -> Callable:
    """Upstream's ``_unsupported_derived_weight_cache_error`` (sglang 0.5.23) answered from one
    list of the model's modules and probes that do not raise (while ``unchanged_upstream``)."""
    # Upstream's own messages, taken from its code (both strings are in the digested source).
    split_message = _constant_containing(upstream, "compensated mHC weight splits are active")
    hpc_message = _constant_containing(upstream, "GEMM optimization is enabled")

    def _unsupported_derived_weight_cache_error(model: Optional[torch.nn.Module] = None) -> Optional[str]:
        if model is not None:
            if type(model).modules is not _MODULE.modules:
                return upstream(model)
            # Upstream's two walks, over the modules where a probe may find something.
            modules = possible_holders(list(walk_modules(model)), _SPLIT_ATTRIBUTES + (_CACHE_ERROR_ATTRIBUTE,))
            if any(getattr(module, name, None) is not None for module in modules for name in _SPLIT_ATTRIBUTES):
                return split_message
            for module in modules:
                reason = getattr(module, _CACHE_ERROR_ATTRIBUTE, None)
                if reason is not None:
                    return reason
        from sglang.kernels.ops.gemm.bf16_fp32 import hpc_bf16xfp32_gemm_enabled

        if hpc_bf16xfp32_gemm_enabled():
            return hpc_message
        return None

    if not unchanged_upstream(upstream) or split_message is None or hpc_message is None:
        return upstream
    return functools.update_wrapper(_unsupported_derived_weight_cache_error, upstream)


def faster_modules_with_quant_method(upstream: Callable) -> Callable:
    """Upstream's ``_modules_with_quant_method`` (sglang 0.5.23): ``(module, quant_method)`` of
    every module that has one, LoRA wrappers skipped, lazily (the hooks run between items;
    while ``unchanged_upstream``)."""

    def _modules_with_quant_method(model: torch.nn.Module) -> Iterator[Tuple[torch.nn.Module, object]]:
        from sglang.srt.lora.layers import BaseLayerWithLoRA

        for module in walk_modules(model):
            if isinstance(module, BaseLayerWithLoRA):
                continue
            # Looked up module by module: a hook may change anything between two items.
            quant_method = attribute_or_none(module, "quant_method")
            if quant_method is not None:
                yield module, quant_method

    if not unchanged_upstream(upstream):
        return upstream
    return functools.update_wrapper(_modules_with_quant_method, upstream)


def _constant_containing(function: Callable, text: str) -> Optional[str]:
    """The string constant of ``function`` that contains ``text`` (upstream's own message)."""
    found = [c for c in function.__code__.co_consts if isinstance(c, str) and text in c]
    return found[0] if len(found) == 1 else None
