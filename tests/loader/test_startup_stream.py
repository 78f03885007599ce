"""A first start's checkpoint streamed into a scratch while its plan is built, then copied out.

On really written safetensors files (a misaligned tensor, a dtype conversion, a strided
destination, a row shard gathered or read run by run, a zero-fill, neighbouring copies into
one parameter), the plan run out of the stream's scratch must write exactly what the
executor writes from the files, and both exactly what the tensors themselves say. Start-up
loads through real SGLang with the stream on are compared with upstream's own load in
``test_fast_matches_upstream.py`` and ``test_fast_compat.py``.
"""

import ctypes
import os
import types

import pytest
import torch

from sglang_fastload import constants
from sglang_fastload.checkpoint.safetensors_header import read_header
from sglang_fastload.errors import CheckpointError
from sglang_fastload.loader import startup_stream
from sglang_fastload.loader.executor import execute_plan
from sglang_fastload.loader.plan import DEFAULT_MIN_SEGMENT_BYTES, build_plan
from sglang_fastload.loader.replay import RecordedCopy, RecordedZero
from sglang_fastload.loader.scratch_copies import copy_plan_from_scratch
from tests.rig.checkpoints import write_safetensors_ordered

SENTINEL = -7.0
_uniform = startup_stream.StreamReaders.uniform  # the same readers and reads throughout

PARAMS = {  # name: (shape, dtype)
    "p": ((8, 6), torch.float32),   # bf16 "a", converted
    "q": ((5, 8), torch.float32),   # fp32 "b" (misaligned in its file) into the first 4 columns
    "r": ((4, 4), torch.bfloat16),  # columns 4..8 of "c": a row shard of 8-byte runs
    "s": ((80,), torch.bfloat16),   # zeros, then "d1" and "d2" side by side, then untouched
}

COPIES = [
    RecordedCopy("a", "p", (0, (8, 6), (6, 1)), (0, (8, 6), (6, 1))),
    RecordedCopy("b", "q", (0, (5, 4), (4, 1)), (0, (5, 4), (8, 1))),
    RecordedCopy("c", "r", (4, (4, 4), (16, 1)), (0, (4, 4), (4, 1))),
    RecordedCopy("d1", "s", (0, (32,), (1,)), (8, (32,), (1,))),
    RecordedCopy("d2", "s", (0, (32,), (1,)), (40, (32,), (1,))),
]
ZEROS = [RecordedZero("s", (0, (8,), (1,)))]


@pytest.fixture()
def checkpoint(tmp_path):
    """Two files; in the first, an odd-length bf16 tensor leaves the fp32 "b" misaligned."""
    g = torch.Generator().manual_seed(3)
    t = {
        "a": torch.randn(8, 6, generator=g).to(torch.bfloat16),
        "odd": torch.randn(3, generator=g).to(torch.bfloat16),
        "b": torch.randn(5, 4, generator=g),
        "c": torch.randn(4, 16, generator=g).to(torch.bfloat16),
        "d1": torch.randn(32, generator=g).to(torch.bfloat16),
        "d2": torch.randn(32, generator=g).to(torch.bfloat16),
    }
    one, two = str(tmp_path / "model-1.safetensors"), str(tmp_path / "model-2.safetensors")
    write_safetensors_ordered(one, {k: t[k] for k in ("a", "odd", "b")}, ["a", "odd", "b"])
    write_safetensors_ordered(two, {k: t[k] for k in ("c", "d1", "d2")}, ["c", "d1", "d2"])
    headers = {path: read_header(path) for path in (one, two)}
    assert headers[one].tensors["b"].start % 4 == 2  # the case the scratch must handle
    return t, headers


