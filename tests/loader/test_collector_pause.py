"""Python's cyclic garbage collector waits while a fast load plans and copies (a full
collection in a server process held the interpreter lock for 0.45-0.68 s on the H200 host,
inside a start-up's header parsing), runs again afterwards, and upstream's own path is not
affected."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from safetensors.torch import save_file

from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.model_loader import loader as upstream_loader
from sglang.srt.model_loader.loader import DefaultModelLoader
from sglang_fastload.loader.collector_pause import collector_paused
from sglang_fastload.loader.fast_model_loader import FastCheckpoint, FastModelLoader


class _Cycle:
    def __init__(self):
        self.me = self


@pytest.fixture
def collections():
    """Automatic and explicit collections that start while the test runs, by generation."""
    started = []

    def callback(phase, info):
        if phase == "start":
            started.append(info["generation"])

    thresholds = gc.get_threshold()
    was_enabled = gc.isenabled()
    gc.enable()
    gc.set_threshold(50, 2, 2)  # collections come every few dozen allocations
    gc.callbacks.append(callback)
    try:
        yield started
    finally:
        gc.callbacks.remove(callback)
        gc.set_threshold(*thresholds)
        (gc.enable if was_enabled else gc.disable)()


def test_no_collection_runs_during_the_pause_and_collections_resume_after(collections):
    with collector_paused():
        assert not gc.isenabled()
        collections.clear()  # a collection due before the pause may have run on entering it
        garbage = [_Cycle() for _ in range(5000)]
        del garbage
        assert collections == []  # 5000 cycles and no collection
    assert gc.isenabled()
    garbage = [_Cycle() for _ in range(5000)]
    del garbage
    assert collections, "the collector runs again once the pause ends"


def test_a_process_that_turned_the_collector_off_keeps_it_off(collections):
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_the_collector_resumes_when_the_last_of_several_concurrent_pauses_ends(collections):
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def second():
        first_in.wait()
        with collector_paused():
            second_in.set()
            first_out.wait()
            seen["after the first ended"] = gc.isenabled()

    thread = threading.Thread(target=second)
    thread.start()
    with collector_paused():
        first_in.set()
        second_in.wait()
    first_out.set()
    thread.join()
    assert seen["after the first ended"] is False  # still paused for the second load
    assert gc.isenabled()


def test_an_error_inside_the_pause_resumes_the_collector(collections):
    with pytest.raises(RuntimeError):
        with collector_paused():
            raise RuntimeError("a refused checkpoint")
    assert gc.isenabled()


class _ToyModel(torch.nn.Module):
    """A model the fast path has no plan for: upstream's path loads it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.collector_running_while_loading = None

    def load_weights(self, weights):
        # Iterating would need a running server's context; what matters is where it runs.
        self.collector_running_while_loading = gc.isenabled()


def test_the_fast_loader_plans_with_the_collector_paused_and_leaves_upstreams_path_alone(
    tmp_path, monkeypatch, collections
):
    monkeypatch.setattr(upstream_loader, "get_server_args", lambda: None)
    save_file({"w": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    seen = {}

    def try_prepare(self, model, target_device):
        seen["collector running while planning"] = gc.isenabled()
        return None, "no plan for this toy model"

    monkeypatch.setattr(FastCheckpoint, "try_prepare", try_prepare)
    loader = FastModelLoader(LoadConfig(load_format="fast"))
    model = _ToyModel()
    checkpoint = FastCheckpoint(loader, DefaultModelLoader.Source(str(tmp_path), None), {})
    loader.load_weights_and_postprocess(model, checkpoint, torch.device("cpu"))

    assert seen["collector running while planning"] is False
    assert model.collector_running_while_loading is True  # upstream's path: untouched
    assert gc.isenabled()
