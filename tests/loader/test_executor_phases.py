"""The executor on a really written file (CPU): a strided copy, a straight read and a gathered
row shard land in the parameters exactly, and the load reports where its time went."""

import torch

from sglang_fastload.loader.executor import execute_plan
from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan


def test_a_load_reports_its_phases_and_writes_every_element(tmp_path):
    data = torch.arange(2 * 4096, dtype=torch.float32)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.numpy().tobytes())
    nbytes = 4096 * 4
    # Step 1: the first 4096 floats into "t" transposed (staged, then copied by view).
    transposed = CopyStep("a", "t", (0, (64, 64), (1, 64)), ((0, nbytes),), (0, (64, 64), (64, 1)), 4)
    # Step 2: the next 4096 floats straight into "d" (read in place on CPU).
    straight = CopyStep("b", "d", (0, (4096,), (1,)), ((nbytes, nbytes),), (0, (4096,), (1,)), 4)
    # Step 3: the first 16 floats of each 64-float row of "a", gathered into "g" (a row shard).
    gathered = CopyStep("a", "g", (0, (64, 16), (16, 1)), ((0, nbytes),), (0, (64, 16), (64, 1)), 4, gather=True)
    plan = LoadPlan(
        files=[FilePlan(str(path), [transposed, straight, gathered])], zeros=[],
        param_meta={"t": ((4096,), torch.float32), "d": ((4096,), torch.float32), "g": ((1024,), torch.float32)},
        tensors_used=frozenset({"a", "b"}), tensor_count=2,
    )
    params = {"t": torch.full((4096,), -1.0), "d": torch.full((4096,), -1.0), "g": torch.full((1024,), -1.0)}
    stats = execute_plan(plan, params, device=torch.device("cpu"), num_threads=2, chunk_bytes=nbytes)

    assert torch.equal(params["t"].view(64, 64), data[:4096].view(64, 64).t())
    assert torch.equal(params["d"], data[4096:])
    assert torch.equal(params["g"].view(64, 16), data[:4096].view(64, 64)[:, :16])
    assert stats.bytes_read == 2 * nbytes + 1024 * 4  # a gather counts the bytes it keeps
    phases = stats.phases()
    assert set(phases) == {"setup", "threads", "tail", "drain", "read", "gather", "wait", "issue", "register", "lane_wait", "shared", "scratch"}
    assert all(v >= 0 for v in phases.values())
    # Both steps read; the staged one is copied (unrounded: a warm copy can take < 50 us).
    assert stats.read_seconds > 0 and stats.issue_seconds > 0
    assert phases["register"] == 0 and phases["lane_wait"] == 0  # no zero-copy lane off CUDA
    assert 0 < stats.gather_seconds <= stats.read_seconds
    assert phases["shared"] == 0 and stats.shared_bytes == 0  # one rank: nothing shared
    assert stats.setup_seconds + stats.threads_seconds + stats.drain_seconds <= stats.seconds + 1e-6

    # The gathers' file mapping is unmapped off the load's path, before the next load starts.
    from sglang_fastload.loader import host_memory

    host_memory.wait_for_releases()
    with open("/proc/self/maps") as maps:
        assert str(path) not in maps.read()
