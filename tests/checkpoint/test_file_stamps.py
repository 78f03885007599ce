"""A shard that changes while it is read fails the load, and the error names that shard."""

import pytest

from sglang_fastload.checkpoint.file_stamps import check_unchanged, stamp_files
from sglang_fastload.errors import CheckpointError


@pytest.fixture
def shards(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"model-0000{i + 1}-of-00003.safetensors"
        p.write_bytes(b"\0" * 128)
        paths.append(str(p))
    return paths


def test_unchanged_files_pass(shards):
    check_unchanged(stamp_files(shards))


def test_growing_shard_is_named(shards):
    stamps = stamp_files(shards)
    with open(shards[1], "ab") as f:
        f.write(b"\0" * 64)  # a writer still appending
    with pytest.raises(CheckpointError) as info:
        check_unchanged(stamps)
    assert info.value.path == shards[1]
    assert "changed while it was being loaded (size 128 -> 192 bytes)" in str(info.value)


def test_rewritten_shard_of_same_size_is_named(shards):
    import os

    stamps = stamp_files(shards)
    st = os.stat(shards[2])
    os.utime(shards[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(CheckpointError) as info:
        check_unchanged(stamps)
    assert info.value.path == shards[2] and "size" not in info.value.reason


def test_vanished_shard_is_named(shards):
    import os

    stamps = stamp_files(shards)
    os.remove(shards[0])
    with pytest.raises(CheckpointError, match="vanished") as info:
        check_unchanged(stamps)
    assert info.value.path == shards[0]
