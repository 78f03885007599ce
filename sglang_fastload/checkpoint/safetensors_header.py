"""Strict parser for the header of a ``*.safetensors`` file.

File layout: an 8-byte little-endian unsigned header length ``N``, then ``N`` bytes of
UTF-8 JSON, then the data section. The JSON object maps each tensor name to
``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}`` (offsets relative to
the start of the data section) plus an optional ``"__metadata__"`` object of strings.

The parser accepts a subset of what ``safetensors.safe_open`` accepts and rejects every
file it rejects (the library's own rules: header length at most 100,000,000 bytes, strict
UTF-8, strict JSON, known dtypes, ``end - begin`` equal to the tensor's size, tensors that
tile the data section exactly from byte 0 to the end of the file with no gap, overlap or
trailing byte). On top of those it refuses, on purpose:

* a tensor name given twice (the library keeps the last entry of a name);
* the sub-byte dtypes ``F4``, ``F6_E2M3``, ``F6_E3M2`` (torch has no element type for them:
  the only 4-bit one packs two values per element, which changes the shape);
* dimensions or element counts above ``2**63 - 1``, which torch cannot represent.

Keys other than ``dtype``/``shape``/``data_offsets`` in a tensor entry are ignored, as the
library ignores them (``SafetensorsHeader.ignored_keys`` lists them, for a note); an entry
written as the array ``[dtype, shape, data_offsets]`` and a dtype written as
``{"<dtype>": null}`` are read as the library (serde) reads them.

Nothing is ever allocated in proportion to a number read from the file: the header
length is checked against :data:`MAX_HEADER_BYTES` and the real file size before the
header is read, and every size is compared with the real file size as a Python int.

This module does not import torch; :func:`torch_dtype_name` gives the name of the torch
dtype attribute for each dtype string.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from sglang_fastload.errors import HeaderError

__all__ = [
    "MAX_HEADER_BYTES",
    "DTYPE_SIZES",
    "SUB_BYTE_DTYPES",
    "torch_dtype_name",
    "TensorEntry",
    "SafetensorsHeader",
    "parse_header",
    "read_header",
]

#: Largest header accepted; the same bound (decimal 100 MB) as the safetensors library.
MAX_HEADER_BYTES = 100_000_000

#: Every dtype string this loader accepts -> bytes per element.
DTYPE_SIZES: Dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

#: Dtype strings the safetensors format knows but this loader refuses (fewer than 8 bits).
SUB_BYTE_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

_TORCH_NAMES: Dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}
assert _TORCH_NAMES.keys() == DTYPE_SIZES.keys()

# torch sizes and element counts are int64.
_MAX_DIM = 2**63 - 1
_MAX_NUMEL = 2**63 - 1
_U64_MAX = 2**64 - 1
_LEN_FIELD = 8
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
_METADATA_KEY = "__metadata__"


def torch_dtype_name(st_dtype: str) -> str:
    """Name of the ``torch`` attribute for a safetensors dtype string ("BF16" -> "bfloat16").

    Raises KeyError for a string not in :data:`DTYPE_SIZES`.
    """
    return _TORCH_NAMES[st_dtype]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, with absolute byte offsets into the file."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


class _LayoutKey(tuple):
    """A header's layout key: a tuple that computes its hash once (every update looks the
    plan kept in memory up by it; hashing 6,291 entries anew took ~1-2 ms)."""

    def __hash__(self) -> int:
        cached = self.__dict__.get("hash")
        if cached is None:
            cached = self.__dict__["hash"] = tuple.__hash__(self)
        return cached


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of one safetensors file."""

    path: str
    file_size: int
    data_start: int
    tensors: Dict[str, TensorEntry]
    metadata: Optional[Dict[str, str]]
    # (tensor name, keys) of entries with keys beyond dtype, shape and data_offsets, which
    # safetensors ignores (and so upstream's loader): ignored here too, and noted.
    ignored_keys: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()

    def ignored_keys_note(self) -> Optional[str]:
        """One line naming the file, a tensor and the keys safetensors ignores, or None."""
        if not self.ignored_keys:
            return None
        name, keys = self.ignored_keys[0]
        more = len(self.ignored_keys) - 1
        return (
            f"{self.path}: tensor entry {name!r} has key(s) {_short(list(keys))} besides 'dtype', 'shape' and "
            f"'data_offsets'" + (f" (and {more} more entries)" if more else "")
            + "; ignored, as safetensors (and upstream's loader) ignores them"
        )

    def layout_key(self) -> tuple:
        """Hashable identity of the file's byte layout (sizes, names, dtypes, shapes, offsets)."""
        key = self.__dict__.get("_layout_key")
        if key is None:
            key = _LayoutKey((
                self.file_size,
                self.data_start,
                tuple((t.name, t.dtype, t.shape, t.start, t.end) for t in self.tensors.values()),
            ))
            object.__setattr__(self, "_layout_key", key)  # computed once per parsed header
        return key


