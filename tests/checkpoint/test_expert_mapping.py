"""The expert-mapping index returns exactly what upstream's linear scan over the mappings reaches."""

from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

from sglang_fastload.expert_mapping import ExpertMappingIndex


def _linear_scan(mappings, name):
    return [m for m in mappings if m[1] in name]


def _qwen3_moe_mappings(num_experts):
    # The mapping list Qwen3-MoE's load_weights builds, from upstream's own helper.
    return FusedMoE.make_expert_params_mapping(
        ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj", ckpt_up_proj_name="up_proj",
        num_experts=num_experts,
    )


NAMES = [
    "model.layers.0.mlp.experts.0.gate_proj.weight",
    "model.layers.3.mlp.experts.17.down_proj.weight",
    "model.layers.3.mlp.experts.127.up_proj.weight",
    "model.layers.3.mlp.experts.1.up_proj.weight",  # a prefix of experts.17 / experts.127
    "model.layers.3.mlp.experts.128.up_proj.weight",  # past the last expert: no mapping
    "model.layers.3.mlp.gate.weight",
    "model.layers.3.self_attn.q_proj.weight",
    "model.layers.3.mlp.shared_experts.2.gate_proj.weight",  # the key inside a longer word
    "model.layers.3.mlp.experts.1.xexperts.2.down_proj.weight",  # one key overlapping another
    "model.layers.3.mlp.experts.2.down_proj.experts.2.down_proj.weight",  # one key twice
    "model.layers.3.mlp.experts.05.gate_proj.weight",  # a leading zero is another name
]


def test_candidates_equal_the_linear_scan_on_upstream_mappings():
    mappings = _qwen3_moe_mappings(128)
    index = ExpertMappingIndex(mappings)
    for name in NAMES:
        assert index.candidates(name) == _linear_scan(mappings, name), name


def test_unindexed_mappings_keep_their_place_in_the_order():
    # Fused-checkpoint style entries (no expert number) mixed in between per-expert entries.
    mappings = [
        ("experts.w13_", "experts.0.gate_proj.", 0, "w1"),
        ("experts.w13_", "experts.gate_up_proj", 0, "w13"),
        ("experts.w2_", "experts.0.down_proj.", 0, "w2"),
        ("experts.w2_", "down_proj", 0, "w2"),
    ]
    index = ExpertMappingIndex(mappings)
    for name in ["model.layers.0.mlp.experts.0.down_proj.weight", "model.layers.0.mlp.experts.gate_up_proj",
                 "model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.experts.1.down_proj.weight"]:
        assert index.candidates(name) == _linear_scan(mappings, name), name
