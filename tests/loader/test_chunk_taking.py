"""How chunks are dealt to readers, and readers that run out of dealt chunks taking the others'
unstarted ones (CPU, a really written file): a slow reader no longer holds the load up, and
every element still lands exactly, however the chunks were dealt."""

import threading
import time

import pytest
import torch

from sglang_fastload import constants
from sglang_fastload.loader.binding import Chunk, deal
from sglang_fastload.loader.executor import execute_plan
from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan

ROWS = 64  # a 64 x 64 float32 tensor: 16 KiB, one chunk each
TENSORS = 40


def _plan_and_data(tmp_path):
    data = torch.arange(TENSORS * ROWS * ROWS, dtype=torch.float32)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.numpy().tobytes())
    nbytes = ROWS * ROWS * 4
    steps, meta = [], {}
    for i in range(TENSORS):
        if i % 2:  # transposed: staged in the reader's buffer, then copied by view
            view, dst = (0, (ROWS, ROWS), (1, ROWS)), (0, (ROWS, ROWS), (ROWS, 1))
        else:  # straight: read into the parameter's memory
            view, dst = (0, (ROWS * ROWS,), (1,)), (0, (ROWS * ROWS,), (1,))
        steps.append(CopyStep(f"t{i}", f"p{i}", view, ((i * nbytes, nbytes),), dst, 4))
        meta[f"p{i}"] = ((ROWS * ROWS,), torch.float32)
    plan = LoadPlan(files=[FilePlan(str(path), steps)], zeros=[], param_meta=meta,
                    tensors_used=frozenset(f"t{i}" for i in range(TENSORS)), tensor_count=TENSORS)
    return plan, data, nbytes


def _expected(data, i):
    block = data[i * ROWS * ROWS:(i + 1) * ROWS * ROWS]
    return block.view(ROWS, ROWS).t().reshape(-1) if i % 2 else block


def _load_with_one_slow_reader(plan, nbytes):
    params = {name: torch.full(shape, -1.0) for name, (shape, _) in plan.param_meta.items()}
    slow = {}
    lock = threading.Lock()

    def on_bytes(_):
        with lock:
            slow.setdefault("thread", threading.get_ident())
        if slow["thread"] == threading.get_ident():
            time.sleep(0.03)  # this reader stalls after each chunk (a reader of a slower page range)

    stats = execute_plan(plan, params, device=torch.device("cpu"), num_threads=2, chunk_bytes=nbytes,
                         on_bytes=on_bytes, cache={})
    return params, stats


def test_an_idle_reader_takes_the_slow_readers_chunks_and_every_element_lands(tmp_path):
    plan, data, nbytes = _plan_and_data(tmp_path)
    params, stats = _load_with_one_slow_reader(plan, nbytes)
    for i in range(TENSORS):
        assert torch.equal(params[f"p{i}"], _expected(data, i)), f"p{i}"
    # 20 chunks were dealt to each reader; the stalled one runs only a few of its own.
    assert stats.taken_chunks >= 10
    assert stats.bytes_read == TENSORS * nbytes
    assert stats.tail_seconds >= 0


def test_readers_keep_to_their_dealt_chunks_when_taking_is_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv(constants.ENV_STEAL_CHUNKS, "0")
    plan, data, nbytes = _plan_and_data(tmp_path)
    params, stats = _load_with_one_slow_reader(plan, nbytes)
    for i in range(TENSORS):
        assert torch.equal(params[f"p{i}"], _expected(data, i)), f"p{i}"
    assert stats.taken_chunks == 0
    # The fast reader ended long before the stalled one (20 chunks x 30 ms).
    assert stats.tail_seconds > 0.3


def _chunks(sizes):
    return [Chunk(f"f{i // 10}", [], n) for i, n in enumerate(sizes)]


def test_runs_give_each_reader_one_contiguous_run_of_about_equal_bytes():
    chunks = _chunks([6 << 20] * 37 + [2 << 20])
    dealt = deal(chunks, 4)
    flat = [c for run in dealt for c in run]
    assert len(flat) == len(chunks) and all(a is b for a, b in zip(flat, chunks))  # in order, each once
    shares = [sum(c.nbytes for c in run) for run in dealt]
    assert max(shares) - min(shares) <= 6 << 20, shares


def test_round_robin_deals_every_readers_th_chunk():
    chunks = _chunks([1 << 20] * 10)
    dealt = deal(chunks, 3, constants.DEAL_ROUND_ROBIN)
    position = {id(c): i for i, c in enumerate(chunks)}
    assert [[position[id(c)] for c in run] for run in dealt] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_a_chunk_larger_than_a_share_leaves_a_reader_without_dealt_chunks():
    chunks = _chunks([100, 1, 1])
    dealt = deal(chunks, 3)
    assert [len(run) for run in dealt] == [0, 1, 2]


@pytest.mark.parametrize("dealing", [constants.DEAL_RUNS, constants.DEAL_ROUND_ROBIN])
@pytest.mark.parametrize("threads", [1, 3])
def test_any_reader_count_loads_every_element(tmp_path, monkeypatch, threads, dealing):
    monkeypatch.setenv(constants.ENV_DEAL_CHUNKS, dealing)
    plan, data, nbytes = _plan_and_data(tmp_path)
    params = {name: torch.full(shape, -1.0) for name, (shape, _) in plan.param_meta.items()}
    stats = execute_plan(plan, params, device=torch.device("cpu"), num_threads=threads, chunk_bytes=nbytes, cache={})
    for i in range(TENSORS):
        assert torch.equal(params[f"p{i}"], _expected(data, i)), f"p{i}"
    assert stats.bytes_read == TENSORS * nbytes