# --------------------------------------------------------------------------- JSON


# A JSON object is kept as the tuple of its (key, value) pairs, so duplicate keys stay
# visible; arrays stay lists. A built-in type: a list subclass as the hook cost ~1 us more
# per object (6,291 entries: ~7 ms of a 19 ms parse on the CI machine kind).
_Pairs = tuple


def _parse_int(text: str):
    # The safetensors library (serde_json) reads "-0" and integers beyond 64 bits as
    # floats, which are never valid sizes; map them to floats too so they are rejected
    # the same way, and so no huge digit string is ever converted to an int.
    digits = text[1:] if text.startswith("-") else text
    if text == "-0" or len(digits) > 20:
        return float(text)
    value = int(text)
    if value > _U64_MAX:
        return float(value)
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# Where ``_parse_int`` can differ from ``int``: a "-0" or a run of 20 or more digits (every
# integer above 2**64 - 1 has 20 digits or more). A header without either anywhere, in
# strings included, parses the same with the plain ``int`` (MoE headers: 15 ms instead of
# 29 for 6,291 tensors; the look costs 3). Digits are found by a byte translation: a
# regular expression for the runs took longer than the hook it would save.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGIT_RUN = b"0" * 20


def _int_hook_needed(text: str) -> bool:
    return "-0" in text or _LONG_DIGIT_RUN in text.encode("utf-8", "surrogatepass").translate(_DIGITS_ONLY)


def _loads(text: str):
    hooked = _int_hook_needed(text)
    return json.loads(
        text,
        object_pairs_hook=_Pairs,
        parse_int=_parse_int if hooked else None,
        parse_constant=_reject_constant,
    )


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number with a fraction or exponent"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, _Pairs):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _short(value, limit: int = 80) -> str:
    """repr() of a value read from the file, cut so an error message stays readable."""
    if isinstance(value, _Pairs):
        text = repr(dict(value))
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_unicode(text: str) -> bool:
    # Python's json accepts "\ud800" (a lone surrogate escape); strict JSON parsers and
    # the safetensors library do not.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------- validation


def _check_header_length(path: str, length: int, file_size: int) -> None:
    if length > MAX_HEADER_BYTES:
        raise HeaderError(
            path,
            f"header length field says {length} bytes, more than the limit of "
            f"{MAX_HEADER_BYTES} bytes",
        )
    if length > file_size - _LEN_FIELD:
        raise HeaderError(
            path,
            f"header length field says {length} bytes but the file holds only "
            f"{file_size - _LEN_FIELD} bytes after the 8-byte length field "
            f"(file size {file_size})",
        )


def _parse_metadata(path: str, value) -> Optional[Dict[str, str]]:
    if value is None:  # the safetensors library treats null as absent
        return None
    if not isinstance(value, _Pairs):
        raise HeaderError(
            path,
            f"'__metadata__' must be an object mapping strings to strings, got {_json_type(value)}",
        )
    metadata: Dict[str, str] = {}
    for key, item in value:
        if not _is_unicode(key):
            raise HeaderError(path, f"'__metadata__' key {_short(key)} is not valid Unicode")
        # A repeated key: the library keeps its last value (metadata never decides a weight).
        if type(item) is not str:
            raise HeaderError(
                path,
                f"'__metadata__' value for key {_short(key)} must be a string, got {_json_type(item)}",
            )
        if not _is_unicode(item):
            raise HeaderError(
                path, f"'__metadata__' value for key {_short(key)} is not valid Unicode"
            )
        metadata[key] = item
    return metadata


