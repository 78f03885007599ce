"""The per-update module walks answer exactly as upstream's own functions (kept by the forks as
``__wrapped__``) on module trees built to hit every corner of attribute lookup; the forks bind
the faster twins only while upstream's source is the one they were written from. Real SGLang
models of every zoo architecture are compared in ``test_model_support.py``."""

from __future__ import annotations

import logging

import pytest
import torch

from sglang_fastload import constants, module_walks


@pytest.fixture(scope="module")
def derived_check():
    from sglang.srt.model_executor.model_runner_components import weight_updater

    return weight_updater._unsupported_derived_weight_cache_error


@pytest.fixture(scope="module")
def quant_walk():
    from sglang.srt.model_loader import loader

    return loader._modules_with_quant_method


def test_the_forks_bind_the_twins_and_upstreams_source_is_the_recorded_one(derived_check, quant_walk):
    for twin in (derived_check, quant_walk):
        upstream = twin.__wrapped__
        assert twin is not upstream and twin.__code__.co_filename == module_walks.__file__
        assert upstream.__name__ in constants.UPSTREAM_WALK_SOURCES
        assert module_walks.unchanged_upstream(upstream), (
            f"{upstream.__name__} changed upstream: review its twin, then record {module_walks.source_digest(upstream)}")


def test_a_changed_upstream_function_is_kept_with_one_warning(caplog, derived_check, quant_walk):
    def _unsupported_derived_weight_cache_error(model=None):  # same name, other source
        return "compensated mHC weight splits are active" if model is None else "GEMM optimization is enabled"

    def _modules_with_quant_method(model):
        yield from ()

    with caplog.at_level(logging.WARNING, logger=module_walks.__name__):
        assert module_walks.faster_derived_weight_cache_check(_unsupported_derived_weight_cache_error) is (
            _unsupported_derived_weight_cache_error)
        assert module_walks.faster_modules_with_quant_method(_modules_with_quant_method) is _modules_with_quant_method
    assert [r.getMessage().count("upstream's is kept") for r in caplog.records] == [1, 1]
    # The recorded digests are of the forks' functions as they are.
    assert module_walks.faster_derived_weight_cache_check(derived_check.__wrapped__) is not derived_check.__wrapped__


class _Leaf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2), requires_grad=False)


class _WithProperty(_Leaf):
    @property
    def _derived_weight_cache_error(self):
        return self.reason

    reason = None


class _RaisingProperty(_Leaf):
    @property
    def quant_method(self):
        raise AttributeError("not set up")


class _OwnGetattr(_Leaf):
    def __getattr__(self, name):
        if name == "_hc_ffn_bf16_parts":
            return self.__dict__.get("_parts_behind_getattr")
        return super().__getattr__(name)


class _ClassAttribute(_Leaf):
    quant_method = "class-level"


class _OwnWalk(torch.nn.Module):
    """Walks only its first child (a class that narrows ``named_modules``)."""

    def __init__(self):
        super().__init__()
        self.first = _Leaf()
        self.second = _Leaf()

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield prefix, self
        yield from self.first.named_modules(memo, prefix + ".first" if prefix else "first", remove_duplicate)


def _tree():
    root = torch.nn.Module()
    shared = _Leaf()
    root.a = torch.nn.Sequential(_Leaf(), shared, torch.nn.ModuleList([_WithProperty(), _RaisingProperty()]))
    root.b = torch.nn.ModuleDict({"x": shared, "own": _OwnWalk(), "c": _ClassAttribute(), "g": _OwnGetattr()})
    root.register_module("missing", None)
    root.c = shared  # a duplicate: walked once
    return root


def _walks_equal(model):
    assert [id(m) for m in module_walks.walk_modules(model)] == [id(m) for m in model.modules()]


def test_walk_matches_named_modules_order_duplicates_none_children_and_own_walks():
    model = _tree()
    _walks_equal(model)
    _walks_equal(model.b["own"])  # a root that walks itself
    assert model.b["own"].second not in list(module_walks.walk_modules(model))


def _parameters_equal(model):
    ours = module_walks.parameters_by_name(model)
    theirs = dict(model.named_parameters(remove_duplicate=False))
    assert list(ours) == list(theirs) and all(ours[n] is theirs[n] for n in theirs)
    return ours


class _OwnParameters(torch.nn.Module):
    """Lists one parameter only (a class that narrows ``named_parameters``)."""

    def __init__(self):
        super().__init__()
        self.inner = _Leaf()
        self.bias = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        yield "only", self.bias


def test_parameters_by_name_matches_named_parameters_with_every_path_and_own_walks():
    model = _tree()
    model.register_parameter("absent", None)
    model.a[0].register_parameter("tied", model.a[0].weight)  # one tensor under two names
    model.own_params = _OwnParameters()  # only its root's own listing counts for the root
    names = _parameters_equal(model)
    assert "c.weight" in names and "b.x.weight" in names  # the shared leaf under each name
    assert "b.own.first.weight" in names and "b.own.second.weight" not in names
    assert "own_params.inner.weight" in names and "absent" not in names
    _parameters_equal(model.b["own"])  # a root that walks itself
    assert list(module_walks.parameters_by_name(model.own_params)) == ["only"]


