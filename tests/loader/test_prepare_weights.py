"""`fast` finds checkpoint files as upstream's `auto` format does, through an override in
FastModelLoader (the forked loader.py leaves `_prepare_weights` untouched): safetensors when a
directory has them, `.bin` files otherwise (those then load through upstream's path)."""

import pytest
import torch
from safetensors.torch import save_file

from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang.srt.model_loader import loader as upstream_loader
from sglang.srt.model_loader.loader import DefaultModelLoader
from sglang_fastload.loader.fast_model_loader import FastModelLoader


@pytest.fixture(autouse=True)
def no_server(monkeypatch):
    # Outside a server there are no global server args (only used for checksum checks).
    monkeypatch.setattr(upstream_loader, "get_server_args", lambda: None)


def test_fast_prepares_the_files_upstream_auto_would(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    torch.save({"w": torch.zeros(2)}, str(tmp_path / "pytorch_model.bin"))
    fast = FastModelLoader(LoadConfig(load_format="fast"))
    upstream = DefaultModelLoader(LoadConfig(load_format="auto"))
    got = fast._prepare_weights(str(tmp_path), None, False)
    assert got == upstream._prepare_weights(str(tmp_path), None, False)
    assert got[1] == [str(tmp_path / "model.safetensors")] and got[2] is True
    assert fast.load_config.load_format == LoadFormat.FAST


def test_fast_finds_bin_only_checkpoints_as_auto_does(tmp_path):
    torch.save({"w": torch.zeros(2)}, str(tmp_path / "pytorch_model.bin"))
    fast = FastModelLoader(LoadConfig(load_format="fast"))
    got = fast._prepare_weights(str(tmp_path), None, False)
    assert got == DefaultModelLoader(LoadConfig(load_format="auto"))._prepare_weights(str(tmp_path), None, False)
    assert got[1] == [str(tmp_path / "pytorch_model.bin")] and got[2] is False


def test_fast_config_is_restored_when_preparing_fails(tmp_path):
    fast = FastModelLoader(LoadConfig(load_format="fast"))
    with pytest.raises(RuntimeError, match="Cannot find any model weights"):
        fast._prepare_weights(str(tmp_path), None, False)  # an empty folder
    assert fast.load_config.load_format == LoadFormat.FAST
