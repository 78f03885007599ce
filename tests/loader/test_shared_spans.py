"""How the ranks of a node lay out the spans they share (pure functions; the collectives and
the bit-exact loads through them are in test_bytes_per_node.py and test_fast_matches_upstream.py)."""

import ctypes
import dataclasses
import os
import random

import pytest
import torch

from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan, staging_aligned
from sglang_fastload.loader.shared_layout import SharedSpan, node_rounds, pieces_of_rank, split_plan
from sglang_fastload.loader.shared_spans import _Segment, copy_out

ROWS, COLS, ITEM = 64, 96, 2  # a row-parallel weight: each of N ranks keeps COLS / N columns


def shard_step(rank: int, ranks: int, tensor_offset: int, name: str = "w") -> CopyStep:
    """Rank ``rank``'s gather of its columns of a ROWS x COLS bf16 tensor at ``tensor_offset``."""
    cols = COLS // ranks
    start = tensor_offset + rank * cols * ITEM
    span = ((ROWS - 1) * COLS + cols) * ITEM
    return CopyStep(name, name, (0, (ROWS, cols), (cols, 1)), ((start, span),), (0, (ROWS, cols), (COLS, 1)), ITEM,
                    gather=True)


def test_the_ranks_columns_of_one_tensor_make_one_span_and_tensors_side_by_side_stay_apart():
    tensor = ROWS * COLS * ITEM
    every = [[("f", s.reads[0][0], s.reads[0][1]) for s in (shard_step(r, 4, 0), shard_step(r, 4, tensor))]
             for r in range(4)]
    rounds = node_rounds(every, slot_bytes=1 << 20)
    assert rounds == [[("f", 0, tensor, 0), ("f", tensor, tensor, staging_aligned(tensor))]]
    # The same layout whatever order the ranks' lists come in.
    assert node_rounds(list(reversed(every)), slot_bytes=1 << 20) == rounds


def test_rounds_fit_their_slot_and_spans_larger_than_a_slot_are_left_to_each_rank():
    rng = random.Random(7)
    spans, offset = [], 0
    for _ in range(200):
        n = rng.choice([1000, 4096, 30000, 70000])
        spans.append(("f", offset, n))
        offset += n + rng.choice([0, 64, 500])
    slot = 65536
    rounds = node_rounds([spans], slot_bytes=slot)
    placed = [(p, o, n) for r in rounds for p, o, n, _ in r]
    assert placed == [s for s in spans if s[2] <= slot]
    for r in rounds:
        ends = [at + n for _, _, n, at in r]
        assert ends[-1] <= slot
        assert all(at % 64 == 0 for _, _, _, at in r)
        assert all(a <= b for a, b in zip(ends, [at for _, _, _, at in r][1:]))  # no overlap


def test_every_byte_of_a_round_is_read_by_exactly_one_rank():
    rounds = node_rounds([[("a", 0, 5000), ("a", 9000, 70000), ("b", 0, 123457)]], slot_bytes=1 << 20)
    spans = [SharedSpan(p, o, n, at, ()) for p, o, n, at in rounds[0]]
    for ranks in (1, 2, 3, 8):
        seen = {}
        for rank in range(ranks):
            for path, offset, slot_offset, n in pieces_of_rank(spans, rank, ranks):
                for i in range(n):
                    key = (path, offset + i)
                    assert key not in seen, key
                    seen[key] = slot_offset + i
        expected = {(s.path, s.offset + i): s.slot_offset + i for s in spans for i in range(s.nbytes)}
        assert seen == expected


