"""Fuzzing of the header and index parsers, with a differential check against safetensors.

Every fuzzed safetensors file is written to disk and given both to our parser and to
``safetensors.safe_open``: whatever we accept, safe_open accepts too, with the same tensor
names, dtypes, shapes, metadata and bytes; whatever safe_open rejects, we reject. We reject
more than safe_open only in the cases listed in STRICTER_THAN_SAFE_OPEN.

The number of examples per test is 200 by default (a few seconds in all); set
``SGLANG_FASTLOAD_FUZZ_EXAMPLES=N`` for a long run.
"""

import copy
import json
import math
import os
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as st_save

from sglang_fastload.checkpoint.checkpoint_files import (
    INDEX_NAME,
    check_weight_map,
    parse_index,
    resolve_checkpoint_files,
)
from sglang_fastload.checkpoint.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    SUB_BYTE_DTYPES,
    parse_header,
    read_header,
    torch_dtype_name,
)
from sglang_fastload.errors import CheckpointIndexError, HeaderError

EXAMPLES = int(os.environ.get("SGLANG_FASTLOAD_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # write nothing into the checkout
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# "Never a hang": one parse of a fuzzed input is tiny; anything near this is a bug.
MAX_SECONDS_PER_INPUT = 5.0

# Where we reject a file that safetensors.safe_open accepts, on purpose. Each key is a
# fragment of our error message, each value the reason.
STRICTER_THAN_SAFE_OPEN = {
    "tensor name appears more than once": (
        "duplicate tensor names: safe_open silently keeps the last entry, so the file does not "
        "say which bytes are the tensor"
    ),
    "sub-byte dtype": "F4/F6_*: torch has no element type for them (float4_e2m1fn_x2 packs two values)",
    "larger than torch can represent": "a dimension of 2**63 or more: fits safetensors' u64, not torch's int64",
    "more than 2**63 - 1 elements": "element counts in [2**63, 2**64): fit u64, not torch's int64",
}

ALL_DTYPES = sorted(DTYPE_SIZES) + sorted(SUB_BYTE_DTYPES)


# ----------------------------------------------------------- JSON with duplicate keys


class Obj(list):
    """A JSON object as a list of (key, value) pairs, so fuzzing can write duplicate keys."""


class Raw(str):
    """JSON text written verbatim (NaN, -0, 1e400, ...)."""


def dump(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(v)}" for k, v in value) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dump(v) for v in value) + "]"
    if isinstance(value, dict):
        return dump(Obj(value.items()))
    return json.dumps(value)


def pack(header_text, data=b"", length=None) -> bytes:
    body = header_text.encode("utf-8", "surrogatepass") if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(body) if length is None else length) + body + data


# ------------------------------------------------------------------- valid bases


def _saved_bases():
    """Files written by safetensors itself, as (header pairs, data)."""
    sets = [
        ({"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, None),
        (
            {
                "model.layers.0.mlp.weight": torch.ones(4, 2, dtype=torch.bfloat16),
                "model.layers.0.mlp.scale": torch.ones(3, dtype=torch.float8_e4m3fn),
                "model.norm": torch.zeros(2, dtype=torch.float16),
                "empty": torch.zeros(0, 3, dtype=torch.int64),
                "flag": torch.tensor(True),
            },
            {"format": "pt"},
        ),
        ({"a": torch.zeros(2, 2, dtype=torch.complex64), "b": torch.zeros(5, dtype=torch.uint8)}, {}),
        ({}, {"only": "metadata"}),
    ]
    bases = []
    for tensors, metadata in sets:
        blob = st_save(tensors, metadata=metadata)
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n], object_pairs_hook=Obj)
        bases.append((header, blob[8 + n :]))
    return bases


SAVED_BASES = _saved_bases()

names = st.text(max_size=10).filter(lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 4), max_size=3)


