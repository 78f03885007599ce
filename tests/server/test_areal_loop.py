"""AReaL's disk update loop against a real CPU server that was started with `--load-format auto`
and `SGLANG_FASTLOAD_AUTO_MEANS_FAST=1` (AReaL hard-codes `auto`).

Each step, as AReaL's remote SGLang engine does it: pause generation, save the new checkpoint
into the *same* directory, update with `abort_all_requests`, delete the directory, continue.
Rollout clients keep generating (with log-probabilities) all the while and resume aborted
replies from the tokens they got. Then the faults a reused or deleted directory brings: the
server must keep serving one consistent set of weights and say which.
"""

import shutil
import threading
import time

import pytest

from tests.rig.server import SGLangServer
from tests.server.checkpoint_damage import copy_checkpoint
from tests.server.conftest import PROMPTS, outputs, update, wait_idle

ROLLOUT_CLIENTS = 3
ROLLOUT_DEADLINE_S = 240  # every client loop is bounded in time as well as in steps


@pytest.fixture(scope="module")
def fault_arm(tmp_path_factory):
    return tmp_path_factory.mktemp("areal-fault") / "arm"


@pytest.fixture(scope="module")
def areal_server(dense_pair, fault_arm, tmp_path_factory):
    first = copy_checkpoint(dense_pair[0], tmp_path_factory.mktemp("areal-start") / "a")
    env = {"SGLANG_FASTLOAD_AUTO_MEANS_FAST": "1", "SGLANG_FASTLOAD_FAULT_FILE": str(fault_arm)}
    with SGLangServer(first, load_format="auto", env=env) as server:
        yield server


class Rollouts:
    """Clients that generate until stopped, resuming replies that an update aborted."""

    def __init__(self, server):
        self.server = server
        self.stop = threading.Event()
        self.failures = []
        self.finished = 0
        self.resumed = 0
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(ROLLOUT_CLIENTS)]

    def _client(self, index):
        deadline = time.monotonic() + ROLLOUT_DEADLINE_S
        prompt = list(PROMPTS[index % len(PROMPTS)])
        while not self.stop.is_set() and time.monotonic() < deadline:
            tokens, wanted = [], 12
            while len(tokens) < wanted and not self.stop.is_set():
                payload = {
                    "input_ids": prompt + tokens,
                    "sampling_params": {"max_new_tokens": wanted - len(tokens), "temperature": 1.0, "ignore_eos": True},
                    "return_logprob": True,
                }
                try:
                    status, body = self.server.post("/generate", payload)
                except Exception as exc:  # noqa: BLE001 - a dropped connection is a failed rollout
                    self.failures.append(repr(exc))
                    return
                if status != 200 or not isinstance(body, dict):
                    self.failures.append(f"HTTP {status}: {body!r}")
                    return
                tokens += body["output_ids"]
                reason = (body.get("meta_info") or {}).get("finish_reason") or {}
                if reason.get("type") == "abort":
                    self.resumed += 1
            self.finished += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a rollout client hung"


def areal_step(server, save_dir, checkpoint):
    """One AReaL weight update: pause, save into the reused directory, update, delete, continue."""
    status, body = server.post("/pause_generation", {})
    assert status == 200, body
    try:
        shutil.copytree(checkpoint, save_dir)
        for attempt in range(3):  # AReaL retries a failed update up to 3 times
            status, body = server.update_weights_from_disk(save_dir, abort_all_requests=True)
            if status == 200 and body.get("success"):
                break
        return status, body
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
        server.post("/continue_generation", {})


def test_areal_loop_reusing_one_directory(areal_server, dense_pair, upstream_outputs, tmp_path):
    a, b = dense_pair
    save_dir = tmp_path / "weight_update"
    loaded_before = areal_server.log_text().count("sglang-fastload: loaded")
    with Rollouts(areal_server) as rollouts:
        for step, checkpoint in enumerate((b, a, b, a, b, a, b, a)):
            status, body = areal_step(areal_server, save_dir, checkpoint)
            assert status == 200 and body["success"], (step, body)
            time.sleep(0.2)  # let the rollouts make progress between steps
    assert not rollouts.failures, rollouts.failures[:3]
    assert rollouts.finished > 0
    log = areal_server.log_text()
    # `auto` was served by the fast path, once per update, never by upstream's loop.
    assert log.count("sglang-fastload: loaded") - loaded_before == 8, log[-3000:]
    assert "format auto served as fast (SGLANG_FASTLOAD_AUTO_MEANS_FAST=1)" in log
    wait_idle(areal_server)
    assert outputs(areal_server) == upstream_outputs["A"]


