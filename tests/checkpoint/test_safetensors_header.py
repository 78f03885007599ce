"""Rules of the safetensors header parser, one table row per rule, on real files."""

import collections
import errno
import json
import os
import struct
import time
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sglang_fastload.checkpoint.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    SUB_BYTE_DTYPES,
    SafetensorsHeader,
    TensorEntry,
    parse_header,
    read_header,
    torch_dtype_name,
)
from sglang_fastload.errors import CheckpointError, HeaderError


# ----------------------------------------------------------------------------- helpers


def _base_tensors():
    return {
        "model.embed.weight": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
        "model.norm.weight": torch.arange(4, dtype=torch.int32),
        "model.empty": torch.zeros(0, 5, dtype=torch.float32),
        "lm_head.scale": torch.tensor(1.5, dtype=torch.float64),
    }


@pytest.fixture
def base_file(tmp_path):
    """A valid file written by safetensors itself."""
    path = tmp_path / "base.safetensors"
    save_file(_base_tensors(), str(path), metadata={"format": "pt"})
    return path


def split_file(path):
    """(header dict, data bytes) of a safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def write_raw(path, header, data=b"", length=None):
    """Write a file from a header (dict -> JSON, str or bytes), data and an optional length field."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    if length is None:
        length = len(header)
    path.write_bytes(struct.pack("<Q", length) + header + data)
    return path


