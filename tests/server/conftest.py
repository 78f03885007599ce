"""Real CPU servers shared by the server tests of one module."""

import pytest

from tests.rig.checkpoints import write_qwen3
from tests.rig.server import SGLangServer

PROMPTS = [[1, 2, 3, 4, 5], [17, 42, 99], [7] * 9, [250, 3, 88, 12]]


def outputs(server):
    """Greedy outputs of every prompt: the fingerprint of the weights being served."""
    return [server.generate(p, max_new_tokens=8) for p in PROMPTS]


@pytest.fixture(scope="session")
def dense_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    a = write_qwen3(root / "a", tied=False, seed=101, layout="sharded", num_shards=3)
    b = write_qwen3(root / "b", tied=False, seed=202, layout="sharded", num_shards=3)
    return a, b


@pytest.fixture(scope="session")
def upstream_outputs(dense_pair):
    """Outputs of pure-upstream servers (overlay off) started on A and on B."""
    result = {}
    for label, path in zip("AB", dense_pair):
        with SGLangServer(path, load_format="auto", env={"SGLANG_FASTLOAD": "0"}) as server:
            assert "sglang-fastload" not in server.log_text()
            result[label] = outputs(server)
    assert result["A"] != result["B"], "A and B must be distinguishable by their outputs"
    return result


def wait_idle(server, timeout=30.0):
    """Wait until the server has no running or queued request (its cache flush succeeds)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        status, body = server.post("/flush_cache")
        if status == 200:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"server never became idle: {status} {body}")
        time.sleep(0.05)


def update(server, path, **fields):
    """POST /update_weights_from_disk once the previous requests have left the scheduler."""
    wait_idle(server)
    return server.update_weights_from_disk(path, **fields)