@st.composite
def generated_bases(draw):
    specs = draw(
        st.lists(st.tuples(names, st.sampled_from(sorted(DTYPE_SIZES)), shapes), max_size=6, unique_by=lambda t: t[0])
    )
    order = draw(st.permutations(range(len(specs))))
    offsets = [None] * len(specs)
    position = 0
    for i in order:
        _, dtype, shape = specs[i]
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        offsets[i] = [position, position + size]
        position += size
    header = Obj()
    for (name, dtype, shape), off in zip(specs, offsets):
        fields = [("dtype", dtype), ("shape", shape), ("data_offsets", off)]
        header.append((name, Obj(draw(st.permutations(fields)))))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3))
    if metadata is not None:
        header.insert(draw(st.integers(0, len(header))), ("__metadata__", Obj(metadata.items())))
    return header, bytes(i % 251 for i in range(position))


valid_bases = st.one_of(st.sampled_from(SAVED_BASES), generated_bases()).map(copy.deepcopy)

# --------------------------------------------------------------------- mutations

INT_POOL = [0, 1, 2, 3, 4, 7, 8, 12, 16, 255, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -1, -(2**63)]
WEIRD_POOL = [True, False, None, 1.0, 2.5, "2", "", [], {}, Raw("-0"), Raw("NaN"), Raw("Infinity"), Raw("1e400"), Raw("2e0"), Raw("0.0"), Raw("-0.0")]
numbers = st.sampled_from(INT_POOL) | st.integers(-5, 300)
anything = numbers | st.sampled_from(WEIRD_POOL)
dtype_values = st.sampled_from(ALL_DTYPES + ["bf16", "F8_E4M3FN", "C128", "E8M0", "U4", " U8"]) | st.sampled_from(WEIRD_POOL) | st.builds(Raw, st.sampled_from(['{"U8":null}', '{"BF16":null}', '{"U8":[]}']))


def _tensor_indices(header):
    return [i for i, (k, v) in enumerate(header) if k != "__metadata__"]


def _pick_entry(draw, header):
    """Index of a tensor entry whose value is an object, or None."""
    choices = [i for i in _tensor_indices(header) if isinstance(header[i][1], Obj)]
    return draw(st.sampled_from(choices)) if choices else None


def _set_field(entry, key, value):
    for j, (k, _) in enumerate(entry):
        if k == key:
            entry[j] = (k, value)
            return
    entry.append((key, value))


def _get_field(entry, key, default=None):
    for k, v in entry:
        if k == key:
            return v
    return default


def m_dtype(draw, header, data):
    i = _pick_entry(draw, header)
    if i is not None:
        _set_field(header[i][1], "dtype", draw(dtype_values))
    return data


def m_shape(draw, header, data):
    i = _pick_entry(draw, header)
    if i is None:
        return data
    entry = header[i][1]
    shape = _get_field(entry, "shape")
    how = draw(st.integers(0, 3))
    if how == 0 or not isinstance(shape, list) or not shape:
        _set_field(entry, "shape", draw(st.lists(anything, max_size=4) | anything))
    elif how == 1:
        shape = list(shape)
        shape[draw(st.integers(0, len(shape) - 1))] = draw(anything)
        _set_field(entry, "shape", shape)
    elif how == 2:
        _set_field(entry, "shape", list(shape) + [draw(numbers)])
    else:
        _set_field(entry, "shape", list(reversed(shape)) + [0])
    return data


def m_offsets(draw, header, data):
    i = _pick_entry(draw, header)
    if i is None:
        return data
    entry = header[i][1]
    offsets = _get_field(entry, "data_offsets")
    how = draw(st.integers(0, 3))
    if how == 0 or not isinstance(offsets, list) or len(offsets) != 2:
        _set_field(entry, "data_offsets", draw(st.lists(numbers, max_size=3) | anything))
    elif how == 1:
        offsets = list(offsets)
        k = draw(st.integers(0, 1))
        delta = draw(st.integers(-3, 3))
        offsets[k] = offsets[k] + delta if type(offsets[k]) is int else delta
        _set_field(entry, "data_offsets", offsets)
    elif how == 2:
        offsets = list(offsets)
        offsets[draw(st.integers(0, 1))] = draw(anything)
        _set_field(entry, "data_offsets", offsets)
    else:
        _set_field(entry, "data_offsets", list(reversed(offsets)))
    return data


