"""The pure parts of the CUDA host paths: which page ranges still need registering, how
copies are cut where registrations end, and which chunks the zero-copy lane takes (the CUDA
calls themselves run in the GPU benchmarks)."""

import random

from sglang_fastload.loader.binding import Chunk, split_for_lane
from sglang_fastload.loader.host_memory import cut_at, uncovered
from sglang_fastload.loader.plan import CopyStep


def _merged(rng):
    ranges = []
    for _ in range(rng.randrange(0, 6)):
        s = rng.randrange(0, 90)
        ranges.append((s, s + rng.randrange(1, 15)))
    merged = []  # registrations are kept sorted and disjoint
    for s, e in sorted(ranges):
        if merged and s < merged[-1][1]:  # touching registrations stay apart, as in CUDA
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def _points(ranges):
    return {x for s, e in ranges for x in range(s, e)}


def test_uncovered_is_exactly_what_is_not_registered_yet():
    rng = random.Random(7)
    for _ in range(300):
        registered = _merged(rng)
        start = rng.randrange(0, 100)
        end = start + rng.randrange(0, 30)
        got = uncovered(registered, start, end)
        assert _points(got) == set(range(start, end)) - _points(registered)
        assert all(s < e for s, e in got) and all(a[1] <= b[0] for a, b in zip(got, got[1:]))


def test_copies_are_cut_so_none_spans_two_registrations():
    rng = random.Random(11)
    for _ in range(300):
        registered = _merged(rng)
        edges = sorted({x for r in registered for x in r})
        offset, nbytes = rng.randrange(0, 100), rng.randrange(0, 40)
        pieces = cut_at(edges, offset, nbytes)
        assert sum(n for _, n in pieces) == nbytes
        pos = offset
        for o, n in pieces:
            assert o == pos and n > 0
            pos += n
            inside = [r for r in registered if r[0] <= o < r[1]]
            if inside:  # a piece starting in a registration ends inside it
                assert o + n <= inside[0][1]
            else:  # a piece starting outside never reaches into one
                assert not any(o < r[0] < o + n for r in registered)


def _step(offset, nbytes, gather=False):
    return CopyStep("t", "p", (0, (nbytes,), (1,)), ((offset, nbytes),), (0, (nbytes,), (1,)), 1, gather=gather)


def test_lane_takes_its_share_spread_over_the_load_and_never_gathers():
    chunks = []
    for i in range(40):
        gather = i % 5 == 0
        chunks.append(Chunk("f", [_step(i * 100, 100, gather)], 100))
    lane, rest = split_for_lane(chunks, 0.5)
    assert not any(st.gather for c in lane for st in c.steps)
    assert sorted(map(id, lane + rest)) == sorted(map(id, chunks))
    assert 19 * 100 <= sum(c.nbytes for c in lane) <= 21 * 100
    # Spread: each quarter of the load gives the lane some of its chunks.
    positions = [chunks.index(c) for c in lane]
    assert all(any(q * 10 <= p < (q + 1) * 10 for p in positions) for q in range(4))
    assert split_for_lane(chunks, 0.0) == ([], chunks)


