"""An update's CUDA-graph recapture runs only once every rank's load succeeded.

Upstream recaptures inside ``update_weights_from_disk`` (collective calls on every rank); a
rank whose load failed is in the guard's vote then, and the two would wait for each other
for ever. The guard notes the recapture while upstream's update runs and makes it after a
successful vote. The updater here is a frozen dataclass like SGLang's ``WeightUpdater``; the
update body stands in for upstream's on a CUDA device (the CPU rig never recaptures).
"""

import dataclasses
from typing import Callable

import torch

from sglang_fastload import update_guard
from sglang_fastload.served_checkpoint import record_served


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Updater:
    device: str
    model_config: object
    get_model: Callable
    recapture_cuda_graph: Callable


def _updater(tmp_path, events):
    model = torch.nn.Module()
    record_served(model, str(tmp_path), "fast")
    return Updater(device="cpu", model_config=type("Config", (), {"model_path": str(tmp_path)})(),
                   get_model=lambda: model, recapture_cuda_graph=lambda: events.append("recaptured"))


def _upstream_update(self, model_path, load_format, weight_name_filter=None, recapture_cuda_graph=False):
    if recapture_cuda_graph:
        self.recapture_cuda_graph()  # as upstream does on CUDA when asked
    return True, "Succeeded to update model weights."


def test_recapture_waits_for_every_rank_and_runs_once_after(tmp_path, monkeypatch):
    events = []
    updater = _updater(tmp_path, events)
    real = updater.recapture_cuda_graph

    def body(self, *args, **kwargs):
        ok = _upstream_update(self, *args, **kwargs)
        events.append("update returned")
        return ok

    votes = []
    monkeypatch.setattr(update_guard, "all_ranks_ok", lambda ok: votes.append(ok) or ok)
    guarded = update_guard.guard_update_weights_from_disk(body)
    assert guarded(updater, str(tmp_path), "fast", None, True) == (True, "Succeeded to update model weights.")
    assert events == ["update returned", "recaptured"] and votes == [True]
    assert updater.recapture_cuda_graph is real


def test_no_recapture_when_another_rank_failed(tmp_path, monkeypatch):
    events = []
    updater = _updater(tmp_path, events)
    real = updater.recapture_cuda_graph
    votes = iter([False])  # another rank's load failed; then every rank agrees nothing was written here
    monkeypatch.setattr(update_guard, "all_ranks_ok", lambda ok: next(votes, ok))
    guarded = update_guard.guard_update_weights_from_disk(_upstream_update)
    ok, _ = guarded(updater, str(tmp_path), "fast", None, True)
    assert not ok
    assert events == [] and updater.recapture_cuda_graph is real
