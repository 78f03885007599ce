"""Ranks and widths asked of SGLang's ``get_parallel()`` first, its older getters second.

SGLang deprecates the ``parallel_state`` getters in favour of ``get_parallel()`` (since
0.5.21); a later release may drop them, and a process where nothing is published has only
the getters' answers. Here the real
SGLang modules answer, or are made to answer as such a release would (an attribute removed,
a context not published). Real multi-rank loads print the ranks these answers give (the
summary lines parsed in ``tests/server/test_multinode.py`` and ``test_fast_matches_upstream.py``).
"""

import types
import warnings

import pytest

from sglang_fastload import parallel_ranks, update_guard
from sglang_fastload.loader import fast_model_loader as fml


@pytest.fixture()
def sglang_modules():
    from sglang.srt import runtime_context
    from sglang.srt.distributed import parallel_state

    return runtime_context, parallel_state


def _context(**values):
    return lambda: types.SimpleNamespace(**values)


ASKED = []  # getters called where get_parallel() answered (a raise would be swallowed)


def _refuse(*_a, **_k):
    ASKED.append(True)
    raise AssertionError("the older getter was asked although get_parallel() answered")


@pytest.fixture(autouse=True)
def no_getter_asked_yet():
    ASKED.clear()


def test_get_parallel_answers_first(monkeypatch, sglang_modules):
    runtime_context, parallel_state = sglang_modules
    monkeypatch.setattr(runtime_context, "get_parallel", _context(tp_size=4, tp_rank=3))
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", _refuse)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", _refuse)
    assert (parallel_ranks.tp_size(), parallel_ranks.tp_rank()) == (4, 3)
    assert fml._rank_suffix() == " [tp rank 3/4]"
    assert not fml._single_rank() and not fml._is_first_rank()
    assert not ASKED


def test_the_getter_answers_where_the_context_is_not_published(monkeypatch, sglang_modules):
    runtime_context, parallel_state = sglang_modules

    def unpublished():
        raise ValueError("config namespace 'parallel' not published")

    monkeypatch.setattr(runtime_context, "get_parallel", unpublished)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 0)
    assert (parallel_ranks.tp_size(), parallel_ranks.tp_rank()) == (2, 0)
    assert fml._rank_suffix() == " [tp rank 0/2]" and fml._is_first_rank() and not fml._single_rank()


def test_a_release_with_only_the_context(monkeypatch, sglang_modules):
    runtime_context, parallel_state = sglang_modules
    monkeypatch.setattr(runtime_context, "get_parallel", _context(tp_size=1, tp_rank=0))
    for getter in parallel_ranks.GETTERS.values():
        monkeypatch.delattr(parallel_state, getter, raising=False)
    assert parallel_ranks.tp_size() == 1 and fml._single_rank()


def test_no_answer_at_all_is_none_and_the_loader_keeps_its_defaults(monkeypatch, sglang_modules):
    runtime_context, parallel_state = sglang_modules
    monkeypatch.delattr(runtime_context, "get_parallel")
    for getter in parallel_ranks.GETTERS.values():
        monkeypatch.delattr(parallel_state, getter, raising=False)
    assert parallel_ranks.tp_size() is None and parallel_ranks.tp_group() is None
    assert set(parallel_ranks.placement().values()) == {None}
    # Alone or not is unknown: no stream (it needs one rank), rank 0's progress bar, the
    # single-rank thread count, and the rank's own vote.
    assert not fml._single_rank() and fml._is_first_rank() and fml._rank_suffix() == ""
    assert fml.default_num_threads() == fml.DEFAULT_NUM_THREADS
    assert update_guard.all_ranks_ok(False) is False and update_guard.all_ranks_ok(True) is True


def test_the_group_of_one_rank_keeps_the_rank_s_own_vote(monkeypatch, sglang_modules):
    runtime_context, _ = sglang_modules
    monkeypatch.setattr(runtime_context, "get_parallel", _context(tp_group=types.SimpleNamespace(world_size=1)))
    assert update_guard.all_ranks_ok(False) is False and update_guard.all_ranks_ok(True) is True


def test_the_loader_no_longer_asks_the_deprecated_getters(monkeypatch, sglang_modules):
    """Where the context answers (as in a published server process), no getter is called,
    so SGLang 0.5.23 warns of none of them."""
    runtime_context, parallel_state = sglang_modules
    monkeypatch.setattr(runtime_context, "get_parallel", _context(
        tp_size=2, tp_rank=1, tp_group=types.SimpleNamespace(world_size=1),
        **{name: 0 for name in parallel_ranks.GETTERS if name not in ("tp_size", "tp_rank", "tp_group")},
        attn_dp_rank=0, attn_dp_size=1))
    for getter in parallel_ranks.GETTERS.values():
        monkeypatch.setattr(parallel_state, getter, _refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        fml.default_num_threads()
        fml._rank_suffix()
        fml._single_rank()
        fml._is_first_rank()
        update_guard.all_ranks_ok(True)
        placement = parallel_ranks.placement()
    assert not ASKED
    assert placement["tp_rank"] == 1 and placement["tp_size"] == 2 and placement["attn_dp_size"] == 1
    assert set(placement) == {f"{g}_{part}" for g in parallel_ranks.PLACEMENT_GROUPS for part in ("rank", "size")}