def m_keys(draw, header, data):
    i = _pick_entry(draw, header)
    if i is None:
        return data
    entry = header[i][1]
    how = draw(st.integers(0, 2))
    if how == 0 and entry:
        del entry[draw(st.integers(0, len(entry) - 1))]
    elif how == 1:
        entry.append((draw(st.sampled_from(["dtype", "shape", "data_offsets", "offset", "", "__metadata__"])), draw(anything)))
    elif entry:
        entry.append(entry[draw(st.integers(0, len(entry) - 1))])
    return data


def m_entry_value(draw, header, data):
    indices = _tensor_indices(header)
    if indices:
        i = draw(st.sampled_from(indices))
        entry = header[i][1]
        replacement = draw(anything)
        if isinstance(entry, Obj) and draw(st.booleans()):
            # The array form [dtype, shape, offsets] that serde also accepts.
            replacement = [_get_field(entry, "dtype"), _get_field(entry, "shape"), _get_field(entry, "data_offsets")]
        header[i] = (header[i][0], replacement)
    return data


def m_names(draw, header, data):
    indices = _tensor_indices(header)
    how = draw(st.integers(0, 3))
    if how == 0 and indices:  # duplicate an entry (same or changed value)
        k, v = header[draw(st.sampled_from(indices))]
        header.insert(draw(st.integers(0, len(header))), (k, copy.deepcopy(v)))
    elif how == 1 and indices:
        i = draw(st.sampled_from(indices))
        new = draw(st.sampled_from(["__metadata__", "\ud800", "\udfff\ud800", "a\x00b", "\U0001f600", ""]) | names)
        header[i] = (new, header[i][1])
    elif how == 2 and indices:
        del header[draw(st.sampled_from(indices))]
    else:  # a new empty tensor somewhere
        at = draw(st.integers(0, 3 + len(data)))
        header.append((draw(names), Obj([("dtype", "U8"), ("shape", [0]), ("data_offsets", [at, at])])))
    return data


def m_swap_offsets(draw, header, data):
    objs = [i for i in _tensor_indices(header) if isinstance(header[i][1], Obj)]
    if len(objs) >= 2:
        a, b = draw(st.lists(st.sampled_from(objs), min_size=2, max_size=2, unique=True))
        oa = _get_field(header[a][1], "data_offsets")
        ob = _get_field(header[b][1], "data_offsets")
        _set_field(header[a][1], "data_offsets", ob)
        _set_field(header[b][1], "data_offsets", oa)
    return data


def m_metadata(draw, header, data):
    how = draw(st.integers(0, 3))
    if how == 0:
        header.insert(0, ("__metadata__", draw(anything | st.just(Obj([("k", "v"), ("k", "w")])))))
    elif how == 1:
        header.append(("__metadata__", Obj([(draw(st.text(max_size=3)), draw(anything | st.text(max_size=3)))])))
    elif how == 2:
        header.append(("__metadata__", Obj([("k", draw(st.sampled_from(["\ud800", "ok", "\x00"])))])))
    else:
        header.append(("__metadata__", Obj()))
        header.append(("__metadata__", Obj()))
    return data


def m_data(draw, header, data):
    how = draw(st.integers(0, 1))
    if how == 0:
        return data + bytes(draw(st.integers(1, 9)))
    return data[: max(0, len(data) - draw(st.integers(1, 9)))]


MUTATIONS = [m_dtype, m_shape, m_offsets, m_keys, m_entry_value, m_names, m_swap_offsets, m_metadata, m_data]


