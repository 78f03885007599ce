"""The pure parts of the CUDA host paths: which page ranges still need registering, how
copies are cut where registrations end, and which chunks the zero-copy lane takes (the CUDA
calls themselves run in the GPU benchmarks)."""

import random

from sglang_fastload.loader.executor import _Chunk, _split_for_lane
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
        chunks.append(_Chunk("f", [_step(i * 100, 100, gather)], 100))
    lane, rest = _split_for_lane(chunks, 0.5)
    assert not any(st.gather for c in lane for st in c.steps)
    assert sorted(map(id, lane + rest)) == sorted(map(id, chunks))
    assert 19 * 100 <= sum(c.nbytes for c in lane) <= 21 * 100
    # Spread: each quarter of the load gives the lane some of its chunks.
    positions = [chunks.index(c) for c in lane]
    assert all(any(q * 10 <= p < (q + 1) * 10 for p in positions) for q in range(4))
    assert _split_for_lane(chunks, 0.0) == ([], chunks)


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
