"""A failed weight update never leaves a half-written model: every bad checkpoint is rejected
before any write, faults after writing roll back to the previous checkpoint, concurrent
updates serialize, and a long run of updates under load stays correct and flat in memory.
Every checkpoint upstream loads correctly is accepted, with the same weights."""

import os
import re
import shutil
import threading
import time

import pytest

from tests.rig.server import SGLangServer
from tests.server.checkpoint_damage import DAMAGES, UPSTREAM_LOADS, copy_checkpoint, shards
from tests.server.conftest import PROMPTS, outputs, update, wait_idle

SOAK_UPDATES = int(os.environ.get("SGLANG_FASTLOAD_SOAK_UPDATES", "100"))


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fault") / "arm"


@pytest.fixture(scope="module")
def fast_server(dense_pair, fault_file, upstream_outputs):
    a, _ = dense_pair
    with SGLangServer(a, load_format="fast", env={"SGLANG_FASTLOAD_FAULT_FILE": str(fault_file)}) as server:
        assert outputs(server) == upstream_outputs["A"]
        yield server


@pytest.fixture
def serving_a(fast_server, dense_pair, upstream_outputs):
    """Each test starts with A being served (and checks that nothing else is)."""
    status, body = update(fast_server, dense_pair[0])
    assert status == 200 and body["success"], body
    assert outputs(fast_server) == upstream_outputs["A"]
    return fast_server


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_bad_checkpoint_is_rejected_and_old_weights_keep_serving(serving_a, dense_pair, upstream_outputs, tmp_path, damage):
    bad = copy_checkpoint(dense_pair[1], tmp_path / "bad")
    file_name, tensor = DAMAGES[damage](bad)
    status, body = update(serving_a, bad)
    assert status == 400 and not body["success"], body
    message = body["message"]
    if file_name:
        assert file_name in message, message
    if tensor:
        assert tensor in message, message
    assert "Rolled back" not in message  # rejected before any parameter was written
    assert outputs(serving_a) == upstream_outputs["A"]


@pytest.mark.parametrize("change", sorted(UPSTREAM_LOADS))
def test_checkpoint_upstream_loads_is_accepted(serving_a, dense_pair, upstream_outputs, tmp_path, change):
    """Never refuse what upstream loads correctly: dtype conversion, unused tensors, a
    weights-only directory, a shard linked to another directory."""
    changed = copy_checkpoint(dense_pair[1], tmp_path / "b")
    UPSTREAM_LOADS[change](changed)
    loaded_before = serving_a.log_text().count("sglang-fastload: loaded")
    status, body = update(serving_a, changed)
    assert status == 200 and body["success"], body
    log = serving_a.log_text()
    assert log.count("sglang-fastload: loaded") == loaded_before + 1, log[-3000:]  # by the fast path
    notes = {  # what upstream passes over without a word is noted
        "header_spellings_safetensors_reads": "'writer_offset', 'crc32'] besides 'dtype', 'shape' and 'data_offsets'",
        "index_naming_files_upstream_skips": "also names 'extras/v_head.safetensors', 'value_head.bin'",
        "index_left_dangling": "model.safetensors.index.json is not a regular file",
    }
    if change in notes:
        assert notes[change] in log, log[-3000:]
    assert outputs(serving_a) == upstream_outputs["B"]


def test_path_that_is_not_a_directory(serving_a, dense_pair, upstream_outputs):
    shard = shards(dense_pair[1])[0]
    status, body = update(serving_a, shard)
    assert status == 400 and str(shard) in body["message"], body
    assert outputs(serving_a) == upstream_outputs["A"]


def test_fault_after_copying_began_restores_previous_weights(serving_a, dense_pair, upstream_outputs, fault_file):
    fault_file.write_text("4096")  # fail after 4 KiB of the new checkpoint were written
    status, body = update(serving_a, dense_pair[1])
    assert status == 400, body
    assert "injected I/O fault" in body["message"] and "Rolled back to the previous weights" in body["message"]
    assert not fault_file.exists()  # the fault really fired
    assert outputs(serving_a) == upstream_outputs["A"]
    log = serving_a.log_text()
    assert "restoring" in log and "previous weights restored from" in log
    # The server still takes a good update afterwards.
    status, body = update(serving_a, dense_pair[1])
    assert status == 200 and body["success"], body
    assert outputs(serving_a) == upstream_outputs["B"]