@st.composite
def mutated_files(draw):
    header, data = draw(valid_bases)
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        data = mutation(draw, header, data)
    text = dump(header)
    if draw(st.integers(0, 9)) == 0:
        text = draw(st.sampled_from(["", " ", "\n", "\t\r\n "])) + text + draw(st.sampled_from(["", "  ", "\n", "\x00", "x", "}"]))
    if text and draw(st.integers(0, 9)) == 0:  # break the JSON text itself
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", "{", "}", "[", "]", ",", ":", '"', "\\", "1", "-", " "])) + text[at + 1 :]
    body = text.encode("utf-8", "surrogatepass")
    if body and draw(st.integers(0, 14)) == 0:  # a raw byte
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1 :]
    length = len(body)
    how = draw(st.integers(0, 19))
    if how == 0:
        length = draw(st.integers(0, 2**64 - 1))
    elif how == 1:
        length = max(0, length + draw(st.integers(-4, 4)))
    elif how == 2:
        length = draw(st.sampled_from([MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**40, 2**63, 2**64 - 1]))
    return pack(body, data, length)


# ------------------------------------------------------------ random JSON and bytes

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
json_values = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12,
)
tensorish = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(ALL_DTYPES) | json_leaf,
        "shape": st.lists(st.integers(0, 3), max_size=3) | st.lists(json_leaf, max_size=2) | json_values,
        "data_offsets": st.lists(st.integers(0, 40), max_size=3) | json_values,
    },
    optional={"extra": json_values},
)
random_headers = st.dictionaries(
    st.text(max_size=4) | st.just("__metadata__"),
    tensorish | json_values | st.dictionaries(st.text(max_size=3), st.text(max_size=3) | json_leaf, max_size=3),
    max_size=5,
) | json_values


@st.composite
def random_json_files(draw):
    text = json.dumps(draw(random_headers))
    return pack(text, bytes(draw(st.integers(0, 64))))


random_byte_files = st.binary(max_size=300) | st.builds(
    lambda n, body: struct.pack("<Q", n) + body,
    st.integers(0, 400) | st.integers(0, 2**64 - 1),
    st.binary(max_size=300),
)


@st.composite
def random_length_files(draw):
    header, data = draw(valid_bases)
    body = dump(header).encode()
    length = draw(
        st.integers(0, 2**64 - 1)
        | st.integers(max(0, len(body) - 8), len(body) + 8)
        | st.sampled_from([0, 1, 2**31, 2**32, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1])
    )
    return pack(body, data, length)


# ------------------------------------------------------------------ the differential


def _safe_open_view(path):
    """What safe_open makes of the file: None if it refuses it, else its tensors (dtype
    string, shape, raw bytes) and metadata."""
    try:
        with safe_open(path, "pt") as f:
            tensors = {}
            for name in f.keys():
                view = f.get_slice(name)
                tensors[name] = (view.get_dtype(), view.get_shape(), _raw_bytes(f, name))
            return tensors, f.metadata()
    except Exception:  # the library raises several types; any of them is a refusal
        return None


def _raw_bytes(f, name):
    try:
        t = f.get_tensor(name)
    except Exception:  # dtypes torch cannot hold (F6_*): only the header matters here
        return None
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def check_file(directory, blob):
    """Our parser never fails other than with HeaderError, and agrees with safe_open."""
    path = os.path.join(directory, "fuzz.safetensors")
    with open(path, "wb") as f:
        f.write(blob)

    started = time.monotonic()
    try:
        ours, our_error = parse_header(path, blob, len(blob)), None
    except HeaderError as e:
        ours, our_error = None, e
    assert time.monotonic() - started < MAX_SECONDS_PER_INPUT

    try:
        from_disk = read_header(path)
    except HeaderError as e:
        assert our_error is not None and str(e) == str(our_error)
    else:
        assert from_disk == ours

    theirs = _safe_open_view(path)
    if ours is not None:
        assert theirs is not None, f"accepted a file safe_open rejects: {blob[:300]!r}"
        tensors, metadata = theirs
        assert {n: (e.dtype, list(e.shape)) for n, e in ours.tensors.items()} == {
            n: (dtype, shape) for n, (dtype, shape, _) in tensors.items()
        }
        assert ours.metadata == metadata
        for name, entry in ours.tensors.items():
            assert entry.itemsize == DTYPE_SIZES[entry.dtype]
            assert getattr(torch, torch_dtype_name(entry.dtype)).itemsize == entry.itemsize
            # Our absolute offsets point at the bytes safe_open returns for the tensor.
            assert tensors[name][2] == blob[entry.start : entry.end]
    elif theirs is not None:
        reason = str(our_error)
        assert any(fragment in reason for fragment in STRICTER_THAN_SAFE_OPEN), (
            f"rejected a file safe_open accepts, and not on purpose: {reason}\n{blob[:300]!r}"
        )
    return ours


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("header-fuzz"))