def _plain_entry(value, data_len: int):
    """(dtype, shape, begin, end) of an entry written the usual way and passing every check
    of ``_parse_entry`` (keys in the writer's order, no other keys), else None."""
    if len(value) != 3:
        return None
    (k0, dtype), (k1, shape), (k2, offsets) = value
    if k0 != "dtype" or k1 != "shape" or k2 != "data_offsets" or type(dtype) is not str:
        return None
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    numel = 1
    for dim in shape:
        if type(dim) is not int or dim < 0 or dim > _MAX_DIM:
            return None
        numel *= dim
        if numel > _MAX_NUMEL:
            return None
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end <= data_len:
        return None
    if numel * itemsize != end - begin:
        return None
    return dtype, tuple(shape), begin, end


def _parse_entry(path: str, name: str, value, data_len: int, ignored: list):
    """Check one tensor entry; returns (dtype, shape, begin, end) relative to the data section.
    Keys beyond the three are appended to ``ignored`` as ``(name, keys)``."""
    if type(value) is _Pairs:
        plain = _plain_entry(value, data_len)
        if plain is not None:
            return plain
    if type(value) is list:
        # The library (serde) also reads an entry written as the array of its three fields.
        if len(value) != len(_ENTRY_KEYS):
            raise HeaderError(
                path, f"tensor entry written as an array must hold 3 items (dtype, shape, data_offsets), "
                f"got {len(value)}", name,
            )
        fields = dict(zip(_ENTRY_KEYS, value))
    elif isinstance(value, _Pairs):
        fields = {}
        extra = []
        for key, item in value:
            if key in _ENTRY_KEYS:
                if key in fields:
                    raise HeaderError(path, f"duplicate key {_short(key)} in tensor entry", name)
                fields[key] = item
            elif key not in extra:
                extra.append(key)
        if extra:
            # safetensors ignores keys it does not know, whatever their values (repeated
            # ones too): so does this parser (a misspelt one of the three is still refused:
            # that key is then missing).
            ignored.append((name, tuple(extra)))
        missing = [k for k in _ENTRY_KEYS if k not in fields]
        if missing:
            raise HeaderError(path, f"tensor entry is missing key(s) {missing}", name)
    else:
        raise HeaderError(path, f"tensor entry must be a JSON object, got {_json_type(value)}", name)

    dtype = fields["dtype"]
    if type(dtype) is _Pairs and len(dtype) == 1 and dtype[0][1] is None:
        dtype = dtype[0][0]  # serde's other spelling of a dtype: {"BF16": null}
    if type(dtype) is not str:
        raise HeaderError(path, f"dtype must be a string (or {{\"<dtype>\": null}}), got {_json_type(dtype)}", name)
    if dtype in SUB_BYTE_DTYPES:
        raise HeaderError(
            path,
            f"sub-byte dtype {dtype!r} is not supported (torch has no element type for it)",
            name,
        )
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None:
        raise HeaderError(path, f"unknown dtype {_short(dtype)}", name)

    shape = fields["shape"]
    if type(shape) is not list:
        raise HeaderError(
            path, f"shape must be an array of non-negative integers, got {_json_type(shape)}", name
        )
    numel = 1
    for i, dim in enumerate(shape):
        if type(dim) is not int or dim < 0:
            raise HeaderError(
                path,
                f"shape[{i}] is {_short(dim)}; dimensions must be non-negative integers",
                name,
            )
        if dim > _MAX_DIM:
            raise HeaderError(
                path, f"shape[{i}] = {dim} is larger than torch can represent (2**63 - 1)", name
            )
        numel *= dim
        if numel > _MAX_NUMEL:
            raise HeaderError(
                path,
                f"shape {_short(shape)} has more than 2**63 - 1 elements "
                f"(overflow at dimension {i})",
                name,
            )

    offsets = fields["data_offsets"]
    if type(offsets) is not list or len(offsets) != 2:
        raise HeaderError(
            path,
            f"data_offsets must be an array of exactly two integers [begin, end], got "
            f"{_short(offsets)}",
            name,
        )
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or begin < 0 or end < 0:
        raise HeaderError(
            path, f"data_offsets must hold non-negative integers, got {_short(offsets)}", name
        )
    if begin > end:
        raise HeaderError(path, f"data_offsets begin {begin} is after end {end}", name)
    if end > data_len:
        raise HeaderError(
            path,
            f"data_offsets [{begin}, {end}] run past the end of the file: the data section "
            f"holds only {data_len} bytes",
            name,
        )
    nbytes = numel * itemsize
    if nbytes > data_len:
        raise HeaderError(
            path,
            f"shape {_short(shape)} of dtype {dtype} needs {nbytes} bytes, more than the "
            f"whole data section of the file ({data_len} bytes)",
            name,
        )
    if nbytes != end - begin:
        raise HeaderError(
            path,
            f"shape {_short(shape)} of dtype {dtype} needs {nbytes} bytes but data_offsets "
            f"[{begin}, {end}] span {end - begin} bytes",
            name,
        )
    return dtype, tuple(shape), begin, end