def _serve(server, checkpoint, tmp_path, name):
    """Make ``server`` serve a private copy of ``checkpoint`` (a directory the test may delete)."""
    path = copy_checkpoint(checkpoint, tmp_path / name)
    status, body = update(server, path)
    assert status == 200 and body["success"], body
    return path


def test_shard_changed_during_the_read_of_a_reused_directory(areal_server, dense_pair, upstream_outputs, tmp_path, fault_arm):
    a, b = dense_pair
    served = _serve(areal_server, a, tmp_path, "weight_update")
    # The trainer saves the next step into the served directory, and a shard changes while the
    # server reads it: the old weights are gone from disk, so the server reads the directory again.
    shutil.rmtree(served)
    shutil.copytree(b, served)
    fault_arm.write_text("4096 touch")
    status, body = update(areal_server, served, abort_all_requests=True)
    assert not fault_arm.exists()  # the fault fired
    assert status == 200 and body["success"], body
    message = body["message"]
    assert "changed while it was being loaded" in message and "read again" in message, message
    assert f"the model now holds the checkpoint that {served} holds now" in message, message
    assert "Rolled back" not in message
    assert outputs(areal_server) == upstream_outputs["B"]


def test_served_directory_deleted_before_a_failing_update(areal_server, dense_pair, upstream_outputs, tmp_path, fault_arm):
    a, b = dense_pair
    served = _serve(areal_server, a, tmp_path, "step-1")
    shutil.rmtree(served)  # the trainer cleaned up the previous step
    fault_arm.write_text("4096")  # a transient read fault, which a second read passes
    status, body = update(areal_server, copy_checkpoint(b, tmp_path / "step-2"))
    assert not fault_arm.exists()
    assert status == 200 and body["success"], body
    assert "injected I/O fault" in body["message"] and f"{served} no longer exists" in body["message"], body
    assert outputs(areal_server) == upstream_outputs["B"]


def test_transient_fault_with_previous_checkpoint_on_disk_rolls_back(areal_server, dense_pair, upstream_outputs, tmp_path, fault_arm):
    a, b = dense_pair
    _serve(areal_server, a, tmp_path, "step-1")
    fault_arm.write_text("4096")
    status, body = update(areal_server, copy_checkpoint(b, tmp_path / "step-2"))
    assert status == 400 and "Rolled back to the previous weights" in body["message"], body
    assert outputs(areal_server) == upstream_outputs["A"]  # a failed update leaves the old weights


def test_host_snapshot_restores_when_no_checkpoint_can_be_read(dense_pair, upstream_outputs, tmp_path):
    """With the opt-in snapshot, even a reused directory that never reads consistently rolls back."""
    a, b = dense_pair
    served = copy_checkpoint(a, tmp_path / "weight_update")
    arm = tmp_path / "arm"
    env = {"SGLANG_FASTLOAD_UPDATE_SNAPSHOT": "1", "SGLANG_FASTLOAD_FAULT_FILE": str(arm)}
    with SGLangServer(served, load_format="fast", env=env) as server:
        status, body = update(server, b)  # a healthy update takes the snapshot too
        assert status == 200 and body["success"], body
        assert outputs(server) == upstream_outputs["B"]
        status, body = update(server, served)
        assert status == 200 and body["success"], body
        shutil.rmtree(served)
        shutil.copytree(b, served)
        arm.write_text("4096 persist")  # every read of the directory fails
        status, body = update(server, served)
        arm.unlink()
        assert status == 400 and "Rolled back to the previous weights (host snapshot" in body["message"], body
        assert outputs(server) == upstream_outputs["A"]
        assert "host snapshot of" in server.log_text()