@FUZZ
@given(valid_bases)
def test_valid_bases_accepted(fuzz_dir, base):
    header, data = base
    assert check_file(fuzz_dir, pack(dump(header), data)) is not None


@FUZZ
@given(mutated_files())
@example(  # found by the long run: the first of two same-named entries is broken
    pack(
        '{"0":{"dtype":"BF16","shape":[],"data_offsets":[4,4]},"0":{"dtype":"BF16","shape":[],"data_offsets":[0,2]},'
        '"000":{"dtype":"BF16","shape":[],"data_offsets":[2,4]},"00":{"dtype":"BF16","shape":[],"data_offsets":[4,6]}}',
        bytes(range(6)),
    )
)
def test_fuzz_mutated_headers(fuzz_dir, blob):
    check_file(fuzz_dir, blob)


@FUZZ
@given(random_json_files())
def test_fuzz_random_json(fuzz_dir, blob):
    check_file(fuzz_dir, blob)


@FUZZ
@given(random_byte_files)
def test_fuzz_random_bytes(fuzz_dir, blob):
    check_file(fuzz_dir, blob)


@FUZZ
@given(random_length_files())
def test_fuzz_random_length_fields(fuzz_dir, blob):
    check_file(fuzz_dir, blob)


# Each deliberate difference, shown on one file that safe_open accepts and we refuse.
STRICTER_EXAMPLES = [
    ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x", "tensor name appears more than once"),
    ('{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', b"x", "sub-byte dtype"),
    ('{"a":{"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]}}', b"", "larger than torch can represent"),
    ('{"a":{"dtype":"U8","shape":[4294967296,2147483648,0],"data_offsets":[0,0]}}', b"", "more than 2**63 - 1 elements"),
]


