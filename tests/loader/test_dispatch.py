"""Which extra-config keys an update's loader gets, and when `auto` means `fast`."""

import pytest

from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang_fastload.loader import dispatch

SERVER_EXTRA = {"num_threads": 4, "chunk_mb": 8}


@pytest.mark.parametrize(
    "server_format,update_format,expected",
    [
        ("fast", "fast", SERVER_EXTRA),  # the loader that accepted them at start-up
        ("fast", "auto", {"num_threads": 4}),  # upstream's default loader rejects chunk_mb
        ("auto", "auto", SERVER_EXTRA),
        ("instanttensor", "instanttensor", SERVER_EXTRA),  # its own options pass through
        ("fast", "instanttensor", {}),  # unknown acceptance: nothing is guessed
        ("auto", "fastsafetensors", {"num_threads": 4}),
        ("INSTANTTENSOR", "instanttensor", SERVER_EXTRA),  # server args keep the text as typed
    ],
)
def test_update_gets_the_keys_its_loader_accepts(server_format, update_format, expected, monkeypatch):
    monkeypatch.delenv("SGLANG_FASTLOAD_AUTO_MEANS_FAST", raising=False)
    config = LoadConfig(load_format=update_format)
    dispatch.fill_update_extra_config(config, dict(SERVER_EXTRA), server_format)
    assert config.model_loader_extra_config == expected


def test_a_request_with_its_own_extra_config_keeps_it():
    config = LoadConfig(load_format="auto", model_loader_extra_config={"num_threads": 1})
    dispatch.fill_update_extra_config(config, dict(SERVER_EXTRA), LoadFormat.FAST)
    assert config.model_loader_extra_config == {"num_threads": 1}


def test_auto_means_fast_only_when_switched_on(monkeypatch):
    monkeypatch.delenv("SGLANG_FASTLOAD_AUTO_MEANS_FAST", raising=False)
    assert not dispatch.serves_fast(LoadFormat.AUTO) and dispatch.serves_fast(LoadFormat.FAST)
    assert dispatch.fast_loader_for(LoadConfig(load_format="auto")) is None
    monkeypatch.setenv("SGLANG_FASTLOAD_AUTO_MEANS_FAST", "1")
    assert dispatch.serves_fast(LoadFormat.AUTO)
    assert type(dispatch.fast_loader_for(LoadConfig(load_format="auto"))).__name__ == "FastModelLoader"
    # With the auto switch, an auto update on a fast server gets every fast key.
    config = LoadConfig(load_format="auto")
    dispatch.fill_update_extra_config(config, dict(SERVER_EXTRA), LoadFormat.FAST)
    assert config.model_loader_extra_config == SERVER_EXTRA
