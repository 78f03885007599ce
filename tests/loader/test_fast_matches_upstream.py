"""`fast` produces parameters bit-identical to upstream's own `auto` load, at start-up and on
update, for every model, parallelism and checkpoint layout we support (real SGLang, CPU)."""

import json
import os
import re

import pytest

from tests.rig.checkpoints import checkpoint_bytes, write_llama, write_qwen3, write_qwen3_moe
from tests.rig.inprocess import CaseSpec, compare_params, load_cases_beside_upstream, load_params, upstream_params

WRITERS = {
    "qwen3": lambda d, seed, layout: write_qwen3(d, tied=False, seed=seed, layout=layout),
    "qwen3_tied": lambda d, seed, layout: write_qwen3(d, tied=True, seed=seed, layout=layout),
    "qwen3_moe": lambda d, seed, layout: write_qwen3_moe(d, seed=seed, layout=layout),
}

SUMMARY = re.compile(r"sglang-fastload: loaded (\S+?)(?: \[tp rank (\d+)/\d+\])?: (\d+) files, (\d+) tensors .*?read (\d+) of (\d+) bytes.*?plan [\d.]+ s \((cached|built|stored)\)")


def summaries(log):
    return [m.groups() for m in SUMMARY.finditer(log)]


def pair(tmp_path, kind, layout):
    a, b = tmp_path / f"{kind}-{layout}-a", tmp_path / f"{kind}-{layout}-b"
    if not (a.exists() and b.exists()):  # cases of one module share their checkpoints
        WRITERS[kind](a, 11, layout)
        WRITERS[kind](b, 22, layout)
    return a, b


def assert_same(reference, result, what):
    assert len(reference) == len(result)
    for rank, (ref, got) in enumerate(zip(reference, result)):
        assert ref.error is None and got.error is None, (ref.error, got.error)
        diffs = compare_params(ref.params, got.params)
        assert not diffs, f"{what}, rank {rank}: {diffs[:5]}"
        if ref.params_before is not None:
            diffs = compare_params(ref.params_before, got.params_before)
            assert not diffs, f"{what} (start-up load), rank {rank}: {diffs[:5]}"


CASES = [
    # (model, layout, tp, ep)
    ("qwen3", "single", 1, 1),
    ("qwen3_tied", "sharded", 1, 1),
    ("qwen3", "split_layer", 1, 1),
    ("qwen3_tied", "shuffled_shards", 1, 1),
    ("qwen3", "shuffled_tensors", 1, 1),
    ("qwen3_moe", "single", 1, 1),
    ("qwen3_moe", "sharded", 1, 1),
    ("qwen3_moe", "shuffled_tensors", 1, 1),
    ("qwen3", "sharded", 2, 1),
    ("qwen3_tied", "single", 2, 1),
    ("qwen3_moe", "split_layer", 2, 1),
    ("qwen3_moe", "sharded", 2, 2),
]


# Cases whose `fast` loads use buffers of ~10 KiB (the tiny models' tensors are 32-256 KiB,
# so they are cut into row blocks): every block, row shards read run by run included, must
# land where the whole tensor would.
FAST_EXTRA = {
    ("qwen3", "shuffled_tensors", 1, 1): {"chunk_mb": 0.01, "startup_stream": "on"},
    ("qwen3_moe", "sharded", 1, 1): {"chunk_mb": 0.01},
    ("qwen3", "sharded", 2, 1): {"chunk_mb": 0.01, "min_segment_bytes": 0},
    # Start-ups that read the checkpoint into a scratch while the plan is built, then copy the
    # plan out of it (startup_stream.py: on CUDA by default, on the host when asked).
    ("qwen3_tied", "sharded", 1, 1): {"startup_stream": "on"},
    ("qwen3_moe", "single", 1, 1): {"startup_stream": "on"},
}
STREAMED = "of it while the plan was built"


@pytest.fixture(scope="module")
def case_results(tmp_path_factory):
    """``{case: (upstream, fast, (a, b))}`` for every case of one TP size: two rank groups per
    TP size run all its cases (upstream's own SGLang, then `fast`; start-up and update),
    imports paid once per group."""
    root = tmp_path_factory.mktemp("fast-matches-upstream")
    done = {}

    def results(tp):
        cases = [c for c in CASES if c[2] == tp]
        if cases[0] not in done:
            specs, pairs = [], []
            for case in cases:
                kind, layout, _, ep = case
                a, b = pair(root, kind, layout)
                pairs.append((a, b))
                for load_format in ("auto", "fast"):
                    extra = FAST_EXTRA.get(case) if load_format == "fast" else None
                    args = {"model_loader_extra_config": json.dumps(extra)} if extra else None
                    specs.append(CaseSpec(a, load_format=load_format, update_path=b, keep_initial=True, ep_size=ep, server_args=args))
            got = load_cases_beside_upstream(specs, tp_size=tp)
            for i, case in enumerate(cases):
                done[case] = (got[2 * i], got[2 * i + 1], pairs[i])
        return done

    return results


