"""Failed updates at TP=2, in-process over gloo, through SGLang's real WeightUpdater: every rank
ends on the same, exact weights, whichever rank failed."""

import pytest

from tests.rig.inprocess import compare_params, load_params, upstream_params


@pytest.fixture(scope="module")
def tp2_reference(checkpoint_factory):
    a = checkpoint_factory("qwen3", seed=31, layout="sharded")
    b = checkpoint_factory("qwen3", seed=32, layout="sharded")
    return a, b, upstream_params(a, tp_size=2), upstream_params(b, tp_size=2)


def assert_back_on_a_then_on_b(res, ref_a, ref_b):
    """On every rank: the first update failed and rolled back to A exactly, the retry landed B."""
    for rank in range(2):
        first, second = res[rank].update_results
        assert not first[0] and "Rolled back to the previous weights" in first[1], first
        assert second[0], second
        after_failure, after_retry = res[rank].params_history
        assert not compare_params(ref_a[rank].params, after_failure), f"rank {rank} not back on A"
        assert not compare_params(ref_b[rank].params, after_retry), f"rank {rank} not on B"


def test_one_rank_fails_after_writing_and_both_roll_back(tp2_reference, tmp_path):
    """The first rank to take the one-shot fault fails mid-copy; the other completes B. Both
    must end on A, exactly (the previous checkpoint is still on disk), then take B cleanly.
    (Each rank gathers its row shards by itself, the default: with spans shared, a fault on
    one rank stops both in the same round; see the next test.)"""
    a, b, ref_a, ref_b = tp2_reference
    arm = tmp_path / "arm"
    arm.write_text("4096")
    res = load_params(
        # Start-up through `auto` (the armed fault strikes the first `fast` load: the update).
        a, load_format="auto", update_load_format="fast", tp_size=2, update_path=[b, b], keep_history=True,
        env={"SGLANG_FASTLOAD_FAULT_FILE": str(arm)},
    )
    assert "shared with the node's ranks" not in res.log_text()
    assert not arm.exists()
    assert_back_on_a_then_on_b(res, ref_a, ref_b)
    assert "injected I/O fault" in res.log_text()


def test_a_fault_while_the_ranks_read_shared_spans_stops_both_and_both_roll_back(tp2_reference, tmp_path):
    """With spans shared (opt-in), the ranks read the spans of row shards together, first
    thing in a load: the rank that takes the fault reports it in the round's collective, the
    other stops there too and says why. Both end on A exactly, then take B cleanly through
    the shared spans."""
    a, b, ref_a, ref_b = tp2_reference
    arm = tmp_path / "arm"
    arm.write_text("1")
    res = load_params(
        a, load_format="auto", update_load_format="fast", tp_size=2, update_path=[b, b], keep_history=True,
        env={"SGLANG_FASTLOAD_FAULT_FILE": str(arm), "SGLANG_FASTLOAD_SHARED_SPANS": "1"},
    )
    assert not arm.exists()
    log = res.log_text()
    assert "injected I/O fault" in log
    assert "another tensor-parallel rank failed while the node's ranks read the row shards they share" in log
    assert_back_on_a_then_on_b(res, ref_a, ref_b)
    assert log.count("bytes out of spans shared with the node's ranks") == 2  # the retry, one line per rank


def test_snapshot_restores_when_the_checkpoint_never_reads(tp2_reference, tmp_path):
    a, b, ref_a, _ = tp2_reference
    arm = tmp_path / "arm"
    arm.write_text("4096 persist")
    res = load_params(
        a, load_format="auto", update_load_format="fast", tp_size=2, update_path=b, keep_history=True,
        env={"SGLANG_FASTLOAD_FAULT_FILE": str(arm), "SGLANG_FASTLOAD_UPDATE_SNAPSHOT": "1"},
    )
    for rank in range(2):
        ok, message = res[rank].update_results[0]
        assert not ok and "Rolled back to the previous weights (host snapshot" in message, message
        assert not compare_params(ref_a[rank].params, res[rank].params_history[0]), f"rank {rank} not back on A"