def _plan(headers, chunk_bytes, min_segment_bytes):
    locations = {}
    for path, h in headers.items():
        for name, e in h.tensors.items():
            dtype = {"BF16": torch.bfloat16, "F32": torch.float32}[e.dtype]
            locations[name] = (path, e.start, dtype.itemsize, dtype)
    return build_plan(COPIES, ZEROS, locations, dict(PARAMS), frozenset(c.tensor for c in COPIES), 6,
                      max_step_bytes=chunk_bytes, min_segment_bytes=min_segment_bytes)


def _params(device="cpu"):
    return {name: torch.full(shape, SENTINEL, dtype=dtype, device=device) for name, (shape, dtype) in PARAMS.items()}


def _expected(t):
    e = _params()
    e["p"].copy_(t["a"])
    e["q"][:, :4] = t["b"]
    e["r"].copy_(t["c"][:, 4:8])
    e["s"][:8] = 0
    e["s"][8:40] = t["d1"]
    e["s"][40:72] = t["d2"]
    return e


def _assert_bits(got, want, names=tuple(PARAMS)):
    for name in names:
        a, b = got[name].cpu(), want[name]
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (name, a, b)


def _scratch_of(headers):
    """The files' tensor bytes laid out as ``scratch_layout`` says, read without the stream."""
    regions, total = startup_stream.scratch_layout(headers)
    scratch = torch.zeros(total, dtype=torch.uint8)
    for r in regions:
        with open(r.path, "rb") as f:
            f.seek(r.data_start)
            scratch[r.at:r.at + r.nbytes] = torch.frombuffer(bytearray(f.read(r.nbytes)), dtype=torch.uint8)
    return scratch, {r.path: r.origin for r in regions}


SHAPES = [  # (chunk bytes, min segment bytes): whole steps or cut ones; gathered or run by run
    (1 << 20, DEFAULT_MIN_SEGMENT_BYTES),
    (64, DEFAULT_MIN_SEGMENT_BYTES),
    (1 << 20, 0),
    (48, 0),
]


@pytest.mark.parametrize("chunk_bytes,min_segment_bytes", SHAPES)
def test_the_plan_out_of_the_stream_writes_what_the_files_say(checkpoint, chunk_bytes, min_segment_bytes):
    t, headers = checkpoint
    plan = _plan(headers, chunk_bytes, min_segment_bytes)
    want = _expected(t)
    from_files = _params()
    execute_plan(plan, from_files, device=torch.device("cpu"), num_threads=2, chunk_bytes=chunk_bytes)
    _assert_bits(from_files, want)

    regions, total = startup_stream.scratch_layout(headers)
    stream = startup_stream.StartupStream.start(regions, total, torch.device("cpu"), _uniform(3, chunk_bytes))
    streamed = _params()
    stats = stream.finish(plan, streamed)
    assert stats is not None
    _assert_bits(streamed, want)
    # Every tensor byte of both files was read once, the unused tensor's included.
    assert stats.bytes_read == sum(h.file_size - h.data_start for h in headers.values())
    assert stats.scratch_seconds > 0
    assert stream.scratch is None and not stream.fds  # freed and closed


class HostMemmoveRuntime:
    """The runtime's device-to-device copy for tensors in host memory: a ``memmove`` of the
    same addresses (so every address and length computed for it is really used)."""

    def __init__(self):
        self.copies = []

    def copy_within_device(self, dst, src, nbytes, stream):
        self.copies.append(nbytes)
        ctypes.memmove(dst, src, nbytes)


def test_plain_copies_go_through_the_runtime_merged_where_both_sides_continue(checkpoint):
    t, headers = checkpoint
    plan = _plan(headers, 1 << 20, DEFAULT_MIN_SEGMENT_BYTES)
    scratch, origins = _scratch_of(headers)
    runtime = HostMemmoveRuntime()
    got = _params()
    copy_plan_from_scratch(plan, got, scratch, origins, runtime)
    _assert_bits(got, _expected(t))
    # "d1" and "d2" lie side by side in the file and in "s": one copy of both (128 bytes).
    assert 128 in runtime.copies and 64 not in runtime.copies, runtime.copies


