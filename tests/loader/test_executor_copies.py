"""The copies a CUDA reader queues, checked on a really written file (CPU).

The CUDA reader's copies are planned at binding time: straight into a parameter where the
staged bytes are its elements, else into a device scratch and from there by view. Here the
device copy itself is replaced by a host ``memmove`` of the same addresses (and, for torch's
own copies, CPU tensors), so every address and length the loader computes is really used.
"""

import ctypes
import dataclasses
import itertools

import pytest
import torch

from sglang_fastload.loader import binding, executor, staging
from sglang_fastload.loader.plan import CopyStep

FLOATS = 4096


@pytest.fixture()
def data_file(tmp_path):
    data = torch.arange(3 * FLOATS, dtype=torch.float32)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data.numpy().tobytes())
    return data, str(path)


def _steps():
    nbytes = FLOATS * 4
    # A: 4096 floats straight into "d" (one read).
    straight = CopyStep("a", "d", (0, (FLOATS,), (1,)), ((0, nbytes),), (0, (FLOATS,), (1,)), 4)
    # B: the first 64x64 floats of the second block, transposed into "t".
    transposed = CopyStep("b", "t", (0, (64, 64), (1, 64)), ((nbytes, nbytes),), (0, (64, 64), (64, 1)), 4)
    # C: a row shard read run by run: rows of 32 floats every 64, into "r" from element 16.
    runs = tuple((2 * nbytes + row * 256, 128) for row in range(64))
    shard = CopyStep("c", "r", (16, (64, 32), (32, 1)), runs, (0, (64, 32), (32, 1)), 4)
    return straight, transposed, shard


def _gathered():
    # D: a row shard with short runs, gathered from the file mapping: 16 floats of every 64
    # (the second 16) of the third block, into "g" (contiguous: staged bytes go straight).
    span = (63 * 64 + 15 + 1) * 4
    return CopyStep("c", "g", (0, (64, 16), (16, 1)), ((2 * FLOATS * 4 + 16 * 4, span),), (0, (64, 16), (64, 1)), 4, gather=True)


def _expected(data):
    d = data[:FLOATS].clone()
    t = data[FLOATS:2 * FLOATS].view(64, 64).t().reshape(-1).clone()
    r = torch.full((FLOATS,), -1.0)
    r[16:16 + 64 * 32] = data[2 * FLOATS:].view(64, 64)[:, :32].reshape(-1)
    g = torch.full((FLOATS,), -1.0)
    g[:64 * 16] = data[2 * FLOATS:].view(64, 64)[:, 16:32].reshape(-1)
    return {"d": d, "t": t, "r": r, "g": g}


class HostMemmoveRuntime:
    """The CUDA runtime's copy and event calls, for parameters in host memory: a copy is a
    ``memmove`` of the same addresses, events are complete at once."""

    def __init__(self):
        self.copies = []
        self.events = itertools.count(1)

    def copy_to_device(self, dst, src, nbytes, stream):
        self.copies.append(nbytes)
        ctypes.memmove(dst, src, nbytes)

    def new_event(self, blocking=False):
        return next(self.events)

    def record(self, event, stream):
        pass

    def done(self, event):
        return True

    def wait(self, event):
        pass


class CompletedEvent:
    """torch.cuda.Event for host memory: recorded work is already done."""

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


class CompletedStream:
    """A CUDA stream for host memory: queued work is already done."""

    def synchronize(self):
        pass


def _run_from_file(bound, path, worker):
    """Run one bound chunk as a reader does, reading ``path``."""
    fd = open(path, "rb")
    try:
        mappings = executor._FileMappings({path: fd.fileno()})
        executor._run_bound(bound, path, fd.fileno(), worker, None, executor._FaultBudget(None), mappings)
    finally:
        fd.close()


@pytest.mark.parametrize("through", ["runtime", "torch"])
def test_cuda_reader_copies_land_in_parameters(data_file, monkeypatch, through):
    data, path = data_file
    straight, transposed, shard = _steps()
    gathered = _gathered()
    params = {n: torch.full((FLOATS,), -1.0) for n in "dtrg"}
    worker = staging.Worker(torch.device("cpu"), 64 << 10)
    worker.cuda = True  # bind and run the reader as on CUDA; only the device copy differs
    worker.stream = CompletedStream()
    runtime = HostMemmoveRuntime() if through == "runtime" else None
    if runtime is None:
        monkeypatch.setattr(torch.cuda, "Event", CompletedEvent)
    worker.runtime = runtime
    steps = [straight, shard, transposed, gathered]
    chunk = binding.Chunk(path, steps, sum(s.nbytes for s in steps))
    staging.reserve([worker], [binding.staged_size(chunk, True, params)])
    assert worker.scratch is not None  # the transposed step needs it
    bound = binding.bind_chunk(chunk, 0, params, worker, 0)
    # Straight and gathered steps are copied into their parameters, only the transposed one by view.
    assert len(bound.dsts) == 1 and bound.dsts[0].data_ptr() == params["t"].data_ptr()
    _run_from_file(bound, path, worker)
    for name, want in _expected(data).items():
        assert torch.equal(params[name], want), name
    if runtime is not None:  # "d", "r" and "g" straight ("d" and "r" file-contiguous in the buffer), "t" to scratch
        assert sorted(runtime.copies) == sorted([FLOATS * 4, 64 * 32 * 4, FLOATS * 4, 64 * 16 * 4])