def test_each_rank_copies_its_own_columns_out_of_the_shared_span():
    ranks, tensor = 4, ROWS * COLS * ITEM
    every = [[("f", s.reads[0][0], s.reads[0][1]) for s in [shard_step(r, ranks, 0)]] for r in range(ranks)]
    rounds = node_rounds(every, slot_bytes=1 << 20)
    source = torch.arange(ROWS * COLS, dtype=torch.int16).view(torch.bfloat16)
    for rank in range(ranks):
        step = shard_step(rank, ranks, 0)
        other = CopyStep("n", "n", (0, (8,), (1,)), ((tensor, 16),), (0, (8,), (1,)), ITEM)
        plan = LoadPlan(files=[FilePlan("f", [step, other])], zeros=[], param_meta={}, tensors_used=frozenset(),
                        tensor_count=2)
        params = {"w": torch.empty(ROWS, COLS // ranks, dtype=torch.bfloat16), "n": torch.empty(8, dtype=torch.bfloat16)}
        split = split_plan(plan, params, rounds)
        assert split.regular_steps == ([other],)
        (span,), = split.rounds
        ((got, delta),) = span.steps
        assert got is step
        # Where the step's own span starts within the node's span: its first column.
        assert delta == step.reads[0][0] - span.offset == rank * (COLS // ranks) * ITEM
        # Its view, applied at that distance into the staged span, is exactly its columns.
        staged = source.view(-1)
        off, sizes, strides = step.view
        cols = staged[delta // ITEM + off:].as_strided(sizes, strides)
        assert torch.equal(cols, source.view(ROWS, COLS)[:, rank * sizes[1]:(rank + 1) * sizes[1]])


class HostMemmove2D:
    """Stands in for the CUDA runtime's 2D copy with a host memmove of the same addresses and
    pitches (parameters on the CPU here), so the addresses the loader computes are checked."""

    def __init__(self):
        self.calls = 0

    def copy_2d_to_device(self, dst, dpitch, src, spitch, width, height, stream):
        self.calls += 1
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)


class StagedSpan:
    """The node's shared memory holding one round (what ``_copy_out`` reads)."""

    def __init__(self, nbytes: int):
        self.tensor = torch.zeros(nbytes, dtype=torch.uint8)
        self.address = self.tensor.data_ptr()


def test_the_2d_copies_take_exactly_each_ranks_columns_into_its_parameter():
    ranks, tensor = 4, ROWS * COLS * ITEM
    every = [[("f", s.reads[0][0], s.reads[0][1]) for s in [shard_step(r, ranks, 0), shard_step(r, ranks, tensor, "v")]]
             for r in range(ranks)]
    rounds = node_rounds(every, slot_bytes=1 << 20)
    staged = StagedSpan(1 << 20)
    source = torch.randint(-30000, 30000, (2, ROWS, COLS), dtype=torch.int16).view(torch.bfloat16)
    for path, offset, nbytes, slot_offset in rounds[0]:
        staged.tensor[slot_offset:slot_offset + nbytes] = source.view(torch.uint8).view(-1)[offset:offset + nbytes]
    for rank in range(ranks):
        cols = COLS // ranks
        plan = LoadPlan(files=[FilePlan("f", [shard_step(rank, ranks, 0), shard_step(rank, ranks, tensor, "v")])],
                        zeros=[], param_meta={}, tensors_used=frozenset(), tensor_count=2)
        # Parameters wider than the shard (another column block beside it): the pitch matters.
        wide = {n: torch.full((ROWS, 2 * cols), -1.0, dtype=torch.bfloat16) for n in ("w", "v")}
        params = {n: t[:, :cols] for n, t in wide.items()}
        plan.files[0].steps[:] = [dataclasses.replace(s, dst=(0, (ROWS, cols), (2 * cols, 1))) for s in plan.files[0].steps]
        split = split_plan(plan, params, rounds)
        runtime = HostMemmove2D()
        copied = sum(copy_out(staged, 0, span, params, runtime, 0) for span in split.rounds[0])
        assert runtime.calls == 2 and copied == 2 * ROWS * cols * ITEM
        for i, name in enumerate(("w", "v")):
            want = source[i][:, rank * cols:(rank + 1) * cols]
            assert torch.equal(wide[name][:, :cols].view(torch.int16), want.view(torch.int16)), (rank, name)
            assert bool((wide[name][:, cols:] == -1).all())  # nothing beside the shard written
        # The CPU path (a strided copy) lands the same bytes, and only them.
        again = {n: torch.zeros(ROWS, 2 * cols, dtype=torch.bfloat16) for n in ("w", "v")}
        cpu_params = {n: t[:, :cols] for n, t in again.items()}
        for span in split_plan(plan, cpu_params, rounds).rounds[0]:
            copy_out(staged, 0, span, cpu_params, None, 0)
        for i, name in enumerate(("w", "v")):
            assert torch.equal(again[name][:, :cols].view(torch.int16), source[i][:, rank * cols:(rank + 1) * cols].view(torch.int16))
            assert bool((again[name][:, cols:] == 0).all())


def test_node_shared_memory_is_one_mapping_seen_by_every_rank(tmp_path):
    path = str(tmp_path / "segment")
    made = _Segment("t", path, 1 << 20, create=True, cuda=False)
    seen = _Segment("t", path, 1 << 20, create=False, cuda=False)  # another rank's mapping
    made.tensor[100:104] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert seen.tensor[100:104].tolist() == [1, 2, 3, 4]
    made.close()
    seen.close()


def test_node_shared_memory_larger_than_dev_shm_is_refused_when_made():
    """A container's small /dev/shm: refused when made (the ranks then gather by themselves),
    not with SIGBUS at the first write, and no file left behind. A sparse file of that size
    would be made and mapped without complaint."""
    if not os.path.isdir("/dev/shm") or os.statvfs("/dev/shm").f_blocks == 0:
        pytest.skip("no size-limited /dev/shm here (reserving more than it holds would fill memory)")
    st = os.statvfs("/dev/shm")
    too_big = os.path.join("/dev/shm", f"sglang-fastload-test-{os.getpid()}-too-big")
    with pytest.raises(OSError):
        _Segment("t", too_big, st.f_blocks * st.f_frsize + (1 << 30), create=True, cuda=False)
    assert not os.path.exists(too_big)