def parse_header(path: str, prefix: bytes, file_size: int) -> SafetensorsHeader:
    """Parse and validate a safetensors header from the first bytes of a file.

    ``prefix`` must hold at least the 8-byte length field and the whole header (it may hold
    more); ``file_size`` is the real size of the file. Raises HeaderError on any problem.
    """
    path = os.fspath(path)
    if file_size < _LEN_FIELD:
        raise HeaderError(
            path, f"file is {file_size} bytes long, too short for the 8-byte header length field"
        )
    view = memoryview(prefix)
    if len(view) < _LEN_FIELD:
        raise HeaderError(path, f"only {len(view)} bytes of the header length field available")
    (length,) = struct.unpack_from("<Q", view, 0)
    _check_header_length(path, length, file_size)
    data_start = _LEN_FIELD + length
    if len(view) < data_start:
        raise HeaderError(
            path,
            f"only {len(view) - _LEN_FIELD} of the header's {length} bytes available "
            f"(file truncated while reading?)",
        )
    data_len = file_size - data_start

    try:
        text = str(view[_LEN_FIELD:data_start], "utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(
            path, f"header is not valid UTF-8 (bad byte at header offset {e.start})"
        ) from None
    try:
        root = _loads(text)
    except RecursionError:
        raise HeaderError(path, "header is not valid JSON: nested too deeply") from None
    except ValueError as e:  # json.JSONDecodeError and the hooks' errors
        raise HeaderError(path, f"header is not valid JSON: {_short(str(e), 200)}") from None
    if not isinstance(root, _Pairs):
        raise HeaderError(path, f"header JSON must be an object, got {_json_type(root)}")

    # Names first, so a duplicate is reported as such whatever its entries hold. Checked
    # all at once; one by one only to name the first bad one.
    names = [name for name, _ in root]
    if len(set(names)) != len(names) or not _is_unicode("".join(names)):
        seen = set()
        for name in names:
            if not _is_unicode(name):
                raise HeaderError(path, "tensor name is not valid Unicode (lone surrogate escape)", name)
            if name in seen:
                if name == _METADATA_KEY:
                    raise HeaderError(path, "'__metadata__' appears more than once in the header")
                raise HeaderError(path, "tensor name appears more than once in the header", name)
            seen.add(name)

    metadata: Optional[Dict[str, str]] = None
    raw = []
    ignored: List[Tuple[str, Tuple[str, ...]]] = []
    for name, value in root:
        if name == _METADATA_KEY:
            metadata = _parse_metadata(path, value)
        else:
            dtype, shape, begin, end = _parse_entry(path, name, value, data_len, ignored)
            raw.append((begin, end, name, dtype, shape))

    # The data section must be tiled exactly: sorted by offsets, each tensor begins where
    # the previous one ended, the first at 0, the last ends at the end of the file.
    raw.sort()  # by (begin, end, name): names are unique, so later fields never decide
    tensors: Dict[str, TensorEntry] = {}
    new_entry = object.__new__
    position = 0
    previous = None
    for begin, end, name, dtype, shape in raw:
        if begin < position:
            raise HeaderError(
                path,
                f"data_offsets [{begin}, {end}] overlap tensor {previous!r}, which ends at "
                f"{position}",
                name,
            )
        if begin > position:
            what = f"after tensor {previous!r}" if previous is not None else "at the start of the data section"
            raise HeaderError(
                path,
                f"data_offsets [{begin}, {end}] leave a gap of {begin - position} bytes "
                f"{what} (bytes {position}..{begin} belong to no tensor)",
                name,
            )
        entry = tensors[name] = new_entry(TensorEntry)  # the frozen __init__ sets fields one call at a time
        entry.__dict__.update(name=name, dtype=dtype, shape=shape, start=data_start + begin, end=data_start + end)
        position = end
        previous = name
    if position != data_len:
        raise HeaderError(
            path,
            f"{data_len - position} trailing bytes after the last tensor: the data section "
            f"({data_len} bytes) must be covered exactly by the tensors",
        )
    return SafetensorsHeader(path, file_size, data_start, tensors, metadata, tuple(ignored))