def test_a_straight_step_never_goes_through_scratch_and_needs_none(data_file):
    _, path = data_file
    straight, _, shard = _steps()
    gathered = _gathered()
    params = {n: torch.full((FLOATS,), -1.0) for n in "dtrg"}
    chunk = binding.Chunk(path, [straight, shard, gathered], straight.nbytes + shard.nbytes + gathered.nbytes)
    host, scratch = binding.staged_size(chunk, True, params)
    assert host >= straight.nbytes + shard.nbytes + gathered.nbytes and scratch == 0
    # The zero-copy lane copies page cache into the scratch: it needs it for every step.
    assert binding.staged_size(chunk, True, params, via_scratch=True)[1] == host


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _bound_fields(bound):
    """What a bound chunk holds, with memory compared by address."""
    return (
        bound.file, bound.nbytes, bound.direct, bound.gathers, bound.buffer,
        [(_address(view), len(view), off) for view, off in bound.segments], bound.places, bound.staged_bytes,
        bound.copies, [(d.data_ptr(), d.numel(), s.data_ptr(), s.numel()) for d, s in bound.copy_views],
        bound.dsts, bound.srcs, bound.device, bound.fault_bytes,
    )


@pytest.mark.parametrize("through", ["runtime", "torch"])
def test_a_lone_straight_chunk_binds_as_the_general_loop_and_lands(data_file, monkeypatch, through):
    # Most chunks of a large dense tensor are one step read in one piece straight into its
    # parameter: they skip the general loop, which must give the same chunk.
    data, path = data_file
    # 1024 floats from float 100 of the file into "d" from element 16.
    lone = CopyStep("a", "d", (16, (1024,), (1,)), ((400, 4096),), (0, (1024,), (1,)), 4)
    params = {n: torch.full((FLOATS,), -1.0) for n in "dtrg"}
    worker = staging.Worker(torch.device("cpu"), 64 << 10)
    worker.cuda = True
    worker.stream = CompletedStream()
    runtime = HostMemmoveRuntime() if through == "runtime" else None
    if runtime is None:
        monkeypatch.setattr(torch.cuda, "Event", CompletedEvent)
    worker.runtime = runtime
    chunk = binding.Chunk(path, [lone], lone.nbytes)
    staging.reserve([worker], [binding.staged_size(chunk, True, params)])
    assert binding._bind_lone_straight(chunk, 3, params, worker, 1) is not None
    bound = binding.bind_chunk(chunk, 3, params, worker, 1)
    with monkeypatch.context() as m:
        m.setattr(binding, "_bind_lone_straight", lambda *a: None)
        general = binding.bind_chunk(chunk, 3, params, worker, 1)
    assert _bound_fields(bound) == _bound_fields(general)
    _run_from_file(bound, path, worker)
    want = torch.full((FLOATS,), -1.0)
    want[16:16 + 1024] = data[100:100 + 1024]
    assert torch.equal(params["d"], want)
    # Any other chunk of one step takes the general loop.
    straight, transposed, shard = _steps()
    params["h"] = torch.full((FLOATS,), -1.0, dtype=torch.float16)  # converted by the copy
    for step in (transposed, shard, _gathered(), dataclasses.replace(straight, param="h", src_dtype=torch.float32)):
        assert binding._bind_lone_straight(binding.Chunk(path, [step], step.nbytes), 0, params, worker, 0) is None


def _fake_cuda_readers(monkeypatch, runtime):
    """``binding.bind``'s readers as CUDA readers over host memory (copies are ``memmove``s)."""
    made = []

    def workers_for(device, count, chunk_bytes):
        while len(made) < count:
            w = staging.Worker(torch.device("cpu"), chunk_bytes)
            w.cuda = True
            w.stream = CompletedStream()
            made.append(w)
        return made[:count]

    monkeypatch.setattr(binding, "workers_for", workers_for)
    monkeypatch.setattr(binding, "wait_prepared", lambda device, chunk_bytes: None)
    monkeypatch.setattr(binding, "direct_runtime", lambda: runtime)
    if runtime is None:
        monkeypatch.setattr(torch.cuda, "Event", CompletedEvent)
    return made