def test_concurrent_updates_serialize(serving_a, dense_pair, upstream_outputs):
    a, b = dense_pair
    wait_idle(serving_a)
    log_start = len(serving_a.log_text())
    results = []
    threads = [threading.Thread(target=lambda p=p: results.append(serving_a.update_weights_from_disk(p))) for p in (b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    # Each either fully applied or fully failed (a flush refused by a running request is
    # the only failure allowed, and it is reported as such).
    for status, body in results:
        assert status == 200 or "cache was not flushed" in body["message"], body
    applied = [status for status, _ in results].count(200)
    assert applied >= 1, results
    serving_a.post("/flush_cache")
    wait_idle(serving_a)
    log = serving_a.log_text()[log_start:]
    # One after another: every applied update ends before the next one begins.
    marks = re.findall(r"Update engine weights online from disk begin|Update weights end\.", log)
    assert marks == ["Update engine weights online from disk begin", "Update weights end."] * applied, marks
    loaded = re.findall(r"sglang-fastload: loaded (\S+?)(?: \[tp rank \d+/\d+\])?: ", log)
    assert len(loaded) == applied, loaded
    # The weights served are those of the update applied last.
    assert outputs(serving_a) == upstream_outputs["A" if os.path.samefile(loaded[-1], a) else "B"]


def test_auto_format_failure_mid_load_rolls_back_to_previous_checkpoint(dense_pair, upstream_outputs, tmp_path):
    """Upstream's iterator writes shard by shard; a bad last shard fails after writing."""
    a, b = dense_pair
    bad = copy_checkpoint(b, tmp_path / "bad-last-shard")
    last = shards(bad)[-1]
    data = bytearray(last.read_bytes())
    data[8] = ord("x")  # header no longer JSON: found only when this shard is reached
    last.write_bytes(bytes(data))
    with SGLangServer(a, load_format="auto", extra_config={"enable_multithread_load": False}) as server:
        status, body = update(server, bad)
        assert status == 400 and "Rolled back to the previous weights" in body["message"], body
        assert outputs(server) == upstream_outputs["A"]


def test_rollback_impossible_stops_the_server_loudly(dense_pair, tmp_path):
    a = copy_checkpoint(dense_pair[0], tmp_path / "a-copy")
    fault = tmp_path / "arm"
    server = SGLangServer(a, load_format="fast", env={"SGLANG_FASTLOAD_FAULT_FILE": str(fault)})
    with server:
        shutil.rmtree(a)  # the previous checkpoint disappears (e.g. cleaned up by the trainer)
        fault.write_text("4096 persist")  # and the new one never reads consistently
        try:
            update(server, dense_pair[1])
        except Exception:
            pass  # the connection may drop as the server goes down
        deadline = time.monotonic() + 60
        while server.running and time.monotonic() < deadline:
            time.sleep(0.5)
        log = server.log_text()
        assert "refuses to serve" in log, server.log_tail()
        assert not server.running  # it did not keep serving mixed weights


def test_soak_updates_under_load(serving_a, dense_pair, upstream_outputs):
    a, b = dense_pair
    stop = threading.Event()
    failures, served = [], [0]

    def client():
        i = 0
        while not stop.is_set():
            try:
                serving_a.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=4)
                served[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                failures.append(repr(exc))
            i += 1

    worker = threading.Thread(target=client, daemon=True)
    worker.start()
    rss_warm = None
    last = None
    try:
        for i in range(SOAK_UPDATES):
            target = b if i % 2 == 0 else a
            status, body = serving_a.update_weights_from_disk(target, flush_cache=False)
            assert status == 200 and body["success"], (i, body)
            last = target
            if i == min(20, SOAK_UPDATES - 1):
                rss_warm = sum(serving_a.rss_bytes().values())
    finally:
        stop.set()
        worker.join(timeout=120)
    assert not failures, failures[:5]
    assert served[0] > 0
    rss_end = sum(serving_a.rss_bytes().values())
    assert rss_end <= rss_warm * 1.05, (rss_warm, rss_end)
    wait_idle(serving_a)
    assert outputs(serving_a) == upstream_outputs["B" if last == b else "A"]
