"""The pre-load restore pass skips only the staged hook calls that would do nothing, and
otherwise runs upstream's pass as written: same hooks, same order, same staging. Compared with
upstream's own function, which the loader fork keeps as ``__wrapped__``."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from sglang_fastload import constants, idle_restores, module_walks


@pytest.fixture(scope="module")
def loader():
    from sglang.srt.model_loader import loader

    return loader


def _bare_return(layer):
    return


def _docstring_only(layer):
    """Nothing to undo."""


def _return_none(layer):
    return None


def _pass(layer):
    pass


def _returns_one(layer):
    return 1


def _appends(layer):
    layer.calls.append("restore")


def _generator(layer):
    return
    yield


async def _coroutine(layer):
    return


@pytest.mark.parametrize("function", [_bare_return, _docstring_only, _return_none, _pass, lambda layer: None])
def test_bodies_that_only_return_none_do_nothing(function):
    assert idle_restores.does_nothing(function)


@pytest.mark.parametrize("function", [
    _returns_one, _appends, _generator, _coroutine, print, functools.partial(_bare_return), object(),
])
def test_anything_else_may_do_something(function):
    assert not idle_restores.does_nothing(function)


def test_sglangs_own_hooks_are_told_apart():
    from sglang.srt.layers.quantization.base_config import QuantizeMethodBase
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

    assert idle_restores.does_nothing(QuantizeMethodBase.restore_weights_before_loading)
    assert idle_restores.does_nothing(UnquantizedLinearMethod().restore_weights_before_loading)  # bound
    # The MoE method restores a layout on one backend: its hook must run.
    assert not idle_restores.does_nothing(UnquantizedFusedMoEMethod.restore_weights_before_loading)
    assert not idle_restores.does_nothing(UnquantizedLinearMethod.process_weights_after_loading)


def test_the_fork_binds_it_and_upstreams_source_is_the_recorded_one(loader):
    ours = loader.DefaultModelLoader.restore_weights_before_loading
    upstream = ours.__wrapped__
    assert ours.__code__.co_filename == idle_restores.__file__
    assert upstream.__qualname__ in constants.UPSTREAM_WALK_SOURCES
    assert module_walks.unchanged_upstream(upstream), (
        f"{upstream.__qualname__} changed upstream: review idle_restores.py, then record "
        f"{module_walks.source_digest(upstream)}")


def test_a_changed_upstream_pass_is_kept_with_one_warning(caplog, loader):
    class DefaultModelLoader:  # same qualified name, other source
        @staticmethod
        def restore_weights_before_loading(model, target_device):
            return None

    changed = DefaultModelLoader.restore_weights_before_loading
    with caplog.at_level(logging.WARNING, logger=module_walks.__name__):
        assert idle_restores.skip_idle_restores(changed, loader) is changed
    assert [r.getMessage().count("upstream's is kept") for r in caplog.records] == [1]


class _Layer(torch.nn.Module):
    def __init__(self, quant_method, device="cpu"):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, device=device), requires_grad=False)
        self.quant_method = quant_method


def _recording_methods(journal):
    """Quant methods whose restore hooks record the layer they ran on (one of them is not a
    ``QuantizeMethodBase``, which upstream's pass skips)."""
    from sglang.srt.layers.quantization.base_config import QuantizeMethodBase

    class Repacking(QuantizeMethodBase):
        def create_weights(self, *args, **kwargs):
            pass

        def apply(self, *args, **kwargs):
            pass

        def restore_weights_before_loading(self, layer):
            journal.append(("restore", layer.tag))
            layer.weight.data.add_(1)

    class DuckTyped:
        def restore_weights_before_loading(self, layer):
            journal.append(("duck", layer.tag))

    return Repacking, DuckTyped


def _model(journal, device="cpu"):
    from sglang.srt.layers.quantization.unquant import UnquantizedEmbeddingMethod, UnquantizedLinearMethod

    repacking, duck_typed = _recording_methods(journal)
    methods = [UnquantizedLinearMethod(), repacking(), UnquantizedEmbeddingMethod(), duck_typed(),
               UnquantizedLinearMethod(), repacking()]
    model = torch.nn.Sequential(*[_Layer(m, device) for m in methods], torch.nn.LayerNorm(2))
    for i, layer in enumerate(model):
        layer.tag = i
    return model


def _run_counting_stagings(loader, monkeypatch, restore, model, target):
    """Run ``restore``; returns the tags of the modules it staged, in order."""
    staged = []
    context = loader.device_loading_context

    def counting(module, target_device):
        staged.append(getattr(module, "tag", None))
        return context(module, target_device)

    with monkeypatch.context() as patch:
        patch.setattr(loader, "device_loading_context", counting)
        restore(model, target)
    return staged


def test_only_hooks_that_act_are_staged_and_run_as_upstream_runs_them(loader, monkeypatch):
    ours = loader.DefaultModelLoader.restore_weights_before_loading
    runs = {}
    for name, restore in (("upstream", ours.__wrapped__), ("ours", ours)):
        journal = []
        model = _model(journal)
        staged = _run_counting_stagings(loader, monkeypatch, restore, model, torch.device("cpu"))
        runs[name] = (journal, staged, [layer.weight.tolist() for layer in model[:-1]])
    assert runs["ours"][0] == runs["upstream"][0] == [("restore", 1), ("restore", 5)]
    assert runs["ours"][2] == runs["upstream"][2]
    assert runs["upstream"][1] == [0, 1, 2, 4, 5]  # every QuantizeMethodBase layer
    assert runs["ours"][1] == [1, 5]


def test_a_reloading_model_is_left_alone(loader, monkeypatch):
    journal = []
    model = _model(journal)
    model.original_weights_rebuild_keys, model.recorded_loader, model.flash_rl_initial_load_complete = {}, {}, True
    ours = loader.DefaultModelLoader.restore_weights_before_loading
    assert _run_counting_stagings(loader, monkeypatch, ours, model, torch.device("cpu")) == []
    assert journal == []


def test_a_cuda_target_stages_idle_hooks_unless_every_tensor_is_already_there():
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    layer = _Layer(UnquantizedLinearMethod())
    # Tensors on the host and a CUDA target: upstream's staging would move them there and back.
    assert not idle_restores._idle(layer, layer.quant_method, torch.device("cuda", 0))
    assert idle_restores._idle(layer, layer.quant_method, torch.device("cpu"))
    layer.weight = torch.nn.Parameter(torch.zeros(2, device="meta"), requires_grad=False)
    assert not idle_restores._idle(layer, layer.quant_method, torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_resident_idle_layers_are_not_staged(loader, monkeypatch):
    ours = loader.DefaultModelLoader.restore_weights_before_loading
    target = torch.device("cuda", torch.cuda.current_device())
    journal = []
    model = _model(journal, device=target)
    model[2].weight = torch.nn.Parameter(torch.zeros(2), requires_grad=False)  # left on the host
    staged = _run_counting_stagings(loader, monkeypatch, ours, model, torch.device("cuda"))
    assert staged == [1, 2, 5] and journal == [("restore", 1), ("restore", 5)]
    assert model[2].weight.device.type == "cpu"  # upstream's staging puts it back
