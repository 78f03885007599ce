"""The load-plan store: a plan built at one start is read back at the next (new rank
processes, real SGLang) and loads the same bits as upstream's ``auto``; every key ingredient
the rig can vary makes the next start build; a damaged store file never fails a load; the
store can be switched off; concurrent writers never leave a torn file."""

from __future__ import annotations

import dataclasses
import gc
import gzip
import hashlib
import json
import os
import re
import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

from sglang_fastload import constants
from sglang_fastload.checkpoint.safetensors_header import read_header
from sglang_fastload.loader import plan_codec, plan_key, plan_store, source_digest_cache
from sglang_fastload.loader.plan import DEFAULT_MIN_SEGMENT_BYTES, CopyStep, FilePlan, LoadPlan, make_step, sized_chunks
from tests.rig.inprocess import CaseSpec, compare_params, load_cases, load_cases_beside_upstream

SUMMARY = re.compile(r"sglang-fastload: loaded \S+?(?: \[tp rank \d+/\d+\])?: .*?plan [\d.]+ s \((cached|stored|built)\)")
STORED = re.compile(r"load plan stored in [\d.]+ s(?: \[tp rank \d+/\d+\])?: (\S+)")
NO_PLAN_OF_PREFIX = re.compile(r"no stored load plan for this model and checkpoint layout \(key prefix ([0-9a-f]+);")
STORED_PARTS = re.compile(r"load plan stored in .*? \(key parts ([^)]*)\)")
IGNORED = "ignoring stored load plan"
STREAMED_START = "of it while the plan was built"


def plan_words(result):
    """The plan word of each rank's (only) load of one case."""
    words = [SUMMARY.findall(rank.log) for rank in result]
    assert all(len(w) == 1 for w in words), [rank.log[-2000:] for rank in result]
    return [w[0] for w in words]


def written(result):
    return [path for rank in result for path in STORED.findall(rank.log)]


def assert_ok(results):
    for i, r in enumerate(results):
        assert not isinstance(r, str), f"case {i} crashed:\n{r}"
        assert all(e is None for e in r.errors), (i, r.errors)


def assert_bits(reference, got, what):
    diffs = compare_params(reference, got)
    assert not diffs, f"{what}: {diffs[:5]}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-store")


def store_env(store):
    return {constants.ENV_PLAN_STORE: "1", constants.ENV_PLAN_DIR: str(store)}


def plan_files(store):
    return sorted(p for p in os.listdir(store) if p.endswith(plan_store.SUFFIX))