def test_mapped_file_registers_each_page_once_and_copies_inside_registrations(tmp_path, monkeypatch):
    """A real file, really mapped; only the CUDA registration call is replaced by a recorder
    (this machine has no CUDA), which refuses overlaps as CUDA does."""
    from sglang_fastload.loader import host_memory

    page = host_memory.PAGE
    data = bytes(random.Random(3).randrange(256) for _ in range(page * 9 + 123))
    path = tmp_path / "shard.safetensors"
    path.write_bytes(data)
    calls = []

    def recording_register(address, nbytes, flags):
        assert address % page == 0 and nbytes % page == 0 and flags == host_memory._REGISTER_READ_ONLY
        assert all(address + nbytes <= a or a + n <= address for a, n in calls), "page registered twice"
        calls.append((address, nbytes))
        return 0

    monkeypatch.setattr(host_memory, "_register", recording_register)
    monkeypatch.setattr(host_memory, "_unregister", lambda address: None)
    mapped = host_memory.open_mapped(str(path))
    rng = random.Random(5)
    for _ in range(60):
        off = rng.randrange(0, len(data))
        n = rng.randrange(1, len(data) - off + 1)
        mapped.ensure(off, n)
        got = b""
        for o, m in mapped.pieces(off, n):
            assert m > 0
            assert any(mapped.address + o >= a and mapped.address + o + m <= a + k for a, k in calls)
            got += mapped.view(o, m).numpy().tobytes()
        assert got == data[off:off + n]
    covered = sum(k for _, k in calls)
    assert covered == -(-len(data) // page) * page  # every page once, nothing beyond the file
    mapped.release()


def _lane_chunk(places, scratch_bytes):
    from sglang_fastload.loader.binding import BoundChunk
    import torch

    return BoundChunk(
        file=0, nbytes=sum(n for _, n, _ in places), direct=[], gathers=[], buffer=0, segments=[],
        places=list(places), staged_bytes=scratch_bytes, copies=[], copy_views=[], dsts=[], srcs=[],
        device=torch.zeros(scratch_bytes, dtype=torch.uint8), fault_bytes=0,
    )


def test_lane_registrar_hands_over_every_chunk_with_copies_inside_one_registration(tmp_path, monkeypatch):
    """The registrar thread on a really mapped file, CUDA's registration replaced by a recorder
    that refuses a page registered twice (as CUDA does): each chunk's copies read exactly its
    file bytes into exactly its scratch bytes, and none spans two registrations."""
    import queue
    import threading

    import torch

    from sglang_fastload.loader import executor, host_memory

    page = host_memory.PAGE
    data = bytes(random.Random(3).randrange(256) for _ in range(9 * page + 123))
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    registered = []

    def record(address, nbytes, flags):
        assert flags == host_memory._REGISTER_READ_ONLY and address % page == 0
        assert not any(address < e and s < address + nbytes for s, e in registered), "page registered twice"
        registered.append((address, address + nbytes))
        return 0

    monkeypatch.setattr(host_memory, "_register", record)
    monkeypatch.setattr(host_memory, "_unregister", lambda address: None)
    # Places that share pages with each other and with the next chunk, and the file's tail.
    chunks = [
        _lane_chunk([(10, page, 0), (2 * page + 5, 300, page + 64)], 2 * page),
        _lane_chunk([(page + 7, page + 100, 0)], 2 * page),
        _lane_chunk([(8 * page, page + 123, 64)], 2 * page),
    ]
    mapped, ready, stats = {}, queue.SimpleQueue(), executor.ExecutionStats()
    executor._register_lane(chunks, [str(path)], mapped, ready, threading.Event(), stats)
    items = [ready.get() for _ in range(len(chunks) + 1)]
    assert items[-1] is executor._LANE_END and [it.chunk for it in items[:-1]] == chunks
    for item in items[:-1]:
        for dst, src in item.copies:
            dst.copy_(src)
            start = src.data_ptr()
            assert any(s <= start and start + src.numel() <= e for s, e in registered), "copy spans registrations"
        for off, n, p in item.chunk.places:
            assert bytes(item.chunk.device[p:p + n].tolist()) == data[off:off + n]
        covered = sum(dst.numel() for dst, _ in item.copies)
        assert covered == sum(n for _, n, _ in item.chunk.places)
    mapped[str(path)].release()


def test_lane_registrar_refuses_a_chunk_past_the_end_of_its_file_and_still_ends_the_lane(tmp_path, monkeypatch):
    import queue
    import threading

    import pytest

    from sglang_fastload.errors import CheckpointError
    from sglang_fastload.loader import executor, host_memory

    path = tmp_path / "short.safetensors"
    path.write_bytes(b"x" * 1000)
    monkeypatch.setattr(host_memory, "_register", lambda address, nbytes, flags: 0)
    monkeypatch.setattr(host_memory, "_unregister", lambda address: None)
    ok, past_end = _lane_chunk([(0, 100, 0)], 256), _lane_chunk([(900, 200, 0)], 256)
    mapped, ready = {}, queue.SimpleQueue()
    with pytest.raises(CheckpointError) as err:
        executor._register_lane([ok, past_end], [str(path)], mapped, ready, threading.Event(), executor.ExecutionStats())
    assert "short.safetensors" in str(err.value) and "1100" in str(err.value)
    assert ready.get().chunk is ok and ready.get() is executor._LANE_END
    mapped[str(path)].release()
    # A failed load stops the registrar before its next chunk.
    stopped, ready = threading.Event(), queue.SimpleQueue()
    stopped.set()
    executor._register_lane([ok], [str(path)], {}, ready, stopped, executor.ExecutionStats())
    assert ready.get() is executor._LANE_END