def safe_open_accepts(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        return True
    except Exception:
        return False


U8 = lambda shape, begin, end: {"dtype": "U8", "shape": shape, "data_offsets": [begin, end]}  # noqa: E731
ENTRY = '{"dtype":"U8","shape":[2],"data_offsets":[0,2]}'


# ------------------------------------------------------------------- the rule table
#
# Each row: id, a function (tmp_path, base_file) -> path of the file to test, the expected
# message fragment, the tensor the error must name (None: the error is about the file),
# and whether safetensors.safe_open also rejects the file (False marks the cases where we
# are deliberately stricter; see test_header_fuzz.STRICTER_THAN_SAFE_OPEN).


def _mutated(fn):
    """Row builder: load the base file's header, let ``fn`` change it, write it back."""

    def build(tmp_path, base_file):
        header, data = split_file(base_file)
        result = fn(header, data)
        if result is not None:
            header, data = result
        return write_raw(tmp_path / "case.safetensors", header, data)

    return build


def _raw(header, data=b"", length=None):
    def build(tmp_path, base_file):
        return write_raw(tmp_path / "case.safetensors", header, data, length)

    return build


def _bytes(blob):
    def build(tmp_path, base_file):
        path = tmp_path / "case.safetensors"
        path.write_bytes(blob)
        return path

    return build


def _set(name, key, value):
    def fn(h, d):
        h[name][key] = value

    return _mutated(fn)


def _length_past_eof(tmp_path, base_file):
    header, data = split_file(base_file)
    text = json.dumps(header).encode()
    return write_raw(tmp_path / "case.safetensors", text, b"", length=len(text) + 1)


EMB = "model.embed.weight"  # BF16 [2, 3]; save_file puts it at data offsets [24, 36]
NORM = "model.norm.weight"  # I32 [4]

HEADER_RULES = [
    # --- the length field and the file size
    ("empty-file", _bytes(b""), "too short for the 8-byte header length field", None, True),
    ("file-under-8-bytes", _bytes(b"\x02\x00\x00"), "too short for the 8-byte", None, True),
    ("length-2**40", _raw("{}", b"", length=2**40), "more than the limit of 100000000 bytes", None, True),
    ("length-max-u64", _raw("{}", b"", length=2**64 - 1), "more than the limit", None, True),
    ("length-just-over-limit", _raw("{}", b"", length=MAX_HEADER_BYTES + 1), "more than the limit", None, True),
    ("length-past-eof", _length_past_eof, "the file holds only", None, True),
    ("length-zero", _raw("", b""), "not valid JSON", None, True),
    # --- encoding and JSON syntax
    ("not-utf8", _raw(b'{"\xff":1}'), "not valid UTF-8", None, True),
    ("utf8-surrogate-bytes", _raw(b'{"\xed\xa0\x80":1}'), "not valid UTF-8", None, True),
    ("utf8-bom", _raw(b"\xef\xbb\xbf{}"), "not valid JSON", None, True),
    ("not-json", _raw("{not json}"), "not valid JSON", None, True),
    ("json-trailing-garbage", _raw('{"a":' + ENTRY + "}x", b"xx"), "not valid JSON", None, True),
    ("json-trailing-nul", _raw('{"a":' + ENTRY + "}\x00", b"xx"), "not valid JSON", None, True),
    ("json-nan", _raw('{"a":{"dtype":"U8","shape":[NaN],"data_offsets":[0,2]}}', b"xx"), "not valid JSON", None, True),
    ("json-infinity", _raw('{"a":{"dtype":"U8","shape":[Infinity],"data_offsets":[0,2]}}', b"xx"), "not valid JSON", None, True),
    ("json-nested-too-deep", _raw("[" * 5000 + "]" * 5000), "nested too deeply", None, True),
    ("json-array", _raw("[]"), "header JSON must be an object, got an array", None, True),
    ("json-string", _raw('"x"'), "must be an object, got a string", None, True),
    ("json-null", _raw("null"), "must be an object, got null", None, True),
    # --- tensor entries
    ("entry-array-of-two", _raw('{"a":[1,2]}', b"xx"), "tensor entry written as an array must hold 3 items", "a", True),
    ("entry-array-of-four", _raw('{"a":["U8",[2],[0,2],1]}', b"xx"), "must hold 3 items (dtype, shape, data_offsets), got 4", "a", True),
    ("entry-string", _raw('{"a":"U8"}', b"xx"), "tensor entry must be a JSON object, got a string", "a", True),
    ("entry-null", _raw('{"a":null}', b"xx"), "tensor entry must be a JSON object, got null", "a", True),
    ("entry-missing-key", _mutated(lambda h, d: h[EMB].pop("data_offsets") and None), "missing key(s) ['data_offsets']", EMB, True),
    ("entry-missing-dtype", _mutated(lambda h, d: h[NORM].pop("dtype") and None), "missing key(s) ['dtype']", NORM, True),
    ("entry-duplicate-key", _raw('{"a":{"dtype":"U8","dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xx"), "duplicate key 'dtype' in tensor entry", "a", True),
    ("dtype-unknown", _set(EMB, "dtype", "BF17"), "unknown dtype 'BF17'", EMB, True),
    ("dtype-lowercase", _set(NORM, "dtype", "i32"), "unknown dtype 'i32'", NORM, True),
    ("dtype-not-string", _set(EMB, "dtype", 2), "got an integer", EMB, True),
    ("dtype-as-map-not-null", _raw('{"a":{"dtype":{"U8":0},"shape":[2],"data_offsets":[0,2]}}', b"xx"), "dtype must be a string (or {\"<dtype>\": null}), got an object", "a", True),
    ("dtype-as-map-of-two", _raw('{"a":{"dtype":{"U8":null,"I8":null},"shape":[2],"data_offsets":[0,2]}}', b"xx"), "got an object", "a", True),
    ("dtype-as-map-unknown", _raw('{"a":{"dtype":{"BF17":null},"shape":[2],"data_offsets":[0,2]}}', b"xx"), "unknown dtype 'BF17'", "a", True),
    ("dtype-F4-sub-byte", _raw({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"x"), "sub-byte dtype 'F4' is not supported", "a", False),
    ("dtype-F6-sub-byte", _raw({"a": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, b"xxx"), "sub-byte dtype 'F6_E2M3'", "a", False),
    # --- shapes
    ("shape-not-list", _set(EMB, "shape", 6), "shape must be an array of non-negative integers, got an integer", EMB, True),
    ("shape-object", _set(EMB, "shape", {}), "shape must be an array", EMB, True),
    ("shape-float", _set(NORM, "shape", [4.0]), "shape[0] is 4.0", NORM, True),
    ("shape-exponent", _raw('{"a":{"dtype":"U8","shape":[2e0],"data_offsets":[0,2]}}', b"xx"), "shape[0] is 2.0", "a", True),
    ("shape-bool", _raw({"a": U8([True, True], 0, 1)}, b"x"), "shape[0] is True", "a", True),
    ("shape-negative", _set(NORM, "shape", [-4]), "shape[0] is -4", NORM, True),
    ("shape-minus-zero", _raw('{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'), "shape[0] is -0.0", "a", True),
    ("shape-string", _set(NORM, "shape", ["4"]), "shape[0] is '4'", NORM, True),
    ("shape-null-dim", _set(NORM, "shape", [None]), "shape[0] is None", NORM, True),
    ("shape-over-u64", _raw({"a": U8([0, 2**64], 0, 0)}), "shape[1] is 1.8446744073709552e+19", "a", True),
    ("shape-dim-2**63", _raw({"a": U8([0, 2**63], 0, 0)}), "larger than torch can represent", "a", False),
    ("shape-numel-over-int64", _raw({"a": U8([2**40, 2**40, 0], 0, 0)}), "more than 2**63 - 1 elements", "a", True),
    ("shape-numel-2**62-f64", _raw({"a": {"dtype": "F64", "shape": [2**62], "data_offsets": [0, 0]}}), "more than the whole data section", "a", True),
    ("shape-product-mismatch", _set(EMB, "shape", [3, 3]), "needs 18 bytes but data_offsets [24, 36] span 12 bytes", EMB, True),
    ("shape-dtype-mismatch", _set(EMB, "dtype", "F32"), "needs 24 bytes but data_offsets [24, 36] span 12 bytes", EMB, True),
    # --- data offsets
    ("offsets-not-list", _set(EMB, "data_offsets", 12), "data_offsets must be an array of exactly two integers", EMB, True),
    ("offsets-three", _set(EMB, "data_offsets", [0, 6, 12]), "exactly two integers", EMB, True),
    ("offsets-one", _set(EMB, "data_offsets", [12]), "exactly two integers", EMB, True),
    ("offsets-float", _set(EMB, "data_offsets", [0, 12.0]), "must hold non-negative integers", EMB, True),
    ("offsets-bool", _raw({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, b"x"), "must hold non-negative integers", "a", True),
    ("offsets-negative", _set(EMB, "data_offsets", [-12, 0]), "must hold non-negative integers", EMB, True),
    ("offsets-begin-after-end", _raw({"a": U8([0], 2, 0)}, b"xx"), "begin 2 is after end 0", "a", True),
    ("offsets-past-eof", _raw({"a": U8([4], 0, 4)}, b"xx"), "run past the end of the file: the data section holds only 2 bytes", "a", True),
    ("offsets-huge", _raw({"a": U8([0], 2**63, 2**63)}), "run past the end of the file", "a", True),
    ("offsets-over-u64", _raw({"a": U8([0], 0, 2**70)}), "must hold non-negative integers", "a", True),
    # --- tiling of the data section
    ("overlap", _raw({"a": U8([2], 0, 2), "b": U8([2], 1, 3)}, b"xxx"), "overlap tensor 'a', which ends at 2", "b", True),
    ("same-offsets-twice", _raw({"a": U8([2], 0, 2), "b": U8([2], 0, 2)}, b"xx"), "overlap tensor 'a'", "b", True),
    ("zero-size-inside-other", _raw({"a": U8([4], 0, 4), "b": U8([0], 2, 2)}, b"xxxx"), "overlap tensor 'a'", "b", True),
    ("gap-at-start", _raw({"a": U8([2], 2, 4)}, b"xxxx"), "gap of 2 bytes at the start of the data section", "a", True),
    ("gap-between", _raw({"a": U8([2], 0, 2), "b": U8([2], 3, 5)}, b"xxxxx"), "gap of 1 bytes after tensor 'a'", "b", True),
    ("trailing-bytes", _raw({"a": U8([2], 0, 2)}, b"xxx"), "1 trailing bytes after the last tensor", None, True),
    ("trailing-bytes-no-tensors", _raw("{}", b"\x00"), "1 trailing bytes", None, True),
    ("trailing-after-save_file", _mutated(lambda h, d: (h, d + b"\x00" * 7)), "7 trailing bytes", None, True),
    # --- names
    ("duplicate-name-first-entry-broken", _raw('{"a":{"dtype":"U8","shape":[],"data_offsets":[9,9]},"a":' + ENTRY + "}", b"xx"), "tensor name appears more than once", "a", False),
    ("duplicate-tensor-name", _raw('{"a":' + ENTRY + ',"a":' + ENTRY + "}", b"xx"), "tensor name appears more than once", "a", False),
    ("name-lone-surrogate", _raw('{"\\ud800":' + ENTRY + "}", b"xx"), "tensor name is not valid Unicode", "\ud800", True),
    ("name-reversed-surrogates", _raw('{"\\ude00\\ud83d":' + ENTRY + "}", b"xx"), "not valid Unicode", "\ude00\ud83d", True),
    # --- __metadata__
    ("metadata-duplicate", _raw('{"__metadata__":{},"__metadata__":{},"a":' + ENTRY + "}", b"xx"), "'__metadata__' appears more than once", None, True),
    ("metadata-list", _raw({"__metadata__": [], "a": U8([2], 0, 2)}, b"xx"), "'__metadata__' must be an object mapping strings to strings, got an array", None, True),
    ("metadata-string", _raw({"__metadata__": "pt"}), "'__metadata__' must be an object", None, True),
    ("metadata-as-tensor", _raw({"__metadata__": U8([2], 0, 2)}, b"xx"), "'__metadata__' value for key 'shape' must be a string, got an array", None, True),
    ("metadata-int-value", _mutated(lambda h, d: h["__metadata__"].update(step=3)), "'__metadata__' value for key 'step' must be a string, got an integer", None, True),
    ("metadata-null-value", _raw({"__metadata__": {"k": None}}), "must be a string, got null", None, True),
    ("metadata-nested", _raw({"__metadata__": {"k": {"x": "y"}}}), "must be a string, got an object", None, True),
    ("metadata-duplicate-key-bad-value", _raw('{"__metadata__":{"k":"1","k":2}}'), "'__metadata__' value for key 'k' must be a string", None, True),
    ("metadata-surrogate-value", _raw('{"__metadata__":{"k":"\\udfff"}}'), "'__metadata__' value for key 'k' is not valid Unicode", None, True),
    ("metadata-surrogate-key", _raw('{"__metadata__":{"\\udfff":"v"}}'), "'__metadata__' key", None, True),
]


@pytest.mark.parametrize(
    "build, fragment, tensor, safe_open_rejects",
    [pytest.param(*row[1:], id=row[0]) for row in HEADER_RULES],
)
def test_header_rule(tmp_path, base_file, build, fragment, tensor, safe_open_rejects):
    path = build(tmp_path, base_file)
    with pytest.raises(HeaderError) as info:
        read_header(str(path))
    err = info.value
    assert fragment in str(err), str(err)
    assert err.path == str(path)
    assert str(err).startswith(str(path) + ": ")
    assert err.tensor == tensor
    if tensor is not None:
        assert f"tensor {tensor!r}" in str(err)
    # parse_header on the same bytes says the same.
    blob = path.read_bytes()
    with pytest.raises(HeaderError) as again:
        parse_header(str(path), blob, len(blob))
    assert str(again.value) == str(err)
    # Cross-check with the safetensors library: it rejects the file too, except in the
    # rows marked as deliberately stricter.
    assert safe_open_accepts(path) is (not safe_open_rejects)


def test_rule_table_ids_unique():
    ids = [row[0] for row in HEADER_RULES]
    assert len(ids) == len(set(ids))


def test_header_error_is_checkpoint_error(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", "[]")
    with pytest.raises(CheckpointError):
        read_header(str(path))
    with pytest.raises(ValueError):
        read_header(str(path))


# ----------------------------------------------------------------------- valid files


def test_reads_save_file_output(base_file):
    header = read_header(str(base_file))
    assert isinstance(header, SafetensorsHeader)
    assert header.path == str(base_file)
    assert header.file_size == base_file.stat().st_size
    assert header.metadata == {"format": "pt"}
    blob = base_file.read_bytes()
    assert header.data_start == 8 + struct.unpack("<Q", blob[:8])[0]
    expected = _base_tensors()
    assert set(header.tensors) == set(expected)
    with safe_open(str(base_file), "pt") as f:
        assert set(f.keys()) == set(header.tensors)
        for name, entry in header.tensors.items():
            assert isinstance(entry, TensorEntry)
            assert entry.name == name
            assert entry.dtype == f.get_slice(name).get_dtype()
            assert list(entry.shape) == f.get_slice(name).get_shape()
            assert isinstance(entry.shape, tuple)
            dtype = getattr(torch, torch_dtype_name(entry.dtype))
            assert dtype == expected[name].dtype
            assert entry.itemsize == expected[name].element_size()
            assert entry.nbytes == expected[name].numel() * entry.itemsize
            # Absolute offsets: the bytes at [start, end) are the tensor.
            raw = bytearray(blob[entry.start : entry.end])
            if entry.nbytes:
                got = torch.frombuffer(raw, dtype=dtype).reshape(entry.shape)
            else:
                got = torch.empty(entry.shape, dtype=dtype)
            assert torch.equal(got, expected[name])


def test_tensors_ordered_by_offset(tmp_path):
    header = {
        "c": U8([1], 0, 1),
        "a": U8([2], 1, 3),
        "z0": U8([0], 3, 3),
        "b": U8([3], 3, 6),
        "y0": U8([0], 3, 3),
    }
    path = write_raw(tmp_path / "o.safetensors", header, b"abcdef")
    parsed = read_header(str(path))
    assert list(parsed.tensors) == ["c", "a", "y0", "z0", "b"]
    assert [t.start - parsed.data_start for t in parsed.tensors.values()] == [0, 1, 3, 3, 3]


@pytest.mark.parametrize("st_dtype", sorted(DTYPE_SIZES))
def test_every_dtype_round_trips(tmp_path, st_dtype):
    torch_dtype = getattr(torch, torch_dtype_name(st_dtype))
    assert torch.empty(0, dtype=torch_dtype).element_size() == DTYPE_SIZES[st_dtype]
    tensor = torch.zeros(3, 2 * DTYPE_SIZES[st_dtype], dtype=torch.uint8).view(torch_dtype)
    path = tmp_path / "d.safetensors"
    save_file({"t": tensor}, str(path))
    entry = read_header(str(path)).tensors["t"]
    assert entry.dtype == st_dtype
    assert entry.shape == (3, 2)
    assert entry.itemsize == DTYPE_SIZES[st_dtype]


def test_dtype_tables():
    assert "BF16" in DTYPE_SIZES and DTYPE_SIZES["BF16"] == 2
    assert torch_dtype_name("BF16") == "bfloat16"
    assert torch_dtype_name("F8_E4M3") == "float8_e4m3fn"
    assert not SUB_BYTE_DTYPES & set(DTYPE_SIZES)
    with pytest.raises(KeyError):
        torch_dtype_name("F4")
    with pytest.raises(KeyError):
        torch_dtype_name("bogus")


@pytest.mark.parametrize(
    "header, data",
    [
        pytest.param("{}", b"", id="no-tensors"),
        pytest.param('{"__metadata__":{}}', b"", id="empty-metadata-only"),
        pytest.param('{"__metadata__":null,"a":' + ENTRY + "}", b"xx", id="null-metadata"),
        pytest.param(' \n\t{"a":' + ENTRY + "}\r\n   ", b"xx", id="json-whitespace-padding"),
        pytest.param('{"":' + ENTRY + "}", b"xx", id="empty-name"),
        pytest.param('{"\\u00e9\\ud83d\\ude00":' + ENTRY + "}", b"xx", id="escaped-unicode-name"),
        pytest.param('{"a":{"dtype":"U8","shape":[],"data_offsets":[0,1]}}', b"x", id="scalar"),
        pytest.param('{"a":{"dtype":"U8","shape":[0,1099511627776,1099511627776],"data_offsets":[0,0]}}', b"", id="empty-with-huge-dims"),
        pytest.param('{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}', b"", id="two-empty-at-0"),
        pytest.param('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"offset":0}}', b"xx", id="entry-extra-key"),
        pytest.param('{"a":{"offset":[1],"dtype":"U8","crc":{"x":null},"shape":[2],"data_offsets":[0,2]}}', b"xx", id="entry-extra-keys-anywhere"),
        pytest.param('{"a":{"dtype":"U8","x":1,"shape":[2],"x":2,"data_offsets":[0,2]}}', b"xx", id="entry-unknown-key-twice"),
        pytest.param('{"a":["U8",[2],[0,2]]}', b"xx", id="entry-as-array-serde-form"),
        pytest.param('{"a":{"dtype":{"U8":null},"shape":[2],"data_offsets":[0,2]}}', b"xx", id="dtype-as-map-serde-form"),
        pytest.param('{"a":[{"BF16":null},[1],[0,2]]}', b"xx", id="both-serde-forms"),
        pytest.param('{"__metadata__":{"k":"1","format":"pt","k":"2"},"a":' + ENTRY + "}", b"xx", id="metadata-key-twice-last-wins"),
    ],
)
def test_valid_edge_cases_agree_with_safe_open(tmp_path, header, data):
    path = write_raw(tmp_path / "v.safetensors", header, data)
    parsed = read_header(str(path))
    with safe_open(str(path), "pt") as f:
        assert list(sorted(f.keys())) == sorted(parsed.tensors)
        assert f.metadata() == parsed.metadata
        for name, entry in parsed.tensors.items():
            assert list(entry.shape) == f.get_slice(name).get_shape()


def test_null_metadata_reads_as_none(tmp_path):
    path = write_raw(tmp_path / "m.safetensors", '{"__metadata__":null}')
    assert read_header(str(path)).metadata is None
    path = write_raw(tmp_path / "m2.safetensors", "{}")
    assert read_header(str(path)).metadata is None


def test_header_of_exactly_the_limit_is_read(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES))
        f.write(b"{}")
        f.write(b" " * (MAX_HEADER_BYTES - 2))
    assert read_header(str(path)).tensors == {}


# --------------------------------------------------------------- parse_header / read_header


def test_parse_header_takes_longer_prefix(base_file):
    blob = base_file.read_bytes()
    from_prefix = parse_header(str(base_file), blob, len(blob))
    assert from_prefix == read_header(str(base_file))
    header_only = blob[: from_prefix.data_start]
    assert parse_header(str(base_file), header_only, len(blob)) == from_prefix
    assert parse_header(str(base_file), memoryview(blob), len(blob)) == from_prefix


def test_parse_header_short_prefix(base_file):
    blob = base_file.read_bytes()
    with pytest.raises(HeaderError, match="bytes available"):
        parse_header("f", blob[:20], len(blob))
    with pytest.raises(HeaderError, match="length field available"):
        parse_header("f", blob[:5], len(blob))


def test_parse_header_file_size_is_authoritative(base_file):
    blob = base_file.read_bytes()
    with pytest.raises(HeaderError, match="trailing bytes"):
        parse_header("f", blob, len(blob) + 1)
    with pytest.raises(HeaderError, match="run past the end of the file"):
        parse_header("f", blob, len(blob) - 1)


def test_layout_key(tmp_path, base_file):
    a = read_header(str(base_file))
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(base_file.read_bytes())
    b = read_header(str(copy))
    assert a.path != b.path
    assert a.layout_key() == b.layout_key()
    hash(a.layout_key())
    assert a.layout_key()[0] == a.file_size and a.layout_key()[1] == a.data_start
    # Rewritten with another shape (same byte sizes): another key.
    header, data = split_file(base_file)
    same = read_header(str(write_raw(tmp_path / "same.safetensors", header, data)))
    header[EMB]["shape"] = [3, 2]
    c = read_header(str(write_raw(tmp_path / "c.safetensors", header, data)))
    assert c.file_size == same.file_size and c.data_start == same.data_start
    assert c.layout_key() != same.layout_key()
    # Metadata of the same length changes nothing in the layout.
    header, data = split_file(base_file)
    header["__metadata__"] = {"format": "np"}
    d = read_header(str(write_raw(tmp_path / "d.safetensors", header, data)))
    assert d.metadata != same.metadata
    assert d.layout_key() == same.layout_key()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(HeaderError, match="cannot open safetensors file") as info:
        read_header(str(path))
    assert info.value.path == str(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(HeaderError, match="not a regular file"):
        read_header(str(tmp_path))


def test_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(HeaderError, match="not a regular file"):
        read_header(str(fifo))
    assert time.monotonic() - started < 5


def test_unreadable_file(tmp_path, base_file, monkeypatch):
    os.chmod(base_file, 0)
    if os.geteuid() == 0:  # root opens any file: the refusal the kernel would give anyone else
        real_open = os.open

        def refused(path, *args, **kwargs):
            if os.fspath(path) == str(base_file):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(base_file))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refused)
    with pytest.raises(HeaderError, match="cannot open safetensors file: Permission denied") as raised:
        read_header(str(base_file))
    assert str(base_file) in str(raised.value)


def test_accepts_pathlike(base_file):
    assert read_header(base_file).path == str(base_file)


# ------------------------------------------------------------------------ memory safety


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    "length",
    [2**40, 2**63, 2**64 - 1, MAX_HEADER_BYTES, MAX_HEADER_BYTES - 1],
    ids=["2**40", "2**63", "u64-max", "at-limit", "under-limit"],
)
def test_length_field_never_drives_allocation(tmp_path, length):
    path = write_raw(tmp_path / "len.safetensors", "{}", b"", length=length)

    def attempt():
        with pytest.raises(HeaderError):
            read_header(str(path))

    started = time.monotonic()
    assert _peak_bytes(attempt) < 1 << 20
    assert time.monotonic() - started < 1

    blob = path.read_bytes()

    def attempt_parse():
        with pytest.raises(HeaderError):
            parse_header(str(path), blob, len(blob))

    assert _peak_bytes(attempt_parse) < 1 << 20


@pytest.mark.parametrize(
    "shape, offsets",
    [
        ([2**62], [0, 2]),
        ([2**62, 2**62], [0, 2]),
        ([2**31] * 8, [0, 2]),
        ([2**64 - 1], [0, 2]),
        ([2], [0, 2**62]),
        ([2], [2**62, 2**62 + 2]),
    ],
)
def test_huge_numbers_in_header_do_not_allocate(tmp_path, shape, offsets):
    path = write_raw(tmp_path / "s.safetensors", {"a": {"dtype": "F64", "shape": shape, "data_offsets": offsets}}, b"xx")

    def attempt():
        with pytest.raises(HeaderError):
            read_header(str(path))

    started = time.monotonic()
    assert _peak_bytes(attempt) < 1 << 20
    assert time.monotonic() - started < 1


def test_huge_digit_strings_are_cheap(tmp_path):
    digits = "9" * 200_000
    path = write_raw(tmp_path / "d.safetensors", '{"a":{"dtype":"U8","shape":[' + digits + '],"data_offsets":[0,2]}}', b"xx")
    started = time.monotonic()
    with pytest.raises(HeaderError, match="dimensions must be non-negative integers"):
        read_header(str(path))
    assert time.monotonic() - started < 1


# ------------------------------------------------------------------ validated-header memo


def _header_with_step(path, step, n_tensors=64):
    """A shard whose header differs only by its metadata, as RL writers stamp the step."""
    tensors = {f"layers.{i}.weight": torch.zeros(2, 2, dtype=torch.bfloat16) for i in range(n_tensors)}
    save_file(tensors, str(path), metadata={"step": str(step)})


def test_header_memo_is_bounded_by_bytes_not_entries(tmp_path, monkeypatch):
    from sglang_fastload.checkpoint import safetensors_header as sh

    monkeypatch.setattr(sh, "_MEMO", collections.OrderedDict())
    monkeypatch.setattr(sh, "_memo_bytes", 0)
    monkeypatch.setattr(sh, "MEMO_MAX_BYTES", 256 << 10)
    path = tmp_path / "model.safetensors"
    costs = []
    for step in range(60):
        _header_with_step(path, step)
        read_header(str(path))
        costs.append(sh.memo_bytes())
    assert max(costs) <= 256 << 10
    # Each header costs ~50 KiB here: a few are kept, never 60 (the old entry cap was 512).
    assert 2 <= len(sh._MEMO) < 10, len(sh._MEMO)
    assert sh.memo_bytes() == sum(cost for _, cost in sh._MEMO.values())
    # The most recent header is a hit: the same parsed entries, under the new path.
    newest = next(reversed(sh._MEMO.values()))[0]
    kept, held = len(sh._MEMO), sh.memo_bytes()
    other = tmp_path / "copy.safetensors"
    other.write_bytes(path.read_bytes())
    header = read_header(str(other))
    assert header.path == str(other) and newest.path == str(path)
    assert header.tensors is newest.tensors  # not parsed again
    assert (len(sh._MEMO), sh.memo_bytes()) == (kept, held)


def test_header_larger_than_memo_budget_is_parsed_but_not_kept(tmp_path, monkeypatch):
    from sglang_fastload.checkpoint import safetensors_header as sh

    monkeypatch.setattr(sh, "_MEMO", collections.OrderedDict())
    monkeypatch.setattr(sh, "_memo_bytes", 0)
    monkeypatch.setattr(sh, "MEMO_MAX_BYTES", 4 << 10)
    path = tmp_path / "model.safetensors"
    _header_with_step(path, 1)
    assert len(read_header(str(path)).tensors) == 64
    assert len(sh._MEMO) == 0 and sh.memo_bytes() == 0


def test_keys_safetensors_ignores_are_ignored_and_noted(tmp_path):
    """A tensor entry's keys beyond dtype, shape and data_offsets: safetensors ignores them,
    whatever their values, so upstream loads the file; so does the parser, which names
    them for a note. A plain file has none."""
    path = write_raw(
        tmp_path / "x.safetensors",
        '{"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},'
        '"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"offset":0,"crc32":"1a2b"}}',
        b"\x01\x02\x03\x04",
    )
    header = read_header(str(path))
    assert safe_open_accepts(path)
    assert [(e.name, e.shape, e.start - header.data_start, e.end - header.data_start)
            for e in header.tensors.values()] == [("a", (2,), 0, 2), ("b", (2,), 2, 4)]
    assert header.ignored_keys == (("a", ("offset", "crc32")),)
    note = header.ignored_keys_note()
    assert str(path) in note and "'a'" in note and "offset" in note and "crc32" in note
    plain = write_raw(tmp_path / "p.safetensors", '{"a":' + ENTRY + "}", b"xx")
    assert read_header(str(plain)).ignored_keys == () and read_header(str(plain)).ignored_keys_note() is None
    # A misspelt one of the three is still refused: that key is then missing.
    bad = write_raw(tmp_path / "m.safetensors", '{"a":{"dtype":"U8","shape":[2],"data_offset":[0,2]}}', b"xx")
    with pytest.raises(HeaderError, match=r"missing key\(s\) \['data_offsets'\]"):
        read_header(str(bad))
