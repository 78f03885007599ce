"""A real SGLang server on CPU with `--load-format fast`: start-up, updates, the overlay's
presence in the scheduler process, and extra-config on updates for any architecture."""

import re

import pytest

from sglang_fastload import constants
from tests.rig.checkpoints import write_llama
from tests.rig.inprocess import compare_params, load_params, upstream_params
from tests.rig.server import SGLangServer
from tests.server.conftest import outputs, update

TRACE_SITE = __import__("pathlib").Path(__file__).with_name("trace_site")


def test_fast_server_updates_match_upstream_servers(dense_pair, upstream_outputs, tmp_path):
    a, b = dense_pair
    # The plan store is on (in a directory of this test): the start builds the plan and
    # stores it; a restart of the same server (at the end) reads it back.
    flags = dict(
        load_format="fast",
        extra_config={"chunk_mb": 8, "num_threads": 2},
        env={constants.ENV_PLAN_STORE: "1", constants.ENV_PLAN_DIR: str(tmp_path / "plans")},
    )
    with SGLangServer(a, **flags) as server:
        log = server.log_text()
        # The scheduler process (where weights load) runs the overlay and says so.
        assert re.search(r"sglang-fastload overlay active \(pid \d+\)", log), server.log_tail()
        assert "sglang-fastload: loaded" in log and "(built)" in log
        assert outputs(server) == upstream_outputs["A"]
        for target, label in ((b, "B"), (a, "A"), (b, "B"), (a, "A")):
            status, body = update(server, target)  # load_format from the server
            assert status == 200 and body["success"], body
            assert outputs(server) == upstream_outputs[label]
        summaries = re.findall(r"sglang-fastload: loaded .*?plan [\d.]+ s \((\w+)\)", server.log_text())
        assert summaries == ["built", "cached", "cached", "cached", "cached"], summaries
        # An update that asks for `auto` gets only the extra-config keys upstream's loader
        # accepts (num_threads), not chunk_mb, which it would reject.
        status, body = update(server, b, load_format="auto")
        assert status == 200 and body["success"], body
        assert outputs(server) == upstream_outputs["B"]
        # SGLang keeps the last request's format: the next update without one is `auto` too.
        loads = server.log_text().count("sglang-fastload: loaded")
        status, body = update(server, a)
        assert status == 200 and body["success"], body
        assert outputs(server) == upstream_outputs["A"]
        assert server.log_text().count("sglang-fastload: loaded") == loads
        status, body = update(server, b, load_format="fast")
        assert status == 200 and body["success"], body
        assert server.log_text().count("sglang-fastload: loaded") == loads + 1
        assert outputs(server) == upstream_outputs["B"]
    # A new server process with the same flags finds the stored plan (SGLang's launcher sets
    # per-start values, e.g. SGLANG_RUN_ID, that must not be in the key) and serves A exactly.
    with SGLangServer(a, **flags) as server:
        summaries = re.findall(r"sglang-fastload: loaded .*?plan [\d.]+ s \((\w+)\)", server.log_text())
        assert summaries == ["stored"], server.log_tail()
        assert outputs(server) == upstream_outputs["A"]


def _update_reads(tmp_path, a, b, overlay, extra, tag):
    """Start a server on ``a`` with ``extra`` as --model-loader-extra-config, update it to
    ``b``, and return what the update's reads looked like: (pool sizes, reader threads)."""
    trace = tmp_path / f"trace-{tag}.txt"
    env = {"SGLANG_FASTLOAD": overlay, "PYTHONPATH": str(TRACE_SITE), "SGLANG_FASTLOAD_TEST_TRACE": str(trace)}
    with SGLangServer(a, load_format="auto", extra_config=extra, env=env) as server:
        trace.write_text("")  # forget the start-up load; keep the update's reads
        status, body = update(server, b)
        assert status == 200 and body["success"], body
    lines = [line.split("\t") for line in trace.read_text().splitlines()]
    opens = [l for l in lines if l[0] == "open"]
    assert {l[2] for l in opens} == {str(p) for p in sorted(b.glob("*.safetensors"))}, opens
    return [int(l[1]) for l in lines if l[0] == "pool"], {l[1] for l in opens}


def test_update_honours_extra_config_on_other_architectures(tmp_path):
    """Upstream builds the update's LoadConfig without --model-loader-extra-config."""
    a = write_llama(tmp_path / "llama-a", seed=1, layout="sharded", num_shards=4)
    b = write_llama(tmp_path / "llama-b", seed=2, layout="sharded", num_shards=4)
    # With the overlay, the server's setting applies to the update: a pool of 3 readers...
    pools, threads = _update_reads(tmp_path, a, b, "1", {"num_threads": 3}, "n3")
    assert pools == [3] and 1 <= len(threads) <= 3, (pools, threads)
    # ...or, with multithreaded loading off, no pool and one reading thread.
    pools, threads = _update_reads(tmp_path, a, b, "1", {"enable_multithread_load": False}, "single")
    assert pools == [] and len(threads) == 1, (pools, threads)
    # Pure upstream ignores the setting on updates: its hard-coded 8 readers.
    pools, threads = _update_reads(tmp_path, a, b, "0", {"num_threads": 3}, "upstream")
    assert pools == [8], pools
    # And the update itself is exact: same parameters as an upstream load of B.
    upd = load_params(a, load_format="auto", update_path=b, extra_config={"num_threads": 3})
    ref = upstream_params(b)
    assert not compare_params(ref[0].params, upd[0].params)


def test_float16_server_on_bf16_checkpoint_matches_upstream(dense_pair, tmp_path):
    """--dtype float16 with a bf16 checkpoint (converted at start-up), then an fp32 update."""
    import torch

    from tests.rig.checkpoint_variants import derive, to_dtype

    a, b = dense_pair
    b32 = derive(b, tmp_path / "b-f32", convert=to_dtype(torch.float32))
    seen = {}
    for label, load_format, env in (("upstream", "auto", {"SGLANG_FASTLOAD": "0"}), ("fast", "fast", {})):
        with SGLangServer(a, load_format=load_format, env=env, extra_args=["--dtype", "float16"]) as server:
            got = [outputs(server)]
            status, body = update(server, b32)
            assert status == 200 and body["success"], body
            got.append(outputs(server))
            if label == "fast":
                log = server.log_text()
                assert log.count("sglang-fastload: loaded") == 2 and "no fast-load plan" not in log, server.log_tail()
        seen[label] = got
    assert seen["fast"] == seen["upstream"]
    assert seen["fast"][0] != seen["fast"][1]  # the update changed what is served
