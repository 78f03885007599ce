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
