"""A checkpoint's config.json is never a reason to refuse it: upstream's update does not read it,
and SGLang may serve a config's model under another class name. What does not fit the served
model is refused by the replay, tensor by tensor."""

import json

from sglang_fastload.loader.validate import config_note
from tests.rig.checkpoints import write_qwen3
from tests.rig.inprocess import compare_params, load_params, upstream_params


def test_config_note_speaks_only_of_what_differs(tmp_path):
    assert config_note(str(tmp_path), "Qwen3ForCausalLM") is None  # weights only: no config.json
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert config_note(str(tmp_path), "Qwen3ForCausalLM") is None
    config.write_text(json.dumps({"model_type": "qwen3"}))  # names none
    assert config_note(str(tmp_path), "Qwen3ForCausalLM") is None
    config.write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    note = config_note(str(tmp_path), "Qwen3ForCausalLM")
    assert str(config) in note and "['LlamaForCausalLM']" in note and "Qwen3ForCausalLM" in note
    config.write_text("{not json")
    assert "unreadable" in config_note(str(tmp_path), "Qwen3ForCausalLM")
    config.write_text("[]")
    assert "not a JSON object" in config_note(str(tmp_path), "Qwen3ForCausalLM")


def test_start_up_of_a_class_served_under_another_name_loads_fast_and_bit_identically(tmp_path):
    # SGLang serves some configs under another class name (its own renames, or
    # --json-model-override-args): the config.json on disk then names a class the server
    # does not run, and the start-up must load as upstream's does, not be refused.
    a = write_qwen3(tmp_path / "a", tied=False, seed=3, layout="sharded")
    config = json.loads((a / "config.json").read_text())
    config["architectures"] = ["Qwen3ForCausalLMWithReadout"]
    (a / "config.json").write_text(json.dumps(config))
    override = {"json_model_override_args": json.dumps({"architectures": ["Qwen3ForCausalLM"]})}
    fast = load_params(a, load_format="fast", server_args=override)
    upstream = upstream_params(a, server_args=override)
    assert fast[0].error is None and not compare_params(upstream[0].params, fast[0].params)
    log = fast[0].log
    assert "sglang-fastload: loaded" in log and "no fast-load plan" not in log, log[-3000:]
    assert "describes architectures ['Qwen3ForCausalLMWithReadout'], but the server runs Qwen3ForCausalLM" in log
