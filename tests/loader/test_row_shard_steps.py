"""How a rank's slice of a row-parallel weight is read: one gather per slice, not one read per row.

Row-parallel shards of real models have runs of hundreds of bytes (MoE ``down_proj``) to
tens of KiB (a dense ``down_proj`` at TP=2). Read run by run, every run costs one system
call plus interpreter work the reader threads do one at a time: Qwen3-8B at TP=2 took
2.55 s per update that way on an H200 host, 0.42-0.47 s gathered.
"""

import pytest
import torch

from sglang_fastload.loader.plan import DEFAULT_MIN_SEGMENT_BYTES, make_step

BF16 = 2
DATA_START = 4096  # where the tensor's bytes begin in its file


def rank_columns(rows: int, cols: int, tp: int, rank: int):
    """The checkpoint elements TP rank ``rank`` keeps of a ``rows x cols`` row-parallel weight."""
    width = cols // tp
    return (rank * width, (rows, width), (cols, 1))


def dense_destination(rows: int, width: int):
    return (0, (rows, width), (width, 1))


# (rows, cols, tp): Qwen3-8B down_proj at TP=2 (12 KiB runs) and TP=4, its o_proj at TP=2
# (4 KiB runs), Qwen3-30B-A3B's expert down_proj at TP=2 (768-byte runs).
SHARDS = [(4096, 12288, 2), (4096, 12288, 4), (4096, 4096, 2), (2048, 768, 2)]


@pytest.mark.parametrize("rows,cols,tp", SHARDS, ids=[f"{r}x{c}-tp{t}" for r, c, t in SHARDS])
def test_row_parallel_shards_are_one_gather_of_their_span(rows, cols, tp):
    rank = tp - 1
    src = rank_columns(rows, cols, tp, rank)
    step = make_step("w", "p", src, dense_destination(rows, cols // tp), DATA_START, BF16, DEFAULT_MIN_SEGMENT_BYTES, torch.bfloat16)
    assert step.gather
    assert len(step.reads) == 1
    offset, nbytes = step.reads[0]
    # The span from the rank's first element to its last, nothing before or after it.
    assert offset == DATA_START + rank * (cols // tp) * BF16
    assert nbytes == ((rows - 1) * cols + cols // tp) * BF16
    assert step.nbytes == rows * (cols // tp) * BF16  # what the rank keeps


def test_runs_of_a_mebibyte_or_more_are_read_run_by_run():
    cols = 2 * DEFAULT_MIN_SEGMENT_BYTES // BF16  # a 1 MiB run per rank at TP=2
    src = rank_columns(8, cols, 2, 1)
    step = make_step("w", "p", src, dense_destination(8, cols // 2), DATA_START, BF16, DEFAULT_MIN_SEGMENT_BYTES, torch.bfloat16)
    assert not step.gather
    assert [n for _, n in step.reads] == [DEFAULT_MIN_SEGMENT_BYTES] * 8
    assert step.reads[0][0] == DATA_START + DEFAULT_MIN_SEGMENT_BYTES


def test_the_limit_is_a_setting():
    src = rank_columns(4096, 12288, 2, 0)
    step = make_step("w", "p", src, dense_destination(4096, 6144), DATA_START, BF16, 0, torch.bfloat16)
    assert not step.gather and len(step.reads) == 4096