def test_copies_never_run_from_one_parameter_into_the_next(checkpoint):
    """Two parameters whose memory meets: "d1" fills the end of one and "d2" the start of the
    other, side by side in the file too; on a device they are separate allocations, which
    one copy may not span."""
    t, headers = checkpoint
    copies = [RecordedCopy("d1", "left", (0, (32,), (1,)), (8, (32,), (1,))),
              RecordedCopy("d2", "right", (0, (32,), (1,)), (0, (32,), (1,)))]
    locations = {name: (path, e.start, 2, torch.bfloat16) for path, h in headers.items()
                 for name, e in h.tensors.items() if name in ("d1", "d2")}
    meta = {"left": ((40,), torch.bfloat16), "right": ((32,), torch.bfloat16)}
    plan = build_plan(copies, [], locations, meta, frozenset({"d1", "d2"}), 6, max_step_bytes=1 << 20)
    memory = torch.full((72,), SENTINEL, dtype=torch.bfloat16)
    params = {"left": memory[:40], "right": memory[40:]}
    scratch, origins = _scratch_of(headers)
    runtime = HostMemmoveRuntime()
    copy_plan_from_scratch(plan, params, scratch, origins, runtime)
    assert runtime.copies == [64, 64]
    assert torch.equal(memory[8:40].view(torch.int16), t["d1"].view(torch.int16))
    assert torch.equal(memory[40:].view(torch.int16), t["d2"].view(torch.int16))


def test_a_file_cut_short_stops_the_stream_before_its_parameters_are_written(checkpoint):
    t, headers = checkpoint
    plan = _plan(headers, 64, DEFAULT_MIN_SEGMENT_BYTES)
    short = sorted(headers)[1]
    regions, total = startup_stream.scratch_layout(headers)
    os.truncate(short, headers[short].file_size - 16)
    stream = startup_stream.StartupStream.start(regions, total, torch.device("cpu"), _uniform(2, 64))
    got = _params()
    assert stream.finish(plan, got) is None
    assert stream.scratch is None and not stream.fds
    # Nothing of the short file reached a parameter; the other file's parameters (a first
    # start: nothing is served yet) hold either nothing or exactly what the file says.
    want, untouched = _expected(t), _params()
    _assert_bits(got, untouched, names=("r",))
    for name in ("p", "q"):
        assert any(torch.equal(got[name].view(torch.uint8), other[name].view(torch.uint8)) for other in (want, untouched))
    # Read from the files instead, the load names the file.
    with pytest.raises(CheckpointError, match=os.path.basename(short)):
        execute_plan(plan, _params(), device=torch.device("cpu"), num_threads=2, chunk_bytes=64)


def test_a_file_is_copied_out_as_soon_as_it_has_landed(checkpoint, monkeypatch):
    """The first file's parameters are written while the second file is still being read."""
    import threading

    t, headers = checkpoint
    plan = _plan(headers, 1 << 20, DEFAULT_MIN_SEGMENT_BYTES)
    second = sorted(headers)[1]
    held, release = threading.Event(), threading.Event()
    read_exact = startup_stream.read_exact

    def holding_the_second_file(fd, view, offset, path):
        if path == second:
            held.set()
            assert release.wait(30)
        return read_exact(fd, view, offset, path)

    monkeypatch.setattr(startup_stream, "read_exact", holding_the_second_file)
    regions, total = startup_stream.scratch_layout(headers)
    stream = startup_stream.StartupStream.start(regions, total, torch.device("cpu"), _uniform(2, 1 << 20))
    got, want = _params(), _expected(t)
    finished = []
    finisher = threading.Thread(target=lambda: finished.append(stream.finish(plan, got)))
    finisher.start()
    try:
        assert held.wait(30)
        for _ in range(3000):  # the first file's copies, queued by ``finish`` (up to 30 s)
            if torch.equal(got["q"].view(torch.uint8), want["q"].view(torch.uint8)):
                break
            threading.Event().wait(0.01)
        _assert_bits(got, want, names=("p", "q"))
        _assert_bits(got, _params(), names=("r",))  # the second file's: not yet
    finally:
        release.set()
        finisher.join(60)
    assert finished and finished[0] is not None
    _assert_bits(got, want)


