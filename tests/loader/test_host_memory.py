"""The pure parts of the CUDA host paths: how copies are cut at registration blocks, and which
chunks the zero-copy lane takes (the CUDA calls themselves run in the GPU benchmarks)."""

import random

from sglang_fastload.loader.executor import _Chunk, _split_for_lane
from sglang_fastload.loader.host_memory import block_pieces
from sglang_fastload.loader.plan import CopyStep


def test_block_pieces_cover_the_range_and_never_cross_a_block():
    rng = random.Random(7)
    for _ in range(500):
        block = rng.choice([1, 4, 16, 4096])
        offset, nbytes = rng.randrange(0, 50_000), rng.randrange(0, 20_000)
        pieces = block_pieces(offset, nbytes, block)
        assert sum(n for _, n in pieces) == nbytes
        pos = offset
        for o, n in pieces:
            assert o == pos and n > 0
            assert o // block == (o + n - 1) // block  # inside one registration
            pos += n


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