@pytest.mark.parametrize("header, data, fragment", STRICTER_EXAMPLES, ids=[e[2] for e in STRICTER_EXAMPLES])
def test_deliberately_stricter_cases(fuzz_dir, header, data, fragment):
    assert fragment in STRICTER_THAN_SAFE_OPEN
    path = os.path.join(fuzz_dir, "stricter.safetensors")
    with open(path, "wb") as f:
        f.write(pack(header, data))
    assert _safe_open_view(path) is not None
    with pytest.raises(HeaderError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        read_header(path)


def test_every_stricter_case_has_an_example():
    assert {e[2] for e in STRICTER_EXAMPLES} == set(STRICTER_THAN_SAFE_OPEN)


# ---------------------------------------------------------------------- the index

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
SHARD_TENSORS = {SHARD1: ["a", "b"], SHARD2: ["c"]}
SHARD_NAMES = [
    SHARD1,
    SHARD2,
    "missing.safetensors",
    "dir.safetensors",
    "link-in.safetensors",
    "link-out.safetensors",
    "../" + SHARD1,
    "/etc/passwd",
    "sub/" + SHARD1,
    "x\\" + SHARD1,
    "",
    ".",
    "..",
    ".hidden.safetensors",
    ".safetensors",
    "model.bin",
    "a\x00.safetensors",
    "\udc80.safetensors",
    "\ud800",
]
tensor_names = st.sampled_from(["a", "b", "c", "d", "\ud800", ""]) | st.text(max_size=4)
shard_names = st.sampled_from(SHARD_NAMES) | st.text(max_size=6) | st.sampled_from(WEIRD_POOL) | numbers


@st.composite
def index_documents(draw):
    """Index JSON text: mostly a weight_map with fuzzed names, sometimes anything."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return json.dumps(draw(json_values))
    weight_map = Obj()
    for shard, tensors in SHARD_TENSORS.items():
        weight_map.extend((t, shard) for t in tensors)
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.integers(0, 3))
        if how == 0 and weight_map:
            i = draw(st.integers(0, len(weight_map) - 1))
            weight_map[i] = (weight_map[i][0], draw(shard_names))
        elif how == 1:
            weight_map.append((draw(tensor_names), draw(shard_names)))
        elif how == 2 and weight_map:
            del weight_map[draw(st.integers(0, len(weight_map) - 1))]
        elif weight_map:
            weight_map.append(weight_map[draw(st.integers(0, len(weight_map) - 1))])
    doc = Obj([("metadata", Obj([("total_size", draw(numbers))])), ("weight_map", weight_map)])
    if kind == 1:
        doc = Obj(draw(st.permutations(list(doc) + [("weight_map", draw(anything))]))[:2])
    text = dump(doc)
    if text and kind == 2:
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", "{", "}", '"', "\\", ",", "\x00"])) + text[at + 1 :]
    return text


def _encode(text):
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    """A checkpoint directory with two real shards and some traps; the index is fuzzed."""
    root = tmp_path_factory.mktemp("index-fuzz")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    for shard, tensors in SHARD_TENSORS.items():
        with open(ckpt / shard, "wb") as f:
            f.write(st_save({t: torch.zeros(2) for t in tensors}))
    (ckpt / "dir.safetensors").mkdir()
    os.symlink(SHARD1, ckpt / "link-in.safetensors")
    with open(root / "outside.safetensors", "wb") as f:
        f.write(st_save({"a": torch.zeros(2)}))
    os.symlink("../outside.safetensors", ckpt / "link-out.safetensors")
    return str(ckpt)


def check_index(directory, data):
    started = time.monotonic()
    index_path = os.path.join(directory, INDEX_NAME)
    try:
        parsed = parse_index(index_path, data)
    except CheckpointIndexError as e:
        assert e.path == index_path
        parsed = None
    else:
        assert all(type(k) is str and type(v) is str for k, v in parsed.items())

    with open(index_path, "wb") as f:
        f.write(data)
    try:
        files = resolve_checkpoint_files(directory)
    except CheckpointIndexError as e:
        assert e.path.startswith(directory)
        files = None
    if files is not None:
        assert parsed is not None
        for path in files.files:
            assert os.path.dirname(path) == directory  # index names are plain file names
            # Links are followed wherever they point, but only to a regular file.
            assert os.path.isfile(os.path.realpath(path))
        # Only the directory's own *.safetensors files the index names are loaded.
        assert set(files.files) <= set(files.weight_map.values())
        assert all(not os.path.basename(p).startswith(".") and p.endswith(".safetensors") for p in files.files)
        headers = {p: read_header(p) for p in files.files}
        try:
            note = check_weight_map(files, headers)
        except CheckpointIndexError as e:  # only a tensor in two shards is refused
            assert e.path in files.files and e.tensor is not None and "tensor is also in" in str(e)
        else:
            assert note is None or note.startswith(index_path)
    assert time.monotonic() - started < MAX_SECONDS_PER_INPUT


@FUZZ
@given(index_documents())
def test_fuzz_index_documents(index_dir, text):
    check_index(index_dir, _encode(text))


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_index_random_bytes(index_dir, data):
    check_index(index_dir, data)