def test_an_abandoned_stream_stops_its_readers_and_frees_everything(checkpoint):
    _, headers = checkpoint
    regions, total = startup_stream.scratch_layout(headers)
    stream = startup_stream.StartupStream.start(regions, total, torch.device("cpu"), _uniform(2, 16))
    begun = stream.begun
    begun.exception()  # the readers it started are known once it returns
    futures = list(stream.futures)
    assert futures
    stream.abandon()
    assert begun.done() and all(f.done() for f in futures)
    assert stream.scratch is None and not stream.fds
    stream.abandon()  # again: nothing left to do


def test_readers_beyond_those_of_the_plan_join_when_it_is_built(checkpoint):
    t, headers = checkpoint
    plan = _plan(headers, 64, DEFAULT_MIN_SEGMENT_BYTES)
    regions, total = startup_stream.scratch_layout(headers)
    # One reader of up to 4 slices (16 bytes each) while the plan is built, three after.
    readers = startup_stream.StreamReaders(during=1, after=3, read_bytes_during=64, read_bytes_after=16)
    stream = startup_stream.StartupStream.start(regions, total, torch.device("cpu"), readers)
    stream.begun.exception()
    assert len(stream.futures) == 1 and stream.slices_per_read == 4
    streamed = _params()
    stats = stream.finish(plan, streamed)
    assert stats is not None
    assert len(stream.futures) == 0 and stream.slices_per_read == 1  # all joined, then done
    _assert_bits(streamed, _expected(t))
    assert stats.bytes_read == sum(h.file_size - h.data_start for h in headers.values())


def test_a_read_takes_neighbouring_slices_of_one_file_only(checkpoint):
    _, headers = checkpoint
    regions, total = startup_stream.scratch_layout(headers)
    readers = startup_stream.StreamReaders(during=1, after=1, read_bytes_during=1 << 20, read_bytes_after=16)
    stream = startup_stream.StartupStream(regions, total, torch.device("cpu"), readers)
    first, second = regions
    assert stream._take() == (first.path, first.data_start, first.nbytes, first.at)  # the whole file
    stream.slices_per_read = 1
    assert stream._take() == (second.path, second.data_start, 16, second.at)
    stream.slices_per_read = 3
    assert stream._take(room=40) == (second.path, second.data_start + 16, 32, second.at + 16)  # two fit


MIB = 1 << 20


@pytest.mark.parametrize("counts,read_mb,cpus,wanted", [
    ("", "", 16, (8, 12, 64 * MIB)),   # half the CPUs while the plan is built, the loader's threads after
    ("", "", 1, (1, 12, 64 * MIB)),
    ("4", "", 16, (4, 4, 64 * MIB)),   # one count: during and after
    ("4/16", "8", 16, (4, 16, 8 * MIB)),
    ("20/6", "", 16, (20, 20, 64 * MIB)),  # never fewer after than during
    ("many", "big", 16, (8, 12, 64 * MIB)),  # not a count, not a size: ignored
    ("", "1", 16, (8, 12, 6 * MIB)),   # never smaller than the loader's chunk
])
def test_how_the_stream_reads(monkeypatch, counts, read_mb, cpus, wanted):
    monkeypatch.setenv(constants.ENV_STARTUP_STREAM_READERS, counts)
    monkeypatch.setenv(constants.ENV_STARTUP_STREAM_READ_MB, read_mb)
    monkeypatch.setattr(startup_stream.os, "cpu_count", lambda: cpus)
    r = startup_stream.stream_readers(12, 6 * MIB)
    assert (r.during, r.after, r.read_bytes_during, r.read_bytes_after) == (*wanted[:3], 6 * MIB)
    assert r.own_buffers is (r.read_bytes_during != 6 * MIB)


