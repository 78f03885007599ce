"""The pure parts of the CUDA host paths: which page ranges still need registering, and which
chunks the zero-copy lane takes (the CUDA calls themselves run in the GPU benchmarks)."""

import random

from sglang_fastload.loader.executor import _Chunk, _split_for_lane
from sglang_fastload.loader.host_memory import uncovered
from sglang_fastload.loader.plan import CopyStep


def _covered_set(ranges):
    return {x for s, e in ranges for x in range(s, e)}


def test_uncovered_matches_a_set_model():
    rng = random.Random(7)
    for _ in range(300):
        ranges = []
        for _ in range(rng.randrange(0, 6)):
            s = rng.randrange(0, 90)
            ranges.append((s, s + rng.randrange(1, 15)))
        # Registered ranges are kept sorted and disjoint: merge the random ones first.
        merged = []
        for s, e in sorted(ranges):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        start = rng.randrange(0, 100)
        end = start + rng.randrange(0, 30)
        got = uncovered(merged, start, end)
        assert _covered_set(got) == set(range(start, end)) - _covered_set(merged)
        assert got == sorted(got) and all(s < e for s, e in got)
        assert all(a[1] <= b[0] for a, b in zip(got, got[1:]))


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