@pytest.mark.parametrize("kind,layout,tp,ep", CASES, ids=[f"{k}-{l}-tp{t}-ep{e}" for k, l, t, e in CASES])
def test_startup_and_update_bit_identical_to_upstream(case_results, kind, layout, tp, ep):
    upstream, fast, (a, b) = case_results(tp)[(kind, layout, tp, ep)]
    for result in (upstream, fast):
        assert not isinstance(result, str), result  # the case crashed: rank tracebacks
    assert_same(upstream, fast, f"{kind}/{layout} tp={tp} ep={ep}")
    # The fast path really ran (no silent fallback), on every rank, for load and update.
    for rank in fast:
        got = summaries(rank.log)
        assert len(got) == 2, rank.log[-3000:]
        assert "no fast-load plan" not in rank.log
        # The start-up streamed exactly where asked; updates never do.
        streamed = (FAST_EXTRA.get((kind, layout, tp, ep)) or {}).get("startup_stream") == "on"
        assert rank.log.count(STREAMED) == (1 if streamed else 0), rank.log[-3000:]
    # The ranks of a node share its CPUs: together they start no more reader threads than
    # the CPUs, or 2 per rank where CPUs are fewer (one rank keeps the single-rank default).
    if tp > 1:
        threads = [int(n) for rank in fast for n in re.findall(r"with (\d+) threads", rank.log)[:1]]
        assert sum(threads) <= max(os.cpu_count() or 1, 2 * tp), threads
    # Between them the ranks read each checkpoint about once (row shards included).
    for load, ckpt in enumerate((a, b)):
        node = sum(int(summaries(rank.log)[load][4]) for rank in fast)
        assert node <= 1.05 * checkpoint_bytes(ckpt), (load, node, checkpoint_bytes(ckpt))


def test_plan_cache_reused_for_same_layout_and_rebuilt_for_another(tmp_path):
    a, b = pair(tmp_path, "qwen3_moe", "sharded")
    c = write_qwen3_moe(tmp_path / "c-single", seed=33, layout="single")
    fast = load_params(a, load_format="fast", update_path=[b, a, c])
    got = summaries(fast[0].log)
    assert [g[-1] for g in got] == ["built", "cached", "cached", "built"], got
    reference = upstream_params(c)
    assert not compare_params(reference[0].params, fast[0].params)


def _bytes_read(results):
    return [int(g[4]) for r in results for g in summaries(r.log)[:1]]


def test_tp2_dense_reads_about_half_per_rank(tmp_path):
    a = write_qwen3(tmp_path / "dense", tied=False, seed=5, layout="sharded")
    total = checkpoint_bytes(a)
    exact = load_params(a, load_format="fast", tp_size=2, extra_config={"min_segment_bytes": 0})
    per_rank = _bytes_read(exact)
    assert len(per_rank) == 2
    for n in per_rank:
        # Column shards are contiguous halves, row shards strided halves; only the small
        # replicated norms are read by both ranks.
        assert 0.45 * total <= n <= 0.55 * total, (per_rank, total)
    default = load_params(a, load_format="fast", tp_size=2)
    # With the default, tiny strided runs are gathered from a mapping of the file instead of
    # read run by run: the same bytes leave the page cache.
    assert _bytes_read(default) == per_rank
    reference = upstream_params(a, tp_size=2)
    for ref, got in zip(reference, exact):
        assert not compare_params(ref.params, got.params)


def test_ep2_never_reads_other_ranks_experts(tmp_path):
    a = write_qwen3_moe(tmp_path / "moe", seed=6, layout="sharded", num_experts=8)
    total = checkpoint_bytes(a)
    fast = load_params(a, load_format="fast", tp_size=2, ep_size=2)
    per_rank = _bytes_read(fast)
    assert len(per_rank) == 2 and all("no fast-load plan" not in r.log for r in fast), [r.log[-2000:] for r in fast]
    # Each rank holds half the experts (the bulk of the bytes) and reads no others.
    assert all(0.35 * total < n < 0.65 * total for n in per_rank), (per_rank, total)


def test_class_not_in_the_support_table_falls_back_to_upstream_with_one_line(tmp_path):
    # A subclass of a supported class (LlamaForCausalLM) is not supported by inheritance.
    subclass = {"architectures": ["IQuestCoderForCausalLM"]}
    a = write_llama(tmp_path / "sub-a", seed=1, extra_config=subclass)
    b = write_llama(tmp_path / "sub-b", seed=2, extra_config=subclass)
    fast = load_params(a, load_format="fast", update_path=b)
    upstream = upstream_params(b)
    assert fast[0].error is None
    assert not compare_params(upstream[0].params, fast[0].params)
    lines = [l for l in fast[0].log.splitlines() if "has no fast-load plan" in l]
    assert len(lines) == 2, fast[0].log[-3000:]  # start-up and update
    assert all("IQuestCoderForCausalLM is not in the fast-load support table" in l for l in lines), lines


def test_num_threads_from_extra_config_reach_the_fast_reader(tmp_path):
    a, b = pair(tmp_path, "qwen3", "sharded")
    fast = load_params(a, load_format="fast", update_path=b, extra_config={"num_threads": 3})
    assert fast[0].error is None
    assert re.findall(r"with (\d+) threads", fast[0].log) == ["3", "3"]