@pytest.fixture(scope="module")
def one_rank(store, checkpoint_factory, qwen3_a, qwen3_b, qwen3_moe_a, tmp_path_factory):
    """Two starts at TP=1 sharing a store; between them the MoE plan file is truncated."""
    first = load_cases_beside_upstream(
        [
            CaseSpec(qwen3_a, "fast"),
            CaseSpec(qwen3_moe_a, "fast"),
            CaseSpec(qwen3_a, "auto"),
            CaseSpec(qwen3_moe_a, "auto"),
            CaseSpec(qwen3_b, "auto"),
            # 10 KiB chunks (the tiny tensors are cut), read while the plan is built or not
            # (other extra configs: other keys): the streamed start's plan is cut where it is stored.
            CaseSpec(qwen3_moe_a, "fast", server_args={"model_loader_extra_config": json.dumps(
                {"startup_stream": "on", "chunk_mb": 0.01})}),
            CaseSpec(qwen3_moe_a, "fast", server_args={"model_loader_extra_config": json.dumps({"chunk_mb": 0.01})}),
        ],
        env=store_env(store),
    )
    assert_ok(first)
    after_first = plan_files(store)
    moe_file = written(first[1])[0]
    with open(moe_file, "r+b") as f:
        f.truncate(os.path.getsize(moe_file) // 2)

    sharded = checkpoint_factory("qwen3", layout="sharded")  # same tensors, other files
    other_config = tmp_path_factory.mktemp("qwen3-other-config") / "ckpt"
    shutil.copytree(qwen3_a, other_config)
    config = json.loads((other_config / "config.json").read_text())
    config["rope_theta"] = float(config.get("rope_theta", 10000.0)) * 2  # same shapes
    (other_config / "config.json").write_text(json.dumps(config))
    second = load_cases_beside_upstream(
        [
            CaseSpec(qwen3_a, "fast"),
            CaseSpec(qwen3_moe_a, "fast"),
            CaseSpec(sharded, "fast"),
            CaseSpec(other_config, "fast"),
            CaseSpec(qwen3_a, "fast", server_args={"dtype": "float32"}),
            CaseSpec(qwen3_a, "auto", server_args={"dtype": "float32"}),
            CaseSpec(qwen3_b, "fast"),  # another directory (a trainer's next step), same layout
        ],
        env=store_env(store),
    )
    assert_ok(second)
    return first, after_first, second


def test_first_start_builds_and_stores_the_plan(one_rank):
    first, after_first, _ = one_rank
    assert plan_words(first[0]) == ["built"] and plan_words(first[1]) == ["built"]
    assert len(after_first) == 4, after_first
    assert sorted(os.path.basename(p) for case in (0, 1, 5, 6) for p in written(first[case])) == after_first
    # Nothing of either key's prefix was stored: neither start took its source digests before
    # building; each plan was stored under a key that starts with that prefix.
    for case in first[:2]:
        [prefix] = NO_PLAN_OF_PREFIX.findall(case[0].log)
        [path] = written(case)
        assert os.path.basename(path).startswith(prefix + "-"), (prefix, path)
        # The key's parts, taken with its source digests on the writer's thread, are logged
        # where the plan is stored (what two starts that should share a plan compare).
        [parts] = STORED_PARTS.findall(case[0].log)
        assert {"config", "parameters", "server_args", "sglang", "package", "checkpoint"} <= set(
            dict(item.split("=") for item in parts.split()))


def _stored_plan(path):
    with gzip.open(path, "rb") as f:
        return json.loads(f.read())["plan"]


def test_a_streamed_start_stores_its_plan_cut_as_any_other_start(one_rank):
    # A start that reads while its plan is built copies whole steps out of its scratch; the
    # plan it stores is cut into chunks as an unstreamed start's is: the same steps.
    first, _, _ = one_rank
    assert plan_words(first[5]) == ["built"] and STREAMED_START in first[5][0].log
    assert plan_words(first[6]) == ["built"] and STREAMED_START not in first[6][0].log
    [streamed], [unstreamed] = written(first[5]), written(first[6])
    assert streamed != unstreamed and _stored_plan(streamed) == _stored_plan(unstreamed)
    steps = sum(count for _, count, _ in _stored_plan(streamed)["files"])
    assert steps > _stored_plan(streamed)["tensor_count"]  # cut: more steps than tensors
    assert_bits(first[3], first[5], "qwen3_moe, streamed start vs auto")


def test_next_start_reads_the_stored_plan_bit_identical_to_upstream(one_rank):
    first, _, second = one_rank
    assert plan_words(second[0]) == ["stored"]
    assert not written(second[0]) and "no stored load plan" not in second[0][0].log
    assert_bits(first[2], second[0], "qwen3, stored plan vs auto")


def test_another_checkpoint_directory_of_the_same_layout_reads_the_stored_plan(one_rank):
    first, _, second = one_rank
    assert plan_words(second[6]) == ["stored"]
    assert_bits(first[4], second[6], "qwen3 B through the plan stored for A")


def test_truncated_store_file_is_rebuilt_with_a_warning_and_loads_correctly(one_rank):
    first, _, second = one_rank
    assert plan_words(second[1]) == ["built"]
    assert IGNORED in second[1][0].log, second[1][0].log[-3000:]
    assert written(second[1]), "the rebuilt plan replaces the damaged file"
    assert_bits(first[3], second[1], "qwen3-moe, rebuilt after a truncated store file")


@pytest.mark.parametrize("case,what", [(2, "another shard split"), (3, "another config"), (4, "another dtype")])
def test_another_layout_config_or_dtype_builds(one_rank, case, what):
    _, _, second = one_rank
    assert plan_words(second[case]) == ["built"], what
    assert IGNORED not in second[case][0].log
    if case == 4:
        assert_bits(second[5], second[4], "float32 model from a bf16 checkpoint")


@pytest.fixture(scope="module")
def two_ranks(one_rank, store, qwen3_a, qwen3_moe_a):
    """Two starts at TP=2 (and EP=2 for the MoE model) on the store the TP=1 starts filled."""
    before = set(plan_files(store))
    first = load_cases_beside_upstream(
        [
            CaseSpec(qwen3_a, "auto"),
            CaseSpec(qwen3_a, "fast"),
            CaseSpec(qwen3_moe_a, "auto", ep_size=2),
            CaseSpec(qwen3_moe_a, "fast", ep_size=2),
        ],
        tp_size=2,
        env=store_env(store),
    )
    assert_ok(first)
    added = set(plan_files(store)) - before
    second = load_cases(
        [CaseSpec(qwen3_a, "fast"), CaseSpec(qwen3_moe_a, "fast", ep_size=2)], tp_size=2, env=store_env(store)
    )
    assert_ok(second)
    return first, added, second


def test_other_tensor_parallel_size_and_rank_build_their_own_plans(two_ranks):
    first, added, _ = two_ranks
    assert plan_words(first[1]) == ["built", "built"]
    assert plan_words(first[3]) == ["built", "built"]
    # One file per rank: the rank is part of the key.
    assert len(added) == 4, added
    assert len(set(written(first[1]))) == 2


def test_tensor_and_expert_parallel_starts_read_their_stored_plans(two_ranks):
    first, _, second = two_ranks
    assert plan_words(second[0]) == ["stored", "stored"]
    assert plan_words(second[1]) == ["stored", "stored"]
    assert_bits(first[0], second[0], "qwen3 TP=2, stored plans vs auto")
    assert_bits(first[2], second[1], "qwen3-moe TP=2 EP=2, stored plans vs auto")


# --------------------------------------------------------------------------------------
# the store and the key, in this process (no rank processes)
# --------------------------------------------------------------------------------------


@pytest.fixture
def store_on(tmp_path, monkeypatch):
    """The plan store switched on, in a directory of this test's own."""
    monkeypatch.setenv(constants.ENV_PLAN_STORE, "1")
    monkeypatch.setenv(constants.ENV_PLAN_DIR, str(tmp_path / "store"))


@pytest.fixture
def tiny(tmp_path, store_on):
    """A real one-tensor checkpoint, a plan for it made by ``make_step``, a parameter."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)}, str(path))
    header = read_header(str(path))
    entry = header.tensors["w"]
    step = make_step("w", "p", (0, (3, 4), (4, 1)), (0, (3, 4), (4, 1)), entry.start, 2, DEFAULT_MIN_SEGMENT_BYTES, torch.bfloat16)
    plan = LoadPlan([FilePlan(str(path), [step])], [], {"p": ((3, 4), torch.bfloat16)}, frozenset({"w"}), 1)
    return plan, {str(path): header}, {"p": torch.empty(3, 4, dtype=torch.bfloat16)}


def test_round_trip_binds_files_by_base_name(tiny):
    plan, headers, params = tiny
    path = plan_store.write_plan("k1", plan)
    assert path is not None and os.path.exists(path)
    got = plan_store.read_plan("k1", headers, params)
    assert got is not None
    assert [f.path for f in got.files] == ["model.safetensors"]
    assert got.files[0].steps == plan.files[0].steps
    assert (got.zeros, got.param_meta, got.tensors_used, got.tensor_count) == (plan.zeros, plan.param_meta, plan.tensors_used, plan.tensor_count)


def test_steps_cut_to_fill_chunks_are_stored_and_checked_like_any_other(tmp_path, store_on):
    # build_plan cuts steps between rows so chunks are full; the store keeps the cut steps
    # and its checks (reads inside the tensor, writes inside the parameter) accept them.
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(128, dtype=torch.bfloat16).reshape(4, 32)}, str(path))
    header = read_header(str(path))
    start = header.tensors["w"].start
    halves = [  # rows 0-1 and rows 2-3 of "w" into the same rows of "p": 128 bytes each
        make_step("w", "p", (r * 32, (2, 32), (32, 1)), (r * 32, (2, 32), (32, 1)), start, 2, DEFAULT_MIN_SEGMENT_BYTES, torch.bfloat16)
        for r in (0, 2)
    ]
    cut = [st for chunk, _ in sized_chunks(halves, 192) for st in chunk]  # 3 rows per chunk
    assert [st.view[1][0] for st in cut] == [2, 1, 1]
    plan = LoadPlan([FilePlan(str(path), cut)], [], {"p": ((4, 32), torch.bfloat16)}, frozenset({"w"}), 1)
    assert plan_store.write_plan("k-cut", plan) is not None
    got = plan_store.read_plan("k-cut", {str(path): header}, {"p": torch.empty(4, 32, dtype=torch.bfloat16)})
    assert got is not None and got.files[0].steps == cut


def test_stored_steps_carry_the_derived_values_fresh_steps_compute(tmp_path, store_on):
    # The store hands back steps with their byte count and contiguity already set (computed
    # once per geometry); they must be what a step computes for itself, for every kind.
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(128, dtype=torch.bfloat16).reshape(4, 32),
               "v": torch.arange(32, dtype=torch.float32).reshape(4, 8)}, str(path))
    header = read_header(str(path))
    w, v = header.tensors["w"].start, header.tensors["v"].start
    cols = (8, (4, 8), (32, 1))  # a column slice: runs of 16 bytes
    steps = [
        make_step("w", "p", (0, (4, 32), (32, 1)), (0, (4, 32), (32, 1)), w, 2, DEFAULT_MIN_SEGMENT_BYTES, torch.bfloat16),
        make_step("w", "q", cols, (0, (4, 8), (8, 1)), w, 2, DEFAULT_MIN_SEGMENT_BYTES, torch.bfloat16),  # gathered
        make_step("w", "q", cols, (0, (4, 8), (8, 1)), w, 2, 1, torch.bfloat16),  # read run by run
        make_step("w", "p", cols, (0, (4, 8), (32, 1)), w, 2, 1, torch.bfloat16),  # into a strided destination
        make_step("v", "q", (0, (4, 8), (8, 1)), (0, (4, 8), (8, 1)), v, 4, DEFAULT_MIN_SEGMENT_BYTES, torch.float32),
    ]
    steps.append(dataclasses.replace(steps[1], gather=False))  # a span read whole (a file's unaligned tensor)
    steps.append(make_step("v", "q", (2, (4, 4), (8, 1)), (0, (4, 4), (4, 1)), v + 1, 4, DEFAULT_MIN_SEGMENT_BYTES,
                           torch.float32))  # a column slice of an unaligned tensor: its span read whole
    assert [st.gather for st in steps] == [False, True, False, False, False, False, False]
    for st in steps:  # make_step sets them from what it knows: what a fresh step computes
        fresh = CopyStep(st.tensor, st.param, st.dst, st.reads, st.view, st.itemsize, st.src_dtype, st.gather)
        assert (st.nbytes, st.view_is_dense, st.dst_is_contiguous) == (fresh.nbytes, fresh.view_is_dense,
                                                                      fresh.dst_is_contiguous), st
    plan = LoadPlan([FilePlan(str(path), steps)], [], {"p": ((4, 32), torch.bfloat16), "q": ((4, 8), torch.bfloat16)},
                    frozenset({"w", "v"}), 2)
    assert plan_store.write_plan("k-derived", plan) is not None
    got = plan_store.read_plan("k-derived", {str(path): header},
                               {"p": torch.empty(4, 32, dtype=torch.bfloat16), "q": torch.empty(4, 8, dtype=torch.bfloat16)})
    assert got is not None and got.files[0].steps == steps
    derived = [(st.nbytes, st.view_is_dense, st.dst_is_contiguous) for st in steps]
    assert [(st.nbytes, st.view_is_dense, st.dst_is_contiguous) for st in got.files[0].steps] == derived
    assert {d[1] for d in derived} == {True, False} and {d[2] for d in derived} == {True, False}


def _rewrite(path, edit):
    with gzip.open(path, "rb") as f:
        data = json.loads(f.read())
    edit(data)
    with gzip.open(path, "wb") as f:
        f.write(json.dumps(data).encode())


def _edit_steps(edit):
    """A ``_rewrite`` edit of the first file's steps, as the list of integers they encode.
    The tiny plan's one step: tensor, param, itemsize, src dtype, gather, geometry, dst
    offset, read count, read offset, read bytes."""

    def apply(data):
        record = data["plan"]["files"][0]
        steps = plan_codec.unpack_ints(record[2], "steps")
        edit(steps)
        record[2] = plan_codec.pack_ints(steps)

    return apply


def _edit_geometry(edit):
    """A ``_rewrite`` edit of the first geometry: ndim, dst sizes, dst strides, view
    offset, view strides (the tiny plan's: 2, 3, 4, 4, 1, 0, 4, 1)."""
    return lambda data: edit(data["plan"]["geometries"][0])


def _set(index, value):
    return lambda values: values.__setitem__(index, value)


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda p: open(p, "r+b").truncate(10), "EOFError"),
        (lambda p: open(p, "wb").write(b"\x1f\x8b" + os.urandom(64)), ""),
        (lambda p: _rewrite(p, lambda d: d.update(schema=99)), "schema 99"),
        (lambda p: _rewrite(p, lambda d: d.update(key="other")), "another key"),
        (lambda p: _rewrite(p, _edit_steps(lambda s: s.__setitem__(-2, s[-2] + 2))), "reads outside the tensor"),
        (lambda p: _rewrite(p, _edit_steps(_set(2, 4))), "another dtype"),
        (lambda p: _rewrite(p, _edit_steps(_set(3, 2))), "another dtype"),  # a dtype the tensor does not have
        (lambda p: _rewrite(p, _edit_steps(_set(4, 2))), "unknown tensor or parameter"),  # gather neither 0 nor 1
        (lambda p: _rewrite(p, _edit_steps(_set(6, 1))), "writes outside parameter"),  # dst offset
        (lambda p: _rewrite(p, _edit_steps(_set(9, 26))), "reads outside the tensor"),  # two bytes too many
        (lambda p: _rewrite(p, _edit_steps(_set(9, 22))), "views outside the bytes"),  # one element too few
        (lambda p: _rewrite(p, _edit_steps(lambda s: s.__delitem__(slice(9, None)))), "cut short"),
        (lambda p: _rewrite(p, _edit_steps(lambda s: s.append(0))), "left over"),
        (lambda p: _rewrite(p, _edit_steps(_set(5, 1))), "IndexError"),  # no such geometry
        (lambda p: _rewrite(p, lambda d: d["plan"]["files"][0].__setitem__(2, "AAAA")), "not whole 64-bit"),
        (lambda p: _rewrite(p, lambda d: d["plan"]["files"][0].__setitem__(2, "not base64!")), "not base64"),
        (lambda p: _rewrite(p, _edit_geometry(_set(1, 4))), "writes outside parameter"),  # 4 rows of 3
        (lambda p: _rewrite(p, _edit_geometry(_set(2, 1.5))), "integers"),
        (lambda p: _rewrite(p, _edit_geometry(_set(5, 1))), "views outside the bytes"),  # view offset
        (lambda p: _rewrite(p, _edit_geometry(lambda g: g.pop())), "geometry is cut short"),
        (lambda p: _rewrite(p, lambda d: d["plan"]["param_meta"][0].__setitem__(1, [4, 3])), "is not [4, 3]"),
        (lambda p: (os.unlink(p), os.mkdir(p)), "IsADirectoryError"),
    ],
    ids=["truncated", "garbage", "schema", "key", "read-offset", "itemsize", "dtype-index", "gather", "dst-offset",
         "read-bytes", "read-short", "cut-short", "left-over", "geometry-index", "odd-bytes", "not-base64",
         "dst-size", "float", "view-offset", "geometry-short", "shape", "directory"],
)
def test_damaged_store_file_is_ignored_with_one_warning(tiny, caplog, damage, reason):
    plan, headers, params = tiny
    path = plan_store.write_plan("k1", plan)
    assert plan_store.read_plan("k1", headers, params) is not None
    damage(path)
    with caplog.at_level("INFO", logger="sglang_fastload.loader.plan_store"):
        assert plan_store.read_plan("k1", headers, params) is None
    lines = [r for r in caplog.records if IGNORED in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING" and reason in lines[0].getMessage(), caplog.text


def test_missing_or_unreadable_store_directory_never_raises(tiny, tmp_path, monkeypatch, caplog):
    plan, headers, params = tiny
    assert plan_store.read_plan("absent", headers, params) is None
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(constants.ENV_PLAN_DIR, str(blocker / "plans"))  # cannot be created
    with caplog.at_level("WARNING", logger="sglang_fastload.loader.plan_store"):
        assert plan_store.write_plan("k1", plan) is None
        assert plan_store.read_plan("k1", headers, params) is None
    assert "could not store the load plan" in caplog.text


def test_store_switched_off_writes_and_reads_nothing(tiny, tmp_path, monkeypatch):
    plan, headers, params = tiny
    monkeypatch.setenv(constants.ENV_PLAN_STORE, "0")
    assert plan_store.store_dir() is None
    assert plan_store.write_plan("k1", plan) is None
    assert not (tmp_path / "store").exists()
    monkeypatch.setenv(constants.ENV_PLAN_STORE, "1")
    plan_store.write_plan("k1", plan)
    monkeypatch.setenv(constants.ENV_PLAN_STORE, "0")
    assert plan_store.read_plan("k1", headers, params) is None


def test_default_directory_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv(constants.ENV_PLAN_DIR, raising=False)
    monkeypatch.delenv(constants.ENV_PLAN_STORE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert plan_store.store_dir() == str(tmp_path / "sglang_fastload" / "plans")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert plan_store.store_dir() == str(tmp_path / "home" / ".cache" / "sglang_fastload" / "plans")


def test_concurrent_writers_leave_whole_files_and_the_store_stays_bounded(tiny, tmp_path):
    plan, headers, params = tiny
    keys = [f"k{i % 4}" for i in range(12)] + [f"other{i}" for i in range(constants.PLAN_STORE_MAX_FILES + 4)]
    threads = [threading.Thread(target=plan_store.write_plan, args=(k, plan)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = os.listdir(tmp_path / "store")
    assert not [n for n in names if n.endswith(".tmp")], names
    assert len(names) == constants.PLAN_STORE_MAX_FILES, len(names)
    for name in names:
        key = name[: -len(plan_store.SUFFIX)]
        assert plan_store.read_plan(key, headers, params) is not None, name


def test_package_source_digest_follows_content_not_location(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(plan_key.__file__)))
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(root, d, ignore=shutil.ignore_patterns("__pycache__"))
    assert plan_key.package_source_digest(str(a)) == plan_key.package_source_digest(str(b))
    engine = b / "loader" / "executor.py"
    engine.write_text(engine.read_text() + "\n# changed\n")
    assert plan_key.package_source_digest(str(a)) != plan_key.package_source_digest(str(b))


def _write_safetensors(path, tensors, metadata=None):
    """A safetensors file written from its header: ``tensors`` = [(name, dtype, shape, nbytes)]
    in data order (any name, even one a library would refuse); the data bytes are zero."""
    header, offset = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + bytes(offset))
    return read_header(str(path))


def test_checkpoint_layout_digest_changes_exactly_when_the_layout_does(tmp_path):
    # The key's checkpoint part must tell apart any two headers whose layouts differ (a wrong
    # reuse loads wrong weights) and match headers that differ only in their metadata's text.
    base = [("a", "BF16", (3, 4), 24), ("b", "F32", (5,), 20)]
    variants = {
        "same": (base, {"step": "1"}),
        "metadata of the same length": (base, {"step": "2"}),
        "longer metadata": (base, {"step": "10"}),  # moves every offset
        "renamed": ([("c", "BF16", (3, 4), 24), base[1]], {"step": "1"}),
        "other dtype of the same size": ([("a", "F16", (3, 4), 24), base[1]], {"step": "1"}),
        "other shape of the same size": ([("a", "BF16", (4, 3), 24), base[1]], {"step": "1"}),
        "other order": ([base[1], base[0]], {"step": "1"}),
        "names split elsewhere": ([("ab", "BF16", (3, 4), 24), ("c", "F32", (5,), 20)], {"step": "1"}),
        "names split elsewhere 2": ([("a", "BF16", (3, 4), 24), ("bc", "F32", (5,), 20)], {"step": "1"}),
        "non-ASCII name": ([("\u00e9", "BF16", (3, 4), 24), base[1]], {"step": "1"}),
        "a dimension of 1 moved": ([("a", "BF16", (3, 4, 1), 24), ("b", "F32", (5,), 20)], {"step": "1"}),
        "a dimension of 1 moved 2": ([("a", "BF16", (3, 4), 24), ("b", "F32", (1, 5), 20)], {"step": "1"}),
    }
    headers = {}
    for i, (label, (tensors, metadata)) in enumerate(variants.items()):
        headers[label] = _write_safetensors(tmp_path / f"{i}.safetensors", tensors, metadata)
    reference = headers["same"]
    copy = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(tmp_path / "0.safetensors", copy)
    assert plan_key.layout_digest(read_header(str(copy))) == plan_key.layout_digest(reference)
    for label, header in headers.items():
        for other_label, other in headers.items():
            same_layout = header.layout_key() == other.layout_key()
            assert (plan_key.layout_digest(header) == plan_key.layout_digest(other)) == same_layout, (label, other_label)
    assert plan_key.layout_digest(headers["metadata of the same length"]) == plan_key.layout_digest(reference)
    assert len({plan_key.layout_digest(h) for h in headers.values()}) == len(headers) - 1


def test_server_args_deny_list_names_real_fields():
    # A stale name (renamed upstream) would silently put a per-start value into the key.
    from sglang.srt.server_args import ServerArgs

    fields = set(ServerArgs.__struct_fields__)
    assert plan_key.SERVER_ARGS_DENY <= fields, sorted(plan_key.SERVER_ARGS_DENY - fields)


def test_environment_in_the_key_leaves_out_per_start_values(monkeypatch):
    # SGLang's launcher sets SGLANG_RUN_ID anew at every start; a loader switch stays in.
    monkeypatch.setenv("SGLANG_RUN_ID", "sglang-run-1")
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    monkeypatch.setenv(constants.ENV_PLAN_DIR, "/somewhere")
    env = plan_key.sglang_environment()
    assert env.get("SGLANG_USE_CPU_ENGINE") == "1"
    assert "SGLANG_RUN_ID" not in env and constants.ENV_PLAN_DIR not in env


def _expert_location(physical_to_logical):
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    layers, physical = physical_to_logical.shape
    logical_to_all = torch.full((layers, physical, physical), -1, dtype=torch.int32)  # one logical per physical
    for layer in range(layers):
        for slot, expert in enumerate(physical_to_logical[layer].tolist()):
            logical_to_all[layer, expert, 0] = slot
    valid = torch.ones(layers, physical, dtype=torch.int32)
    return ExpertLocationMetadata(
        physical_to_logical, physical_to_logical.clone(), logical_to_all, logical_to_all.clone(), valid, 2, None
    )


def test_expert_location_map_is_part_of_the_key(monkeypatch):
    # EPLB may give a rank other experts with identical shapes: the map must change the key.
    from sglang.srt.eplb import expert_location

    trivial = torch.arange(4, dtype=torch.int32).repeat(2, 1)
    moved = torch.tensor([[0, 1, 2, 3], [2, 3, 0, 1]], dtype=torch.int32)
    seen = []
    for meta in (None, _expert_location(trivial), _expert_location(trivial.clone()), _expert_location(moved)):
        monkeypatch.setattr(expert_location, "get_global_expert_location_metadata", lambda meta=meta: meta)
        seen.append(plan_key.expert_location_digest())
    assert seen[0] is None and seen[1] == seen[2] and seen[1] != seen[3], seen


def test_plan_kept_in_memory_is_keyed_by_the_expert_location_map_and_plan_knobs(tiny, monkeypatch):
    # Within one server, EPLB can move experts while shapes stay: a plan kept in memory for
    # the old placement must not serve the next update (nor one with other plan knobs).
    from types import SimpleNamespace

    from sglang.srt.eplb import expert_location

    from sglang_fastload.loader.fast_model_loader import memory_plan_key

    _, headers, _ = tiny
    loader = SimpleNamespace(min_segment_bytes=DEFAULT_MIN_SEGMENT_BYTES, chunk_bytes=64 << 20)
    trivial = torch.arange(4, dtype=torch.int32).repeat(2, 1)
    moved = torch.tensor([[0, 1, 2, 3], [2, 3, 0, 1]], dtype=torch.int32)
    keys = []
    for meta in (_expert_location(trivial), _expert_location(trivial.clone()), _expert_location(moved)):
        monkeypatch.setattr(expert_location, "get_global_expert_location_metadata", lambda meta=meta: meta)
        keys.append(memory_plan_key(loader, headers, "cpu"))
    assert keys[0] == keys[1] and keys[0] != keys[2]
    other_knobs = SimpleNamespace(min_segment_bytes=1, chunk_bytes=64 << 20)
    assert memory_plan_key(other_knobs, headers, "cpu") != keys[2]


def test_a_plan_is_stored_off_the_callers_path_with_the_collector_paused(tiny, monkeypatch):
    plan, headers, params = tiny
    collecting = gc.isenabled()
    release = threading.Event()
    seen = {}
    encode = plan_store.encode_plan

    def slow_encode(*args):
        seen["collector on"] = gc.isenabled()
        assert release.wait(30)
        return encode(*args)

    monkeypatch.setattr(plan_store, "encode_plan", slow_encode)
    done = []
    plan_store.write_plan_in_background("k-bg", plan, lambda path, seconds: done.append((path, seconds)))
    assert not done and plan_store.read_plan("k-bg", headers, params) is None  # returned before writing
    release.set()
    plan_store.wait_for_writes()
    assert seen["collector on"] is False
    [(path, seconds)] = done
    assert os.path.basename(path).startswith("k-bg") and seconds >= 0
    got = plan_store.read_plan("k-bg", headers, params)
    assert got is not None and got.files[0].steps == plan.files[0].steps
    assert gc.isenabled() == collecting  # the pause ended with the write


def test_a_key_computed_by_the_writer_names_the_stored_plan(tiny):
    # A first start that found no plan of its key's prefix hands the writer what completes
    # the key; the caller returns before it runs.
    plan, headers, params = tiny
    assert not plan_store.any_stored("pfx")
    computed_on = []

    def complete_key():
        computed_on.append(threading.current_thread().name)
        return "pfx-full"

    plan_store.write_plan_in_background(complete_key, plan)
    plan_store.wait_for_writes()
    assert computed_on == ["sglang-fastload-plan-store"]
    assert plan_store.any_stored("pfx") and not plan_store.any_stored("pf") and not plan_store.any_stored("full")
    assert plan_store.read_plan("pfx-full", headers, params) is not None


def test_a_key_that_cannot_be_computed_stores_nothing_and_never_raises(tiny, caplog):
    plan, _, _ = tiny

    def failing_key():
        raise OSError("source files unreadable")

    with caplog.at_level("WARNING", logger="sglang_fastload.loader.plan_store"):
        plan_store.write_plan_in_background(failing_key, plan)
        plan_store.wait_for_writes()
    assert "its key or plan could not be made (OSError: source files unreadable)" in caplog.text
    assert not os.path.exists(plan_store.store_dir()) or not os.listdir(plan_store.store_dir())


def test_a_key_that_cannot_be_completed_leaves_the_store_unused(store_on, monkeypatch, caplog):
    # A restart (a plan of the prefix stored) completes the key on the load's path: a failure
    # there means building the plan, never a failed load.
    from sglang_fastload.loader.fast_model_loader import PreparedLoad

    def unreadable():
        raise OSError("source tree gone")

    start = plan_key.KeyStart({"package": {"version": "v"}, "sglang": {"version": "w"}}, (), "pfx")
    monkeypatch.setattr(plan_key, "package_source_digest", unreadable)
    with caplog.at_level("INFO", logger="sglang_fastload.loader.fast_model_loader"):
        assert PreparedLoad._complete_key(start) == (None, "")
    assert "load plan store not used (OSError: source tree gone)" in caplog.text


def test_source_digests_are_kept_beside_the_plans_for_the_next_process(one_rank, store):
    # The first start hashed the source files its key covers and kept the digests; the
    # second (a new process) reused them and still found its plans (test above).
    kept = source_digest_cache.load(str(store))
    assert len(kept) > 100, len(kept)  # SGLang's layer and loader modules, this package's files
    checked = 0
    for (path, size, mtime_ns, inode), value in kept.items():
        st = os.stat(path)
        if (st.st_size, st.st_mtime_ns, st.st_ino) == (size, mtime_ns, inode):
            with open(path, "rb") as f:
                assert value == hashlib.sha256(f.read()).hexdigest(), path
            checked += 1
    assert checked > 100


def _kept_only(monkeypatch, directory):
    """This process's digests as a new process starts them: only what the store kept."""
    monkeypatch.setattr(plan_key, "_FILE_DIGESTS", dict(source_digest_cache.load(directory)))


def test_a_kept_digest_is_used_only_while_its_file_is_unchanged(tmp_path, monkeypatch):
    module = tmp_path / "module.py"
    module.write_text("a = 1\n")
    st = os.stat(module)
    directory = str(tmp_path / "store")
    source_digest_cache.save(directory, {(str(module), st.st_size, st.st_mtime_ns, st.st_ino): "kept"})
    _kept_only(monkeypatch, directory)
    assert plan_key._file_digest(str(module)) == "kept"  # reused, not read

    module.write_text("a = 22\n")  # edited in place
    assert plan_key._file_digest(str(module)) == hashlib.sha256(b"a = 22\n").hexdigest()

    # Replaced by another file of the same size and modification time (a reinstall that
    # keeps times): the inode differs, so the content is read again.
    st = os.stat(module)
    source_digest_cache.save(directory, {(str(module), st.st_size, st.st_mtime_ns, st.st_ino): "kept"})
    other = tmp_path / "other.py"
    other.write_text("a = 33\n")
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, module)
    _kept_only(monkeypatch, directory)
    assert plan_key._file_digest(str(module)) == hashlib.sha256(b"a = 33\n").hexdigest()


@pytest.mark.parametrize("content", [b"", b"not json", b'{"a": 1}', b'[["p", 1, 2, 3], ["p", "1", 2, 3, "d"]]'])
def test_an_unusable_digest_file_is_ignored(tmp_path, content):
    (tmp_path / source_digest_cache.FILE_NAME).write_bytes(content)
    assert source_digest_cache.load(str(tmp_path)) == {}
