"""What the replay records and what it refuses, one loader behaviour at a time.

The bit-exact suites replay real SGLang models, whose loaders only ever copy slices and
zero padding. Here small modules' ``load_weights`` do each thing a loader might do, so every
branch of the recorder is driven: recorded copies (their geometry), zero-fills, converted
dtypes, and each refusal (mutating a parameter, writing a computed tensor, copying into a
temporary, a shape or dtype that does not fit, needing values). No replay may change a
parameter.
"""

import pytest
import torch

from sglang_fastload.errors import CheckpointMismatchError, UnsupportedModelError
from sglang_fastload.loader.replay import replay_load_weights


class TwoWeights(torch.nn.Module):
    """A stacked parameter of two 4 x 6 halves and a 3-element bias (bf16)."""

    def __init__(self):
        super().__init__()
        self.stacked = torch.nn.Parameter(torch.arange(48, dtype=torch.bfloat16).reshape(8, 6), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.full((3,), 7.0, dtype=torch.bfloat16), requires_grad=False)


def _replay(model, tensors, body):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        return replay_load_weights(model, tensors, lambda m, it: body(m, dict(it)))
    finally:
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), f"the replay changed parameter {n}"


HALVES = [("a.weight", (4, 6), torch.bfloat16), ("b.weight", (4, 6), torch.bfloat16)]


def test_slices_are_recorded_with_their_geometry():
    def load(m, w):
        m.stacked.data.narrow(0, 0, 4).copy_(w["a.weight"])
        m.stacked.data.narrow(0, 4, 4).copy_(w["b.weight"][:, :])
        m.bias.data[1:].copy_(w["c.bias"][2:])  # a slice of the checkpoint tensor
        m.bias.data[:1].zero_()

    result = _replay(TwoWeights(), HALVES + [("c.bias", (4,), torch.bfloat16)], load)
    got = [(c.tensor, c.param, c.src, c.dst) for c in result.copies]
    assert got == [
        ("a.weight", "stacked", (0, (4, 6), (6, 1)), (0, (4, 6), (6, 1))),
        ("b.weight", "stacked", (0, (4, 6), (6, 1)), (24, (4, 6), (6, 1))),
        ("c.bias", "bias", (2, (2,), (1,)), (1, (2,), (1,))),
    ]
    assert [(z.param, z.dst) for z in result.zeros] == [("bias", (0, (1,), (1,)))]
    assert result.tensors_used == {"a.weight", "b.weight", "c.bias"}


def test_fill_with_zero_is_padding_and_other_fills_are_refused():
    def zero_fill(m, w):
        m.bias.data.fill_(0)

    assert [z.param for z in _replay(TwoWeights(), [], zero_fill).zeros] == ["bias"]

    def one_fill(m, w):
        m.bias.data.fill_(1.0)

    with pytest.raises(UnsupportedModelError, match="fill_.*bias"):
        _replay(TwoWeights(), [], one_fill)


def test_a_float_checkpoint_of_another_width_is_converted_as_upstream_copies_it():
    def load(m, w):
        m.bias.data.copy_(w["c.bias"])

    result = _replay(TwoWeights(), [("c.bias", (3,), torch.float32)], load)
    assert [c.tensor for c in result.copies] == ["c.bias"]


@pytest.mark.parametrize(
    "body, error, match",
    [
        (lambda m, w: m.bias.data.add_(w["c.bias"]), UnsupportedModelError, "add_.*bias"),
        (lambda m, w: m.bias.data.copy_(w["c.bias"] * 2), UnsupportedModelError, "computed tensor"),
        (lambda m, w: torch.empty(3, device="meta", dtype=torch.bfloat16).copy_(w["c.bias"]),
         UnsupportedModelError, "temporary"),
        (lambda m, w: m.bias.data.copy_(w["c.bias"].reshape(3)[0].item()), UnsupportedModelError, "needs tensor values"),
        # An operator with no meta kernel (its message says "Meta"): values needed, not a bad checkpoint.
        (lambda m, w: torch.equal(w["c.bias"], w["c.bias"]), UnsupportedModelError, "needs tensor values"),
        (lambda m, w: m.bias.data[:2].copy_(w["c.bias"]), CheckpointMismatchError, r"\[3\] into \[2\]"),
    ],
    ids=["mutating-op", "computed-tensor", "temporary", "needs-values", "needs-values-no-meta-kernel", "shape"],
)
def test_what_is_not_a_strided_copy_is_refused(body, error, match):
    with pytest.raises(error, match=match) as info:
        _replay(TwoWeights(), [("c.bias", (3,), torch.bfloat16)], body)
    if error is CheckpointMismatchError:
        assert info.value.tensor == "c.bias"  # named, for the caller to add its file


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn])
def test_integer_boolean_and_fp8_tensors_never_feed_a_float_parameter(dtype):
    def load(m, w):
        m.bias.data.copy_(w["c.bias"])

    with pytest.raises(CheckpointMismatchError, match=f"dtype {dtype}") as info:
        _replay(TwoWeights(), [("c.bias", (3,), dtype)], load)
    assert info.value.tensor == "c.bias"


def test_copies_between_ordinary_tensors_still_run():
    # A loader may copy among its own temporaries (not probes, not parameters).
    seen = []

    def load(m, w):
        tmp = torch.zeros(3, dtype=torch.bfloat16)
        tmp.copy_(torch.ones(3, dtype=torch.bfloat16))
        seen.append(tmp.tolist())
        m.bias.data.copy_(w["c.bias"])

    result = _replay(TwoWeights(), [("c.bias", (3,), torch.bfloat16)], load)
    assert seen == [[1.0, 1.0, 1.0]]
    assert len(result.copies) == 1
