"""Shared fixtures of the test suite (CPU rig: see tests/rig/ and /work/shared/notes/cpu-rig.md).

Checkpoints (session-scoped, written once under pytest's temp dir; A and B differ only in
their random weights, so B is the update target of A):

    qwen3_a / qwen3_b               Qwen3, untied lm_head, one model.safetensors
    qwen3_tied_a / qwen3_tied_b     Qwen3, tied embeddings
    qwen3_moe_a / qwen3_moe_b       Qwen3-MoE, 8 experts, top-2
    llama_a, qwen2_a                other architectures
    checkpoint_factory(kind, seed=..., layout=..., **sizes) -> Path (cached per arguments)

Also ``venv_python`` (the interpreter running pytest, i.e. the test venv's),
``start_server(model_path, **SGLangServer kwargs) -> started SGLangServer`` (stopped at the
end of the test, pass or fail), and the ``slow`` and ``server`` markers.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from sglang_fastload import constants as _constants  # noqa: E402
from tests.rig import checkpoints as _ckpts  # noqa: E402

SEED_A = 1
SEED_B = 2

# The load-plan store is off for the suite (the environment reaches every rank and server
# it starts): a plan stored by one test must not turn another's "built" into "stored".
# Tests of the store switch it on, each with a directory of its own.
os.environ[_constants.ENV_PLAN_STORE] = "0"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (real SGLang processes)")
    config.addinivalue_line("markers", "server: starts a real sglang.launch_server on CPU")


def pytest_sessionstart(session):
    # Ranks and servers import the installed package: an install older than the checkout
    # would pass or fail for code that is no longer there (tests/rig/installed_package.py).
    from tests.rig.installed_package import installed_differences

    stale = installed_differences()
    if stale:
        pytest.exit(
            "the installed sglang_fastload is not this checkout's; reinstall it (bash ci/setup_env.sh):\n  "
            + "\n  ".join(stale[:20]),
            returncode=4,
        )


def pytest_sessionfinish(session, exitstatus):
    # Never leave a server behind, whatever happened to the tests that started it.
    try:
        from tests.rig import server as _server
    except Exception:
        return
    _server.stop_all_servers()


_WRITERS = {
    "qwen3": lambda d, seed, **kw: _ckpts.write_qwen3(d, seed=seed, tied=kw.pop("tied", False), **kw),
    "qwen3_tied": lambda d, seed, **kw: _ckpts.write_qwen3(d, seed=seed, tied=True, **kw),
    "qwen3_moe": lambda d, seed, **kw: _ckpts.write_qwen3_moe(d, seed=seed, **kw),
    "llama": lambda d, seed, **kw: _ckpts.write_llama(d, seed=seed, **kw),
    "qwen2": lambda d, seed, **kw: _ckpts.write_qwen2(d, seed=seed, **kw),
}


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``make(kind, seed=1, layout="single", **sizes) -> Path``; identical calls share a directory.

    ``kind``: "qwen3", "qwen3_tied", "qwen3_moe", "llama", "qwen2". Treat the returned
    directory as read-only (copy it before corrupting anything).
    """
    root = tmp_path_factory.mktemp("checkpoints")
    cache = {}
    lock = threading.Lock()

    def make(kind: str, seed: int = SEED_A, layout: str = "single", **kwargs):
        key = (kind, seed, layout, json.dumps(kwargs, sort_keys=True, default=str))
        with lock:
            if key not in cache:
                name = f"{kind}-s{seed}-{layout}-{len(cache)}"
                cache[key] = _WRITERS[kind](root / name, seed, layout=layout, **kwargs)
            return cache[key]

    return make


@pytest.fixture(scope="session")
def qwen3_a(checkpoint_factory):
    return checkpoint_factory("qwen3", seed=SEED_A)


@pytest.fixture(scope="session")
def qwen3_b(checkpoint_factory):
    return checkpoint_factory("qwen3", seed=SEED_B)


@pytest.fixture(scope="session")
def qwen3_tied_a(checkpoint_factory):
    return checkpoint_factory("qwen3_tied", seed=SEED_A)


@pytest.fixture(scope="session")
def qwen3_tied_b(checkpoint_factory):
    return checkpoint_factory("qwen3_tied", seed=SEED_B)


@pytest.fixture(scope="session")
def qwen3_moe_a(checkpoint_factory):
    return checkpoint_factory("qwen3_moe", seed=SEED_A)


@pytest.fixture(scope="session")
def qwen3_moe_b(checkpoint_factory):
    return checkpoint_factory("qwen3_moe", seed=SEED_B)


@pytest.fixture(scope="session")
def llama_a(checkpoint_factory):
    return checkpoint_factory("llama", seed=SEED_A)


@pytest.fixture(scope="session")
def qwen2_a(checkpoint_factory):
    return checkpoint_factory("qwen2", seed=SEED_A)


@pytest.fixture(scope="session")
def venv_python():
    """The interpreter running the tests (the test venv's python, with sglang installed)."""
    return sys.executable


@pytest.fixture
def start_server():
    """``start(model_path, **kwargs) -> SGLangServer`` (started); all are stopped at teardown."""
    from tests.rig.server import SGLangServer

    started = []

    def start(model_path, **kwargs):
        srv = SGLangServer(model_path, **kwargs)
        started.append(srv)
        return srv.start()

    yield start
    for srv in reversed(started):
        srv.stop()
