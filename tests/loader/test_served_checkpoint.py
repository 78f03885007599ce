"""Whether a model's previous checkpoint still holds its weights, and what a refusal says."""

import os

from sglang_fastload.served_checkpoint import ServedCheckpoint, weight_file_identities


def _checkpoint(path):
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"x" * 16)
    return str(path)


def test_recorded_files_tell_a_rewrite(tmp_path):
    a = _checkpoint(tmp_path / "a")
    served = ServedCheckpoint(a, "fast", weight_file_identities(a))
    assert served.is_intact(a)
    os.remove(os.path.join(a, "model.safetensors"))
    (tmp_path / "a" / "model.safetensors").write_bytes(b"y" * 17)
    assert not served.is_intact(a)
    assert served.describe_loss() == f"{a} has been rewritten since it was loaded"


def test_without_recorded_files_the_update_target_cannot_be_trusted(tmp_path):
    a, b = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    served = ServedCheckpoint(a, "fastsafetensors", None)  # loaded through another loader
    assert served.is_intact(b)  # another directory: the update did not read this one
    assert not served.is_intact(a)
    # Not "rewritten": nothing says it was; only that nothing says it was not.
    assert "is the directory the failed update read" in served.describe_loss()
    assert "rewritten" not in served.describe_loss()


def test_a_missing_checkpoint_is_gone(tmp_path):
    served = ServedCheckpoint(str(tmp_path / "gone"), "fast", {})
    assert not served.is_intact(str(tmp_path / "b"))
    assert served.describe_loss().endswith("no longer exists")


def test_an_update_from_tensors_leaves_no_checkpoint_to_roll_back_to(tmp_path, monkeypatch):
    # Start-up from A, then weights pushed from a trainer's tensors: A is still on disk as it
    # was, but no longer what the model serves, so a failed disk update must not "roll back"
    # to it (the host snapshot still can). SGLang's own WeightUpdater methods are wrapped.
    import types

    import torch
    from sglang.srt.model_executor.model_runner_components import weight_updater

    from sglang_fastload import constants, update_guard
    from sglang_fastload.served_checkpoint import forget_on_update, record_served, served_by

    from sglang.srt import runtime_context

    monkeypatch.setattr(runtime_context, "get_model", lambda: types.SimpleNamespace(load_format="dummy"))
    a = _checkpoint(tmp_path / "a")
    model = torch.nn.Module()
    record_served(model, a, "fast")
    updater = types.SimpleNamespace(get_model=lambda: model, model_config=types.SimpleNamespace(model_path=a))
    assert update_guard._served_before(updater, model).is_intact(str(tmp_path / "b"))
    calls = []
    push = forget_on_update("update_weights_from_tensor", lambda self, *args: calls.append(args) or (True, "ok"))
    assert push(updater, "named tensors") == (True, "ok") and calls == [("named tensors",)]
    assert served_by(model).replaced_by == "update_weights_from_tensor"
    previous = update_guard._served_before(updater, model)
    assert (previous.path, previous.replaced_by) == (a, "update_weights_from_tensor")
    assert not previous.is_intact(str(tmp_path / "b"))
    assert previous.describe_loss() == f"the served weights came from update_weights_from_tensor after {a} was loaded"
    # A server started with no record (--load-format dummy): the path and format still come
    # from the server, never empty.
    fresh = torch.nn.Module()
    push(types.SimpleNamespace(get_model=lambda: fresh), "named tensors")
    previous = update_guard._served_before(updater, fresh)
    assert (previous.path, previous.load_format, previous.is_intact(a)) == (a, "dummy", False)
    wrapped = [n for n in constants.TENSOR_UPDATE_METHODS if hasattr(weight_updater.WeightUpdater, n)]
    assert "update_weights_from_tensor" in wrapped
    assert all(getattr(weight_updater.WeightUpdater, n).__wrapped__ for n in wrapped)
