"""Post-load hooks skip upstream's staging only where it would move nothing, and leave every
tensor where upstream's staging would (real SGLang's context as the reference on CUDA)."""

import contextlib

import pytest
import torch

from sglang_fastload import post_load_staging as pls


class _Layer(torch.nn.Module):
    def __init__(self, device="cpu"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(12.0, device=device).view(3, 4), requires_grad=False)
        self.register_buffer("scale", torch.ones(3, device=device))
        self.inner = torch.nn.Linear(4, 2, bias=False, device=device)
        self.inner.alias = self.weight  # an alias slot, as some layers keep


def test_every_registered_slot_is_walked_aliases_included():
    layer = _Layer()
    assert len(list(pls.registered_tensors(layer))) == 4  # weight, scale, inner.weight, alias
    assert pls.resident_on(layer, torch.device("cpu"))
    layer.inner.register_buffer("parked", torch.empty(2, device="meta"))
    assert not pls.resident_on(layer, torch.device("cpu"))


def test_a_hook_that_leaves_a_meta_tensor_fails_as_upstream_does():
    layer = _Layer()
    layer.weight = torch.nn.Parameter(torch.empty(3, 4, device="meta"), requires_grad=False)
    with pytest.raises(RuntimeError, match=pls.META_TENSOR_ERROR):
        pls.settle_on(layer, torch.device("cpu"))


def test_off_cuda_every_module_goes_through_upstreams_context():
    calls = []

    @contextlib.contextmanager
    def upstream(module, device):
        calls.append((module, device))
        yield module

    wrapped = pls.skip_staging_when_resident(upstream)
    layer = _Layer()
    with wrapped(layer, torch.device("cpu")) as m:
        assert m is layer
    assert calls == [(layer, torch.device("cpu"))]


def test_the_overlay_routes_post_load_hooks_through_the_shortcut():
    from sglang.srt.model_loader import loader

    assert getattr(loader.device_loading_context, "__wrapped__", None) is not None
    assert loader.device_loading_context.__wrapped__.__module__ == loader.__name__


def _upstream_staging():
    """Upstream's ``device_loading_context`` for a CUDA target: its staging context, loaded from
    its own file (importing sglang's loader package needs GPU-only kernels on a GPU host)."""
    import importlib.util
    import os

    root = importlib.util.find_spec("sglang").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(
        "upstream_post_load", os.path.join(root, "srt", "model_loader", "post_load.py"))
    post_load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(post_load)

    @contextlib.contextmanager
    def device_loading_context(module, target_device):
        with post_load.stage_module_for_post_load(module, target_device, pin_memory=True):
            yield module

    return device_loading_context


def _placement(layer):
    """``{name: (device, values on the host)}`` of every state tensor of ``layer``."""
    return {n: (t.device, t.detach().cpu()) for n, t in layer.state_dict(keep_vars=True).items()}


def _assert_same_placement(reference, ours):
    """Both on the first CUDA device with the same values, tensor by tensor."""
    assert reference.keys() == ours.keys()
    for name in reference:
        assert reference[name][0] == ours[name][0] == torch.device("cuda", 0), name
        assert torch.equal(reference[name][1], ours[name][1]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU host)")
@pytest.mark.parametrize("target", ["cuda", "cuda:0"])
def test_on_cuda_tensors_end_where_upstreams_staging_puts_them(target):
    upstream = _upstream_staging()
    results = []
    for context in (upstream, pls.skip_staging_when_resident(upstream)):
        torch.manual_seed(0)  # the same initial weights for both
        layer = _Layer(device="cuda")
        with context(layer, torch.device(target)):
            # A hook that repacks one weight and leaves its replacement on the host.
            layer.weight = torch.nn.Parameter(layer.weight.data.t().contiguous().cpu(), requires_grad=False)
            layer.scale.mul_(2)
        results.append(_placement(layer))
    _assert_same_placement(*results)


class _Leaf(torch.nn.Module):
    """A layer without submodules, as most hooked layers are (one weight, one bias slot)."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(6.0, device=device).view(2, 3), requires_grad=False)
        self.register_parameter("bias", None)
        self.register_buffer("scale", torch.ones(2, device=device))


class _LeafWithOwnWalk(_Leaf):
    """A leaf whose walk names another module: the generic walk must be used."""

    def __init__(self):
        super().__init__()
        object.__setattr__(self, "extra", _Leaf())

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield prefix, self
        yield prefix + "extra", self.extra


def _walked(module):
    return [t for owner in module.modules() for registry in (owner._parameters, owner._buffers)
            for t in registry.values() if t is not None]


@pytest.mark.parametrize("make", [_Leaf, _Layer, _LeafWithOwnWalk], ids=["leaf", "layer", "leaf-own-walk"])
def test_registered_tensors_are_the_walks_tensors_leaf_or_not(make):
    module = make()
    assert [id(t) for t in pls.registered_tensors(module)] == [id(t) for t in _walked(module)]
    assert len(_walked(module)) == {"_Leaf": 2, "_Layer": 4, "_LeafWithOwnWalk": 4}[type(module).__name__]


def test_device_test_matches_tensor_device_equality():
    cpu, meta = torch.ones(1), torch.ones(1, device="meta")
    for tensor in (cpu, meta):
        for device in (torch.device("cpu"), torch.device("meta"), torch.device("cuda", 0), torch.device("cuda", 1)):
            assert pls._on(tensor, device) == (tensor.device == device), (tensor.device, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU host)")
@pytest.mark.parametrize("hook", ["none", "to-host", "raises"])
def test_on_cuda_a_leaf_ends_where_upstreams_staging_puts_it(hook):
    upstream = _upstream_staging()
    results = []
    for context in (upstream, pls.skip_staging_when_resident(upstream)):
        layer = _Leaf(device="cuda")
        try:
            with context(layer, torch.device("cuda")) as entered:
                assert entered is layer
                if hook == "to-host":
                    layer.weight = torch.nn.Parameter(layer.weight.data.cpu() * 3, requires_grad=False)
                if hook == "raises":
                    layer.scale = layer.scale.cpu()
                    raise ValueError("hook failed")
        except ValueError:
            assert hook == "raises"
        results.append(_placement(layer))
    _assert_same_placement(*results)