def test_released_readers_are_made_anew():
    from sglang_fastload.loader import staging

    device = torch.device("cpu")
    first = staging.workers_for(device, 2, 12345)
    staging.reserve(first, [(12345, 0)] * 2)
    assert staging.workers_for(device, 2, 12345) == first  # kept between loads
    staging.release_workers(device, 12345)
    again = staging.workers_for(device, 2, 12345)
    assert all(a is not b for a, b in zip(again, first))
    staging.release_workers(device, 12345)


def test_released_readers_are_freed_off_the_callers_thread():
    """Unpinning their buffers takes ~25 ms per GiB: not on a start's path."""
    import threading
    import weakref

    from sglang_fastload.loader import staging

    device = torch.device("cpu")
    workers = staging.workers_for(device, 2, 4321)
    staging.reserve(workers, [(4321, 0)] * 2)
    freed, done = [], threading.Event()

    def record():
        freed.append(threading.current_thread().name)
        if len(freed) == 2:
            done.set()

    for w in workers:
        weakref.finalize(w, record)
    del workers, w
    staging.release_workers(device, 4321)
    assert done.wait(30)
    assert freed == ["fastload-free"] * 2


def test_the_scratch_holds_each_file_aligned_in_name_order(checkpoint):
    _, headers = checkpoint
    regions, total = startup_stream.scratch_layout(headers)
    assert [r.path for r in regions] == sorted(headers)
    for r in regions:
        h = headers[r.path]
        assert r.at % startup_stream.SCRATCH_ALIGN == 0
        assert (r.data_start, r.nbytes) == (h.data_start, h.file_size - h.data_start)
    assert regions[1].at >= regions[0].at + regions[0].nbytes
    assert total >= regions[-1].at + regions[-1].nbytes


@pytest.mark.parametrize("setting,device,startup,single,wanted", [
    ("auto", "cuda", True, True, True),
    ("auto", "cpu", True, True, False),      # host parameters: a second host copy gains nothing
    ("on", "cpu", True, True, True),
    ("auto", "cuda", False, True, False),    # an update: the KV cache holds the device memory
    ("auto", "cuda", True, False, False),    # tensor or expert parallelism: a rank keeps a part
    ("off", "cuda", True, True, False),
])
def test_which_loads_stream(setting, device, startup, single, wanted):
    assert startup_stream.streams_here(setting, torch.device(device), startup, single) is wanted


def test_maybe_start_follows_the_setting(checkpoint):
    _, headers = checkpoint
    loader = types.SimpleNamespace(startup_stream="auto", stream_readers=startup_stream.stream_readers(2, 64))
    assert startup_stream.maybe_start(loader, headers, True, True, torch.device("cpu")) is None
    loader.startup_stream = "on"
    stream = startup_stream.maybe_start(loader, headers, True, True, torch.device("cpu"))
    assert isinstance(stream, startup_stream.StartupStream)
    stream.abandon()


def test_auto_streams_only_checkpoints_of_many_tensors(checkpoint, monkeypatch):
    _, headers = checkpoint  # 6 tensors
    loader = types.SimpleNamespace(startup_stream="auto", stream_readers=startup_stream.stream_readers(2, 64))
    monkeypatch.setattr(startup_stream, "streams_here", lambda *a: True)  # as on one CUDA rank
    assert startup_stream.maybe_start(loader, headers, True, True, torch.device("cpu")) is None
    monkeypatch.setattr(constants, "STARTUP_STREAM_MIN_TENSORS", 6)
    stream = startup_stream.maybe_start(loader, headers, True, True, torch.device("cpu"))
    assert isinstance(stream, startup_stream.StartupStream)
    stream.abandon()
    assert startup_stream.worth_streaming("on", 0) and not startup_stream.worth_streaming("auto", 5)


