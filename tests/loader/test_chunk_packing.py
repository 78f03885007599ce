"""How the executor groups a plan's steps into chunks: every chunk but a file's last is full
(steps are cut between rows where they can be), and the cut steps read the same file bytes
into the same parameter elements as the uncut ones."""

import random

from sglang_fastload.loader.binding import chunks_of
from sglang_fastload.loader.plan import CopyStep, FilePlan, LoadPlan, aligned_nbytes, contiguous_runs, contiguous_strides, sized_chunks


def _dense_step(name, offset, rows, cols, itemsize=2, dst_offset=0, row_stride=None):
    sizes = (rows, cols)
    dst = (dst_offset, sizes, (row_stride or cols, 1))
    return CopyStep(name, name, dst, ((offset, rows * cols * itemsize),), (0, sizes, contiguous_strides(sizes)), itemsize)


def _row_shard_step(name, offset, rows, cols, keep, itemsize=2):
    # A row-parallel shard read run by run: one read per row of ``keep`` columns.
    sizes = (rows, keep)
    reads = tuple((offset + r * cols * itemsize, keep * itemsize) for r in range(rows))
    return CopyStep(name, name, (0, sizes, (keep, 1)), reads, (0, sizes, contiguous_strides(sizes)), itemsize)


def _gather_step(name, offset, rows, cols, keep, itemsize=2):
    sizes = (rows, keep)
    return CopyStep(name, name, (0, sizes, (keep, 1)), ((offset, rows * cols * itemsize),), (0, sizes, (cols, 1)), itemsize, gather=True)


def _byte_map(steps):
    """``{(param, element): file byte offset of its first byte}`` for non-gathered steps."""
    out = {}
    for st in steps:
        assert not st.gather
        stream = [off + i for off, n in st.reads for i in range(0, n, st.itemsize)]
        _, starts = contiguous_runs(st.dst)
        run = len(stream) // len(starts)
        elements = [s + i for s in starts for i in range(run)]
        assert len(elements) == len(stream)
        out.update({(st.param, e): b for e, b in zip(elements, stream)})
    return out


def _plan(steps):
    return LoadPlan([FilePlan("f", steps)], [], {}, frozenset(), len(steps))