def test_walk_is_lazy_as_upstreams():
    model = _tree()
    ours, theirs = module_walks.walk_modules(model), model.modules()
    for _ in range(3):
        assert next(ours) is next(theirs)
    model.b["late"] = _Leaf()  # the tree changes between two items, where not yet walked
    assert [id(m) for m in ours] == [id(m) for m in theirs]
    assert model.b["late"] in list(module_walks.walk_modules(model))
    # A change inside the level being walked fails both walks alike.
    ours, theirs = module_walks.walk_modules(model), model.modules()
    for _ in range(3):
        assert next(ours) is next(theirs)
    model.a.append(_Leaf())
    for walk in (ours, theirs):
        with pytest.raises(RuntimeError, match="changed size during iteration"):
            list(walk)


@pytest.mark.parametrize("plant,answered", [
    (None, False),
    (("instance", "_derived_weight_cache_error", "reason one"), True),
    (("instance", "_hc_attn_tf32_parts", object()), True),
    (("instance", "_hc_ffn_tf32_parts", None), False),  # set but None: no split
    (("both", "", ""), True),
    (("property", "", ""), True),
    (("own_getattr", "", ""), True),
    (("buffer", "_hc_attn_bf16_parts", torch.ones(1)), True),
    (("parameter", "_derived_weight_cache_error", torch.nn.Parameter(torch.ones(1), requires_grad=False)), True),
    (("class", "_derived_weight_cache_error", "class-level reason"), True),
], ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_derived_check_answers_as_upstream(derived_check, plant, answered):
    model = _tree()
    leaves = [m for m in model.modules() if isinstance(m, _Leaf)]
    kind = plant[0] if plant else None
    if kind == "instance":
        setattr(leaves[-1], plant[1], plant[2])
    elif kind == "both":
        leaves[1]._derived_weight_cache_error = "reason two"
        leaves[-1]._hc_ffn_bf16_parts = (1, 2)
    elif kind == "property":
        next(m for m in leaves if isinstance(m, _WithProperty)).reason = "from a property"
    elif kind == "own_getattr":
        next(m for m in leaves if isinstance(m, _OwnGetattr))._parts_behind_getattr = [1]
    elif kind == "buffer":
        leaves[2].register_buffer(plant[1], plant[2])
    elif kind == "parameter":
        leaves[0].register_parameter(plant[1], plant[2])
    elif kind == "class":
        setattr(_ClassAttribute, plant[1], plant[2])
    try:
        expected = derived_check.__wrapped__(model)
        assert derived_check(model) is expected
        assert (expected is not None) == answered
    finally:
        if kind == "class":
            delattr(_ClassAttribute, plant[1])
    assert derived_check(None) is derived_check.__wrapped__(None)


def _pairs(walk, model):
    return [(id(m), q if isinstance(q, str) else id(q)) for m, q in walk(model)]


def test_quant_walk_answers_as_upstream_and_stays_lazy(quant_walk):
    from sglang.srt.lora.layers import BaseLayerWithLoRA

    model = _tree()
    leaves = [m for m in model.modules() if type(m) is _Leaf]
    leaves[0].quant_method = object()
    leaves[1].register_buffer("quant_method", torch.ones(1))  # found by nn.Module.__getattr__
    lora = BaseLayerWithLoRA.__new__(BaseLayerWithLoRA)
    torch.nn.Module.__init__(lora)
    lora.quant_method = object()  # LoRA wrappers are skipped
    model.lora = lora
    expected = _pairs(quant_walk.__wrapped__, model)
    assert _pairs(quant_walk, model) == expected
    assert len(expected) == 3  # instance, buffer, class attribute; not the raising property
    # A hook that gives the next module a quant method is seen by both walks.
    ours, theirs = quant_walk(model), quant_walk.__wrapped__(model)
    assert next(ours)[0] is next(theirs)[0]
    later = [m for m in model.modules() if type(m) is _Leaf][-1]
    later.quant_method = "set by a hook"
    assert [(id(m), id(q)) for m, q in ours] == [(id(m), id(q)) for m, q in theirs]


def test_attribute_or_none_is_getattr(derived_check):
    model = _tree()
    leaf = next(m for m in model.modules() if type(m) is _Leaf)
    for module in model.modules():
        for name in ("weight", "quant_method", "_derived_weight_cache_error", "training", "nothing", "a", "x"):
            try:
                expected = getattr(module, name, None)
            except AttributeError:
                expected = None
            assert module_walks.attribute_or_none(module, name) is expected, (type(module).__name__, name)
    assert module_walks.attribute_or_none(leaf, "weight") is leaf.weight
