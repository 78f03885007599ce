"""Which replayed writes a plan runs: every element fed exactly, each as upstream leaves it."""

import pytest
import torch

from sglang_fastload.errors import CheckpointMismatchError, UnsupportedModelError
from sglang_fastload.loader.replay import RecordedCopy, RecordedZero, ReplayResult
from sglang_fastload.loader.settled_writes import settle_writes


def rows(first, count, width=4):
    """The geometry of ``count`` whole rows of a ``[*, width]`` parameter from row ``first``."""
    return (first * width, (count, width), (width, 1))


def copy(tensor, param, dst):
    return RecordedCopy(tensor, param, (0, dst[1], dst[2]), dst)


def settle(copies, zeros=(), zeros_after=None, params=None):
    params = params or {"w": torch.empty(4, 4)}
    result = ReplayResult(list(copies), list(zeros), {c.tensor for c in copies}, list(zeros_after or []))
    return settle_writes(result, params, "/ckpt")


def test_disjoint_writes_that_cover_every_element_are_all_kept():
    copies = [copy("a", "w", rows(0, 2)), copy("b", "w", rows(2, 2))]
    assert settle(copies).copies == copies


def test_a_write_replaced_whole_by_a_later_one_is_dropped():
    # A tied lm_head stored beside the embedding it shares memory with: upstream keeps the
    # tensor it writes last (names sorted), so only that one is read.
    table = torch.empty(4, 4)
    params = {"embed": table, "lm_head": table}
    embed, head = copy("model.embed_tokens.weight", "embed", rows(0, 4)), copy("lm_head.weight", "embed", rows(0, 4))
    assert settle([head, embed], params=params).copies == [embed]
    assert settle([embed, head], params=params).copies == [head]


def test_two_writes_to_one_slice_cannot_hide_a_missing_one():
    # Counted, these feed 16 of 16 elements; the last two rows are never written.
    copies = [copy("q", "w", rows(0, 2)), copy("q_again", "w", (0, (2, 4), (4, 1)))]
    assert [c.tensor for c in settle(copies + [copy("k", "w", rows(2, 2))]).copies] == ["q_again", "k"]
    with pytest.raises(CheckpointMismatchError, match=r"parameter 'w' is only partly fed \(8 of 16 elements"):
        settle(copies)


def test_a_parameter_no_write_reaches_is_named():
    params = {"w": torch.empty(4, 4), "v": torch.empty(2)}
    with pytest.raises(CheckpointMismatchError, match="no tensor in the checkpoint feeds parameter 'v'"):
        settle([copy("a", "w", rows(0, 4))], params=params)


def test_copies_into_partly_the_same_elements_are_left_to_upstream():
    copies = [copy("a", "w", rows(0, 3)), copy("b", "w", rows(2, 2))]
    with pytest.raises(UnsupportedModelError, match="write 'a' and then 'b' into partly the same elements of parameter 'w'"):
        settle(copies)


def test_zero_fill_then_copies_run_as_the_executor_runs_them():
    # Padding zero-filled first, then the rows copied over part of it: the executor zero-fills
    # before it copies, as upstream did here; the other way round it cannot.
    whole = RecordedZero("w", rows(0, 4))
    first = [copy("a", "w", rows(0, 2))]
    settled = settle(first, zeros=[whole], zeros_after=[0])
    assert settled.copies == first and settled.zeros == [whole]
    with pytest.raises(UnsupportedModelError, match="write 'a' and then a zero-fill"):
        settle(first, zeros=[whole], zeros_after=[1])


def test_copies_that_overlap_inside_a_zero_fill_are_left_to_upstream():
    whole = RecordedZero("w", rows(0, 4))
    copies = [copy("a", "w", rows(0, 3)), copy("b", "w", rows(2, 2))]
    with pytest.raises(UnsupportedModelError, match="write 'a' and then 'b'"):
        settle(copies, zeros=[whole], zeros_after=[0])


def test_a_zero_fill_replaced_whole_by_a_copy_and_the_other_way_round():
    zero, full = RecordedZero("w", rows(0, 4)), copy("a", "w", rows(0, 4))
    assert settle([full], zeros=[zero], zeros_after=[0]) == type(settle([full]))([full], [])
    assert settle([full], zeros=[zero], zeros_after=[1]) == type(settle([full]))([], [zero])


def test_a_strided_destination_is_compared_run_by_run():
    # Column halves of a [4, 4] parameter (row-parallel shards): runs of 2 elements each.
    left, right = copy("l", "w", (0, (4, 2), (4, 1))), copy("r", "w", (2, (4, 2), (4, 1)))
    assert settle([left, right]).copies == [left, right]
    with pytest.raises(CheckpointMismatchError, match="only partly fed"):
        settle([left, copy("l_again", "w", (0, (4, 2), (4, 1)))])


def test_a_parameter_that_is_not_contiguous_is_counted():
    params = {"w": torch.empty(4, 4).t()}
    copies = [copy("a", "w", rows(0, 2)), copy("b", "w", rows(2, 2))]
    assert settle(copies, params=params).copies == copies
    with pytest.raises(CheckpointMismatchError, match="only partly fed"):
        settle(copies[:1], params=params)


def test_writes_of_very_many_runs_are_counted_not_compared(monkeypatch):
    # A [4, 4] parameter written column by column: 16 runs of one element, more than the limit
    # set here, so elements are counted (as for a [E, H, 2I] expert layout at real sizes).
    from sglang_fastload.loader import settled_writes

    columns = [copy(f"c{j}", "w", (j, (4, 1), (4, 1))) for j in range(4)]
    monkeypatch.setattr(settled_writes, "MAX_EXACT_RUNS", 8)
    assert settle(columns).copies == columns
    with pytest.raises(CheckpointMismatchError, match="only partly fed"):
        settle(columns[:3])
    twice = columns[:3] + [copy("c0_again", "w", (0, (4, 1), (4, 1)))]
    assert settle(twice).copies == twice  # counted: 16 of 16, the overlap not seen
    monkeypatch.setattr(settled_writes, "MAX_EXACT_RUNS", 16)
    with pytest.raises(CheckpointMismatchError, match=r"only partly fed \(12 of 16"):
        settle(twice)
