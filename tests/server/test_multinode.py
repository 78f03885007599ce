"""SGLang's own multi-node mode with `--load-format fast`: two nodes (two
``sglang.launch_server`` processes on loopback) serve one model at TP=2, one rank each.

One node pair serves every test of this module (start-up costs most of the time):
each node loads with `fast` and reads only the bytes its rank keeps; the parameters of
both ranks, read back through SGLang's own ``/weights_checker`` checksums, equal
upstream `auto`'s TP=2 parameters of the same checkpoint, at start-up, after an update
posted to node 0, and after a refused update.
"""

import os
import re

import pytest

from tests.rig.checkpoints import load_tensors
from tests.rig.inprocess import CaseSpec, load_cases, server_port
from tests.rig.server import SGLangServer
from tests.server.checkpoint_damage import copy_checkpoint, truncate
from tests.server.conftest import PROMPTS, update

pytestmark = [pytest.mark.slow, pytest.mark.server]

NODES = 2  # one tensor-parallel rank per node: rank r lives on node r
SUMMARY = re.compile(
    r"sglang-fastload: loaded (\S+?) \[tp rank (\d+)/(\d+)\]: .*?read (\d+) of \d+ bytes .*? with (\d+) threads; "
    r"plan [\d.]+ s \((cached|built)\).*?; format (\w+)"
)


def node_command_args(node_rank: int, rendezvous: str) -> list:
    """What turns one server into node ``node_rank`` of the pair (SGLang's multi-node flags)."""
    return ["--nnodes", str(NODES), "--node-rank", str(node_rank), "--dist-init-addr", rendezvous]


def summaries(node):
    """(tp rank, bytes read, plan) of each `fast` load in this node's log, in order."""
    from sglang_fastload.loader.fast_model_loader import DEFAULT_NUM_THREADS

    found = SUMMARY.findall(node.log_text())
    assert all(int(m[2]) == NODES and m[6] == "fast" for m in found), found
    # A node's CPUs serve its own ranks only: one rank per node reads with the one-rank default.
    assert all(int(m[4]) == DEFAULT_NUM_THREADS for m in found), found
    return [(int(m[1]), int(m[3]), m[5]) for m in found]


def checksums(node0):
    """``/weights_checker`` checksums of every rank, by tensor-parallel rank.

    The scheduler gathers each rank's ``ChecksumInfo`` over the TP group, so node 0's
    answer covers node 1's rank too (node 1 serves only ``/health``).
    """
    status, body = node0.post("/weights_checker", {"action": "checksum"})
    assert status == 200 and body["success"], body
    by_rank = {}
    for info in body["ranks"]:
        (placement,) = info["parallelism_info"]  # one entry per role: the target model only
        assert placement["role"] == "target" and placement["tp_size"] == NODES, placement
        by_rank[placement["tp_rank"]] = info
    assert sorted(by_rank) == list(range(NODES)), body["ranks"]
    return by_rank


def weight_checker_checksums(params):
    """The checksum SGLang's ``WeightChecker`` reports for a rank holding ``params``.

    Computed with weight_checker's own helpers on upstream's parameters (the models here
    are not quantized, so every tensor is hashed raw, as the server does).
    """
    from sglang.srt.utils.weight_checker import _build_check_entries, _hash_tensor, _is_skip_weight_check, overall_checksum

    skip = {name for name, tensor in params.items() if _is_skip_weight_check(name, tensor)}
    sums = {
        name: _hash_tensor(comparable.dequantize().data)
        for name, compare, comparable in _build_check_entries(params, skip, {})
        if compare
    }
    return {"checksums": sums, "per_gpu_checksum": overall_checksum(sums)}


def assert_serving(node0, expected, label):
    """Every rank's checksums, as node 0 reports them, equal upstream's for ``label``."""
    got = checksums(node0)
    for rank in range(NODES):
        want = expected[rank]
        have = got[rank]
        names = set(want["checksums"]) | set(have["checksums"])
        differ = sorted(n for n in names if want["checksums"].get(n) != have["checksums"].get(n))
        assert not differ, f"rank {rank} does not hold upstream's parameters of {label}: {differ[:8]}"
        assert have["per_gpu_checksum"] == want["per_gpu_checksum"], (rank, label)


def nbytes(tensor):
    return tensor.numel() * tensor.element_size()


def kept_bytes(params):
    """Checkpoint bytes a rank keeps: its parameters (no padding, untied, no quantization)."""
    return sum(nbytes(t) for t in params.values())


def whole_and_replicated_bytes(ckpt, params):
    """Tensor bytes of the checkpoint, and of the tensors a rank keeps whole (same name
    and shape among its parameters: the norms)."""
    tensors = load_tensors(ckpt)
    replicated = sum(nbytes(t) for n, t in tensors.items() if n in params and params[n].shape == t.shape)
    return sum(nbytes(t) for t in tensors.values()), replicated