@pytest.mark.parametrize("through", ["runtime", "torch"])
def test_large_straight_steps_bind_as_pieces_and_every_byte_lands(tmp_path, monkeypatch, through):
    # A first start's plan keeps its steps whole; a CUDA bind cuts a large step whose bytes
    # land straight in its parameter into pieces by arithmetic (straight_pieces.py) and
    # groups every other step as before.
    from sglang_fastload.loader.plan import FilePlan, LoadPlan
    from sglang_fastload.loader.straight_pieces import StraightPiece, file_items

    data = torch.arange(3 * FLOATS, dtype=torch.float32)
    path = str(tmp_path / "model.safetensors")
    with open(path, "wb") as f:
        f.write(data.numpy().tobytes())
    unit = 4096
    chunk_bytes = unit + 32  # pieces of the chunk size rounded down to the staging alignment
    big = CopyStep("a", "d", (16, (3000,), (1,)), ((400, 12000),), (0, (3000,), (1,)), 4)
    small = CopyStep("b", "s", (0, (64,), (1,)), ((12400, 256),), (0, (64,), (1,)), 4)
    transposed = CopyStep("c", "t", (0, (32, 32), (1, 32)), ((16384, 4096),), (0, (32, 32), (32, 1)), 4)
    # Larger than a chunk but converted by its copy (float32 into a float16 parameter): grouped.
    converted = CopyStep("e", "h", (0, (2000,), (1,)), ((20480, 8000),), (0, (2000,), (1,)), 4, torch.float32)
    steps = [big, small, transposed, converted]
    shapes = {"d": ((FLOATS,), torch.float32), "s": ((64,), torch.float32), "t": ((1024,), torch.float32),
              "h": ((2000,), torch.float16)}
    plan = LoadPlan([FilePlan(path, steps)], [], shapes, frozenset("abce"), 4)
    params = {n: torch.full(shape, -1.0, dtype=dtype) for n, (shape, dtype) in shapes.items()}

    [(_, items)] = file_items(plan, chunk_bytes, params)
    pieces = [i for i in items if isinstance(i, StraightPiece)]
    assert [(p.offset, p.nbytes, p.at) for p in pieces] == [
        (400, 4096, 64), (4496, 4096, 64 + 4096), (8592, 3808, 64 + 8192)]
    assert all(not isinstance(i, StraightPiece) for i in items[len(pieces):])

    runtime = HostMemmoveRuntime() if through == "runtime" else None
    readers = _fake_cuda_readers(monkeypatch, runtime)
    bound = binding.bind(plan, params, torch.device("cuda", 0), 2, chunk_bytes, {})
    for reader, chunks in zip(readers, bound.per_worker):
        for chunk in chunks:
            _run_from_file(chunk, path, reader)
    want = {n: torch.full(shape, -1.0, dtype=dtype) for n, (shape, dtype) in shapes.items()}
    want["d"][16:3016] = data[100:3100]
    want["s"][:] = data[3100:3164]
    want["t"].as_strided((32, 32), (1, 32)).copy_(data[4096:5120].view(32, 32))
    want["h"][:] = data[5120:7120].to(torch.float16)
    for name in shapes:
        assert torch.equal(params[name], want[name]), name
    # A piece taken by another reader lands there too.
    params["d"].fill_(-1.0)
    owner = next(k for k, dealt in enumerate(bound.dealt) if any(isinstance(c, StraightPiece) for c in dealt))
    index = next(i for i, c in enumerate(bound.dealt[owner]) if isinstance(c, StraightPiece))
    piece = bound.dealt[owner][index]
    thief = 1 - owner
    _run_from_file(bound.bind_taken(owner, index, thief, 1, params), path, readers[thief])
    first = (piece.offset - 400) // 4
    assert torch.equal(params["d"][16 + first:16 + first + piece.nbytes // 4], data[100 + first:100 + first + piece.nbytes // 4])
    # A plan cut when it was built (or where it was stored) keeps its grouping: no pieces.
    cut = dataclasses.replace(plan, files=[FilePlan(path, steps)])
    cut.files[0].chunks(chunk_bytes)
    assert not any(isinstance(i, StraightPiece) for _, its in file_items(cut, chunk_bytes, params) for i in its)