def test_the_tensor_count_before_the_model_is_built_comes_from_the_index(checkpoint, tmp_path):
    import json

    _, headers = checkpoint
    weight_map = {name: os.path.basename(path) for path, h in headers.items() for name in h.tensors}
    assert startup_stream.indexed_tensor_count(str(tmp_path)) == 0  # no index: unknown yet
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert startup_stream.indexed_tensor_count(str(tmp_path)) == len(weight_map) == 6
    assert startup_stream.indexed_tensor_count("Qwen/Qwen3-8B") == 0  # a hub id


def test_the_setting_is_checked_when_the_loader_is_made():
    from sglang.srt.configs.load_config import LoadConfig

    from sglang_fastload.loader.fast_model_loader import FastModelLoader

    def loader(value):
        return FastModelLoader(LoadConfig(load_format="fast", model_loader_extra_config={constants.STARTUP_STREAM_KEY: value}))

    assert loader("OFF").startup_stream == "off"
    made = loader("auto")
    assert made.stream_readers == startup_stream.stream_readers(made.num_threads, made.chunk_bytes)
    assert FastModelLoader(LoadConfig(load_format="fast")).startup_stream == "auto"
    with pytest.raises(ValueError, match=constants.STARTUP_STREAM_KEY):
        loader("sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_device_the_stream_writes_what_the_executor_writes(checkpoint):
    t, headers = checkpoint
    device = torch.device("cuda", torch.cuda.current_device())
    for chunk_bytes, min_segment_bytes in SHAPES:
        plan = _plan(headers, chunk_bytes, min_segment_bytes)
        from_files = _params(device)
        execute_plan(plan, from_files, device=device, num_threads=2, chunk_bytes=chunk_bytes)
        regions, total = startup_stream.scratch_layout(headers)
        streamed = _params(device)
        stats = startup_stream.StartupStream.start(regions, total, device, _uniform(3, chunk_bytes)).finish(plan, streamed)
        assert stats is not None
        _assert_bits(from_files, _expected(t))
        _assert_bits(streamed, _expected(t))
    # The stream's own readers (a piece size of their own), fewer while the plan is built:
    # the same bits, and their pinned buffers go with the stream.
    from sglang_fastload.loader import staging

    plan = _plan(headers, 64, DEFAULT_MIN_SEGMENT_BYTES)
    streamed = _params(device)
    readers = startup_stream.StreamReaders(during=1, after=3, read_bytes_during=4096, read_bytes_after=64)
    stream = startup_stream.StartupStream.start(regions, total, device, readers)
    assert stream.finish(plan, streamed) is not None
    _assert_bits(streamed, _expected(t))
    assert (str(device), 4096) not in staging._WORKER_POOL


def test_an_update_never_streams_even_the_first_fast_load_of_a_model_started_by_another_loader(tmp_path):
    # A start-up from PyTorch .bin files goes through upstream's path; the first update from
    # safetensors is then the model's first fast load, with the stream asked for. It is an
    # update (no room reserved for a scratch, upstream's restore pass before it), so it reads
    # the files after the plan, as every update does.
    from tests.rig.checkpoint_variants import write_bin_copy
    from tests.rig.checkpoints import write_qwen3
    from tests.rig.inprocess import compare_params, load_params, upstream_params

    a = write_bin_copy(write_qwen3(tmp_path / "a", tied=False, seed=7, layout="single"), tmp_path / "a-bin")
    b = write_qwen3(tmp_path / "b", tied=False, seed=8, layout="sharded")
    res = load_params(a, load_format="fast", update_path=b, extra_config={"startup_stream": "on"})
    log = res[0].log
    assert res[0].error is None and "has no fast-load plan" in log and "sglang-fastload: loaded" in log, log[-3000:]
    assert "of it while the plan was built" not in log, log[-3000:]
    assert not compare_params(upstream_params(b)[0].params, res[0].params)