def test_expert_sized_tensors_fill_every_chunk():
    # 3 "MiB" experts (3 rows of 1 "MiB"), chunks of 4: without cuts each expert takes a chunk.
    unit = 1 << 10
    steps = [_dense_step(f"e{i}", i * 3 * unit, 3, unit // 2) for i in range(8)]
    chunks = chunks_of(_plan(steps), 4 * unit)
    assert [c.nbytes for c in chunks] == [4 * unit] * 6
    cut = [st for c in chunks for st in c.steps]
    assert _byte_map(cut) == _byte_map(steps)
    assert sum(st.nbytes for st in cut) == sum(st.nbytes for st in steps)


def _random_layout(rng, max_steps, dense_only=False):
    """Steps over consecutive tensors of a file: dense, row shards read run by run, gathers."""
    steps, offset = [], 0
    for i in range(rng.randrange(1, max_steps)):
        rows, cols = rng.randrange(1, 9), rng.randrange(1, 40)
        kind = 0.0 if dense_only else rng.random()
        if kind < 0.5:
            dst_offset = 0 if dense_only else rng.randrange(0, 5)
            # Some destinations' rows are apart (a slice of a wider parameter).
            row_stride = cols if dense_only else cols + rng.choice((0, 0, 3))
            step = _dense_step(f"t{i}", offset, rows, cols, dst_offset=dst_offset, row_stride=row_stride)
        elif kind < 0.8:
            step = _row_shard_step(f"t{i}", offset, rows, cols, rng.randrange(1, cols + 1))
        else:
            step = _gather_step(f"t{i}", offset, rows, cols, rng.randrange(1, cols + 1))
        steps.append(step)
        offset += rows * cols * 2
    return steps


def test_cuts_keep_every_byte_in_place_for_random_layouts():
    rng = random.Random(3)
    for _ in range(200):
        steps = _random_layout(rng, 12)
        chunk_bytes = rng.randrange(64, 600)
        chunks = chunks_of(_plan(steps), chunk_bytes)
        cut = [st for c in chunks for st in c.steps]
        plain = [st for st in steps if not st.gather]
        assert _byte_map([st for st in cut if not st.gather]) == _byte_map(plain)
        assert [st for st in cut if st.gather] == [st for st in steps if st.gather]  # never cut
        for c in chunks:
            assert c.nbytes == sum(aligned_nbytes(st) for st in c.steps)
            assert c.nbytes <= chunk_bytes or len(c.steps) == 1
        for st in cut:  # pieces carry the derived values a fresh step computes
            fresh = CopyStep(st.tensor, st.param, st.dst, st.reads, st.view, st.itemsize, st.src_dtype, st.gather)
            assert (st.nbytes, st.view_is_dense, st.dst_is_contiguous) == (
                fresh.nbytes, fresh.view_is_dense, fresh.dst_is_contiguous)


def test_a_step_of_several_chunks_is_cut_where_chunks_end():
    # 11 rows of 1 "KiB" after a 2 "KiB" step, chunks of 4: the head fills the first chunk,
    # two whole chunks follow, the last row starts the next one.
    unit = 1 << 10
    head = _dense_step("a", 0, 4, unit // 4)
    big = _dense_step("b", 2 * unit, 11, unit // 2)
    chunks = chunks_of(_plan([head, big]), 4 * unit)
    assert [c.nbytes for c in chunks] == [4 * unit, 4 * unit, 4 * unit, unit]
    assert [[st.view[1][0] for st in c.steps] for c in chunks] == [[4, 2], [4], [4], [1]]
    cut = [st for c in chunks for st in c.steps]
    assert _byte_map(cut) == _byte_map([head, big])


def test_a_step_is_never_cut_where_its_destination_has_another_shape():
    # Same elements, other shape (e.g. a flat parameter fed from a 2-D tensor): kept whole.
    sizes = (4, 8)
    step = CopyStep("t", "p", (0, (32,), (1,)), ((0, 64),), (0, sizes, contiguous_strides(sizes)), 2)
    first = _dense_step("a", 1000, 1, 40)
    chunks = chunks_of(_plan([first, step]), 100)
    assert [c.steps for c in chunks] == [[first], [step]]


def test_steps_cut_once_are_grouped_again_without_cuts():
    # build_plan stores the cut steps (and the plan store keeps them): a load of such a plan
    # groups them into the same chunks and makes no new step.
    rng = random.Random(5)
    for _ in range(100):
        steps = _random_layout(rng, 10, dense_only=True)
        chunk_bytes = rng.randrange(64, 600)
        first = [chunk for chunk, _ in sized_chunks(steps, chunk_bytes)]
        again = [chunk for chunk, _ in sized_chunks([st for chunk in first for st in chunk], chunk_bytes)]
        assert [[id(st) for st in c] for c in again] == [[id(st) for st in c] for c in first]


def test_a_built_plan_brings_its_chunks_and_a_rebound_copy_shares_them(monkeypatch):
    # build_plan cuts and groups each file's steps once; binding the plan (and its copy for
    # other files of the same layout) uses those chunks instead of grouping again.
    import dataclasses

    from sglang_fastload.loader import plan as plan_module
    from sglang_fastload.loader.replay import RecordedCopy

    unit = 1 << 10
    copies = [RecordedCopy(f"e{i}", f"p{i}", (0, (3, unit // 2), (unit // 2, 1)), (0, (3, unit // 2), (unit // 2, 1)))
              for i in range(8)]
    locations = {f"e{i}": ("f", i * 3 * unit, 2, None) for i in range(8)}
    meta = {f"p{i}": ((3, unit // 2), None) for i in range(8)}
    built = plan_module.build_plan(copies, [], locations, meta, frozenset(locations), 8, max_step_bytes=4 * unit)
    expected = plan_module.sized_chunks(built.files[0].steps, 4 * unit)  # what grouping again finds

    def no_grouping(*_):
        raise AssertionError("the steps were grouped again")

    monkeypatch.setattr(plan_module, "sized_chunks", no_grouping)
    rebound = dataclasses.replace(built, files=[dataclasses.replace(f, path="g") for f in built.files])
    chunks = chunks_of(rebound, 4 * unit)
    assert [c.path for c in chunks] == ["g"] * 6 and [c.nbytes for c in chunks] == [4 * unit] * 6
    assert [[id(st) for st in c.steps] for c in chunks] == [[id(st) for st in s] for s, _ in expected]
    assert [c.nbytes for c in chunks] == [n for _, n in expected]


def test_a_plan_without_chunks_groups_its_steps_once_per_chunk_size():
    unit = 1 << 10
    steps = [_dense_step(f"e{i}", i * 3 * unit, 3, unit // 2) for i in range(8)]
    plan = _plan(steps)  # as a stored plan is read back: no chunks kept
    first = chunks_of(plan, 4 * unit)
    again = chunks_of(plan, 4 * unit)
    assert all(a.steps is b.steps for a, b in zip(first, again)) and len(first) == 6
    assert [c.nbytes for c in chunks_of(plan, 8 * unit)] == [8 * unit] * 3  # another size: its own


def test_a_plan_built_whole_and_cut_later_is_the_plan_built_cut():
    # A streamed start builds its plan without cutting (its copies out of the scratch take
    # whole steps) and cuts it where it is stored: the same steps and chunks as cut at once.
    from sglang_fastload.loader import plan as plan_module
    from sglang_fastload.loader.replay import RecordedCopy

    rng = random.Random(7)
    for _ in range(50):
        copies, locations, meta, offset = [], {}, {}, 0
        for i in range(rng.randrange(1, 10)):
            rows, cols = rng.randrange(1, 9), rng.randrange(1, 40)
            whole = (0, (rows, cols), (cols, 1))
            copies.append(RecordedCopy(f"t{i}", f"p{i}", whole, whole))
            locations[f"t{i}"] = ("f", offset, 2, None)
            meta[f"p{i}"] = ((rows, cols), None)
            offset += rows * cols * 2
        unit = rng.randrange(64, 600)
        args = (copies, [], locations, meta, frozenset(locations), len(copies))
        at_once = plan_module.build_plan(*args, max_step_bytes=unit)
        whole = plan_module.build_plan(*args, max_step_bytes=unit, cut=False)
        assert [len(fp.steps) for fp in whole.files] == [len(copies)]  # one step per tensor
        later = plan_module.cut_into_chunks(whole, unit)
        assert [fp.steps for fp in later.files] == [fp.steps for fp in at_once.files]
        assert [[(len(c), n) for c, n in fp.chunked[unit]] for fp in later.files] == [
            [(len(c), n) for c, n in fp.chunked[unit]] for fp in at_once.files]
        assert plan_module.cut_into_chunks(later, unit).files[0].steps == later.files[0].steps  # cut once