@pytest.fixture(scope="module")
def spawned_nodes(dense_pair):
    """Nodes 0 and 1 of one `fast` server on A, spawned (not yet healthy); each node has
    its own HTTP port (node 1 answers only /health there) and binds its rank to its own CPU."""
    a, _ = dense_pair
    # Bound only once node 0's scheduler starts, while a gloo group loads upstream's
    # reference: a port below the ephemeral range cannot be taken in between.
    rendezvous = f"127.0.0.1:{server_port()}"
    cores = os.cpu_count() or 1
    nodes = [
        SGLangServer(
            a,
            load_format="fast",
            tp_size=NODES,
            extra_args=node_command_args(rank, rendezvous),
            env={"SGLANG_CPU_OMP_THREADS_BIND": str(rank % cores)},
        )
        for rank in range(NODES)
    ]
    try:
        for node in nodes:
            node.start(wait=False)  # node 0 is healthy only once node 1's rank joined
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def upstream_tp2(dense_pair, spawned_nodes):
    """Upstream `auto` (overlay off) at TP=2, fresh loads of A and of B: each rank's
    parameters and the weight-checker checksums of them (computed while the nodes start)."""
    a, b = dense_pair
    results = load_cases([CaseSpec(a), CaseSpec(b)], tp_size=NODES, env={"SGLANG_FASTLOAD": "0"})
    out = {}
    for label, ckpt, res in zip("AB", (a, b), results):
        assert not isinstance(res, str), res
        assert "sglang-fastload" not in "".join(res.logs)
        out[label] = {
            "checksums": [weight_checker_checksums(r.params) for r in res],
            "kept": [kept_bytes(r.params) for r in res],
            "whole_replicated": whole_and_replicated_bytes(ckpt, res[0].params),
        }
        assert all(c["checksums"] for c in out[label]["checksums"]), out[label]
    assert out["A"]["checksums"][0]["per_gpu_checksum"] != out["B"]["checksums"][0]["per_gpu_checksum"]
    return out


@pytest.fixture(scope="module")
def node_pair(spawned_nodes, upstream_tp2):
    """The two nodes, both healthy."""
    for node in spawned_nodes:
        node.wait_healthy()
    return spawned_nodes


def test_each_node_loads_its_ranks_share_bit_exact(node_pair, upstream_tp2, dense_pair):
    node0, node1 = node_pair
    for rank, node in enumerate(node_pair):
        loads = summaries(node)
        # The node's log holds its own rank's load, with `fast`, and no other rank's.
        assert [(r, plan) for r, _, plan in loads] == [(rank, "built")], node.log_tail()
        assert "no fast-load plan" not in node.log_text()
        # It read exactly the bytes its rank keeps: its halves of the split tensors and
        # the whole replicated norms; together the two nodes read the checkpoint about once.
        assert loads[0][1] == upstream_tp2["A"]["kept"][rank], (rank, loads, upstream_tp2["A"]["kept"])
    whole, replicated = upstream_tp2["A"]["whole_replicated"]
    assert sum(upstream_tp2["A"]["kept"]) == whole + replicated and replicated < 0.01 * whole
    # Only node 0 serves the API; node 1's port answers /health alone.
    assert node1.post("/update_weights_from_disk", {"model_path": str(dense_pair[1])})[0] == 404
    assert_serving(node0, upstream_tp2["A"]["checksums"], "A")
    # The pair serves requests (what it serves is proven by the checksums above).
    assert len(node0.generate(PROMPTS[0], max_new_tokens=4)) == 4


def test_update_posted_to_node_0_reloads_both_nodes(node_pair, upstream_tp2, dense_pair):
    node0, node1 = node_pair
    _, b = dense_pair
    before = [len(summaries(node)) for node in node_pair]
    status, body = update(node0, b)
    assert status == 200 and body["success"], body
    assert_serving(node0, upstream_tp2["B"]["checksums"], "B")
    for rank, node in enumerate(node_pair):
        loads = summaries(node)[before[rank] :]
        assert [(r, plan) for r, _, plan in loads] == [(rank, "cached")], node.log_tail()
        assert loads[0][1] == upstream_tp2["B"]["kept"][rank], (rank, loads)
    assert len(node0.generate(PROMPTS[1], max_new_tokens=4)) == 4


def test_refused_update_names_the_file_and_keeps_both_nodes_weights(node_pair, upstream_tp2, dense_pair, tmp_path):
    node0, node1 = node_pair
    _, b = dense_pair
    served = checksums(node0)
    bad = copy_checkpoint(b, tmp_path / "b-truncated")
    file_name, _ = truncate(bad)
    node1_log = len(node1.log_text())
    status, body = update(node0, bad)
    assert status == 400 and not body["success"], body
    # Refused before any write (nothing to roll back), naming the file...
    assert file_name in body["message"] and "Rolled back" not in body["message"], body
    # ...by node 1's rank too, which checked the checkpoint itself.
    assert node1.wait_for_log(str(bad / file_name), start=node1_log), node1.log_tail()
    assert checksums(node0) == served
