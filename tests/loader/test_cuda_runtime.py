"""Which CUDA runtime library the readers call directly, and when they keep torch's calls."""

import pytest

from sglang_fastload import constants
from sglang_fastload.loader import binding, cuda_runtime


@pytest.fixture()
def fresh_lookup(monkeypatch):
    monkeypatch.setattr(cuda_runtime, "_RUNTIME", None)
    monkeypatch.setattr(cuda_runtime, "_LOOKED", False)


def test_no_runtime_loaded_yet_means_torch_calls_and_a_later_look(fresh_lookup, monkeypatch):
    monkeypatch.setattr(cuda_runtime, "_loaded_runtime_paths", lambda: [])
    assert cuda_runtime.runtime() is None
    assert cuda_runtime._LOOKED is False  # CUDA may not be initialised yet: ask again later


def test_two_runtimes_loaded_means_torch_calls(fresh_lookup, monkeypatch):
    paths = ["/a/libcudart.so.12", "/b/libcudart.so.13"]
    monkeypatch.setattr(cuda_runtime, "_loaded_runtime_paths", lambda: paths)
    assert cuda_runtime.runtime() is None  # whose handles torch's streams are is unclear
    assert cuda_runtime._LOOKED is True


def test_a_library_that_cannot_be_bound_means_torch_calls(fresh_lookup, monkeypatch, tmp_path):
    bogus = tmp_path / "libcudart.so.13"
    bogus.write_bytes(b"not a shared library")
    monkeypatch.setattr(cuda_runtime, "_loaded_runtime_paths", lambda: [str(bogus)])
    assert cuda_runtime.runtime() is None


def test_the_switch_keeps_torch_calls_even_with_a_runtime(monkeypatch):
    found = object()
    monkeypatch.setattr(cuda_runtime, "runtime", lambda: found)
    monkeypatch.delenv(constants.ENV_DIRECT_CUDA_CALLS, raising=False)
    assert binding.direct_runtime() is found
    monkeypatch.setenv(constants.ENV_DIRECT_CUDA_CALLS, "0")
    assert binding.direct_runtime() is None