# ---------------------------------------------------------------------------- file


def _pread_exact(path: str, fd: int, count: int, offset: int, file_size: int) -> bytes:
    chunks = []
    got = 0
    while got < count:
        chunk = os.pread(fd, count - got, offset + got)
        if not chunk:
            raise HeaderError(
                path,
                f"file ended after {offset + got} bytes although its size is {file_size} "
                f"(modified while being read?)",
            )
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_header(path: str) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    The header length is checked against :data:`MAX_HEADER_BYTES` and the file size
    before the header is read. OS errors become HeaderError naming the file.
    """
    path = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise HeaderError(path, f"cannot open safetensors file: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HeaderError(path, "not a regular file")
        file_size = st.st_size
        if file_size < _LEN_FIELD:
            raise HeaderError(
                path,
                f"file is {file_size} bytes long, too short for the 8-byte header length field",
            )
        head = _pread_exact(path, fd, _LEN_FIELD, 0, file_size)
        (length,) = struct.unpack("<Q", head)
        _check_header_length(path, length, file_size)
        body = _pread_exact(path, fd, length, _LEN_FIELD, file_size)
    except OSError as e:
        raise HeaderError(path, f"cannot read safetensors file: {e.strerror or e}") from e
    finally:
        os.close(fd)
    return _parse_header_memoized(path, head + body, file_size)


# Parsing is a pure function of (header bytes, file size); RL updates re-read byte-identical
# headers every step (same writer, same shapes), so validated results are reused. Only the
# path differs between checkpoints, and it is replaced on a hit. The memo is bounded by an
# estimate of the memory it holds, not by entries: writers that put the step into the
# metadata make every header new, and a Qwen3-30B-A3B-sized checkpoint's headers take
# ~10 MiB parsed. The bound holds one such checkpoint (A/B alternation shares entries).
_MEMO: "collections.OrderedDict[tuple, Tuple[SafetensorsHeader, int]]" = collections.OrderedDict()
MEMO_MAX_BYTES = 16 << 20
# Measured with tracemalloc: a parsed entry (name, TensorEntry, layout-key tuple) costs
# ~600-860 bytes beyond its JSON text.
_PARSED_BYTES_PER_TENSOR = 640
_MEMO_LOCK = threading.Lock()
_memo_bytes = 0


def _memo_cost(prefix: bytes, header: SafetensorsHeader) -> int:
    return len(prefix) + _PARSED_BYTES_PER_TENSOR * len(header.tensors)


def _parse_header_memoized(path: str, prefix: bytes, file_size: int) -> SafetensorsHeader:
    global _memo_bytes
    key = (file_size, len(prefix), hashlib.blake2b(prefix, digest_size=32).digest())
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None:
            _MEMO.move_to_end(key)
    if hit is not None:
        header = dataclasses.replace(hit[0], path=path)
        object.__setattr__(header, "_layout_key", hit[0].layout_key())
        return header
    header = parse_header(path, prefix, file_size)
    header.layout_key()
    cost = _memo_cost(prefix, header)
    if cost > MEMO_MAX_BYTES:
        return header  # too large to keep; never evict everything for one file
    with _MEMO_LOCK:
        if key not in _MEMO:
            _MEMO[key] = (header, cost)
            _memo_bytes += cost
        while _memo_bytes > MEMO_MAX_BYTES:
            _, (_, dropped) = _MEMO.popitem(last=False)
            _memo_bytes -= dropped
    return header


def memo_bytes() -> int:
    """Estimated memory held by the validated-header memo (bounded by ``MEMO_MAX_BYTES``)."""
    with _MEMO_LOCK:
        return _memo_bytes
