"""Find the safetensors shards of a checkpoint directory and check its index.

The shards are chosen as upstream's loader chooses them: the directory's own
``*.safetensors`` files (names not starting with ``.``); with a
``model.safetensors.index.json`` that is a regular file, only those its ``weight_map``
names, and every file it names must exist; without one, all of them (but for a
``consolidated.safetensors`` beside a ``model.safetensors``, which upstream skips).

Whatever an index names, only files of the directory are loaded. Symlinks among them are
followed wherever they lead when their final target is a readable regular file; dangling
links, loops and other targets are refused. ``docs/checkpoint-safety.md`` has the details.
"""

from __future__ import annotations

import collections
import json
import operator
import os
import stat
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from sglang_fastload.checkpoint.safetensors_header import SafetensorsHeader, _short
from sglang_fastload.errors import CheckpointIndexError

__all__ = [
    "INDEX_NAME",
    "MAX_INDEX_BYTES",
    "SHARD_SUFFIX",
    "CheckpointFiles",
    "parse_index",
    "resolve_checkpoint_files",
    "check_weight_map",
    "weights_format",
]

INDEX_NAME = "model.safetensors.index.json"
#: Largest index file read (checked before reading).
MAX_INDEX_BYTES = 100_000_000
SHARD_SUFFIX = ".safetensors"

# Files upstream never loads as weights (its filter_files_not_needed_for_inference).
_NOT_WEIGHTS = frozenset({"training_args.bin", "optimizer.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"})


@dataclass(frozen=True)
class CheckpointFiles:
    """The shards of one checkpoint directory."""

    directory: str
    files: Tuple[str, ...]
    weight_map: Optional[Dict[str, str]]
    index_path: Optional[str]
    # What upstream passes over without a word and the log should say (None: nothing).
    note: Optional[str] = None


# ------------------------------------------------------------------------- index


def parse_index(index_path: str, data: bytes) -> Dict[str, str]:
    """Validate the bytes of a ``model.safetensors.index.json``.

    Returns its ``weight_map``: tensor name -> file name, as written (not yet checked to
    exist). Raises CheckpointIndexError where upstream's reading of it fails.
    """
    index_path = os.fspath(index_path)
    if len(data) > MAX_INDEX_BYTES:
        raise CheckpointIndexError(
            index_path, f"index is {len(data)} bytes, more than the limit of {MAX_INDEX_BYTES}"
        )
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointIndexError(
            index_path, f"index is not valid UTF-8 (bad byte at offset {e.start})"
        ) from None
    try:
        # A repeated key keeps its last value, as in upstream's ``json.load`` of the index:
        # the index only chooses the shards, and the replay checks what they hold.
        root = json.loads(text)
    except RecursionError:
        raise CheckpointIndexError(index_path, "index is not valid JSON: nested too deeply") from None
    except ValueError as e:
        raise CheckpointIndexError(index_path, f"index is not valid JSON: {_short(str(e), 200)}") from None
    if type(root) is not dict:
        raise CheckpointIndexError(index_path, f"index JSON must be an object, got {type(root).__name__}")
    if "weight_map" not in root:
        raise CheckpointIndexError(index_path, "index has no 'weight_map'")
    weight_map = root["weight_map"]
    if type(weight_map) is not dict:
        raise CheckpointIndexError(
            index_path,
            f"'weight_map' must be an object mapping tensor names to shard file names, got "
            f"{type(weight_map).__name__}",
        )
    if not weight_map:
        raise CheckpointIndexError(index_path, "'weight_map' is empty")
    for tensor, shard in weight_map.items():
        if type(shard) is not str:  # upstream's os.path.join of it raises
            raise CheckpointIndexError(
                index_path, f"weight_map value must be a shard file name (string), got {_short(shard)}", tensor
            )
    # Any name is taken as upstream takes it: joined to the directory, where it must exist;
    # only the directory's own *.safetensors files among them are loaded (resolve_checkpoint_files).
    return dict(weight_map)


# ----------------------------------------------------------------------- symlinks


def _check_member(directory: str, name: str, err_path: str, label: str) -> str:
    """Check that ``directory/name`` is, or links to, a readable regular file; returns its path.

    A link is followed wherever it leads, as upstream does: checkpoint managers link an
    unchanged shard to the previous step's file, and whoever can plant a link in the
    directory can plant weights too. What could hang or mislead is refused: dangling links,
    loops, and targets that are not regular files (FIFOs, devices, directories).
    ``label`` names the file in messages, e.g. "shard 'a.safetensors'".
    """
    path = os.path.join(directory, name)
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointIndexError(err_path, f"{label} does not exist in {directory}") from None
    except OSError as e:
        raise CheckpointIndexError(err_path, f"cannot access {label} ({path}): {e.strerror or e}") from None
    if stat.S_ISLNK(lst.st_mode):
        try:
            target = os.path.realpath(path, strict=True)
            st = os.stat(target)
        except (OSError, RuntimeError):
            raise CheckpointIndexError(
                err_path, f"{label} ({path}) is a symlink that does not resolve (dangling or a loop)"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointIndexError(
                err_path, f"{label} ({path}) is a symlink to {target}, which is not a regular file"
            )
    else:
        st = lst
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointIndexError(err_path, f"{label} ({path}) is not a regular file")
    if not os.access(path, os.R_OK):
        raise CheckpointIndexError(err_path, f"{label} ({path}) is not readable")
    return path


# ----------------------------------------------------------------------- resolve


def _read_index(directory: str) -> Tuple[str, Dict[str, str]]:
    index_path = _check_member(
        directory, INDEX_NAME, os.path.join(directory, INDEX_NAME), f"index file {INDEX_NAME!r}"
    )
    try:
        with open(index_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise CheckpointIndexError(
                    index_path, f"index is {size} bytes, more than the limit of {MAX_INDEX_BYTES}"
                )
            data = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise CheckpointIndexError(index_path, f"cannot read index: {e.strerror or e}") from None
    return index_path, _parse_index_memoized(index_path, data)


# Like headers, an RL job's index files are byte-identical from step to step; parsing is a
# pure function of the bytes, so the validated result is reused (callers never mutate it).
# Bounded by bytes held (the text plus ~3x for the parsed names), not by entries.
_INDEX_MEMO: "collections.OrderedDict[bytes, Tuple[Dict[str, str], int]]" = collections.OrderedDict()
INDEX_MEMO_MAX_BYTES = 8 << 20
_index_memo_bytes = 0


def _parse_index_memoized(index_path: str, data: bytes) -> Dict[str, str]:
    global _index_memo_bytes
    hit = _INDEX_MEMO.get(data)
    if hit is not None:
        _INDEX_MEMO.move_to_end(data)
        return hit[0]
    names = parse_index(index_path, data)
    cost = 4 * len(data)
    if cost <= INDEX_MEMO_MAX_BYTES:
        _INDEX_MEMO[data] = (names, cost)
        _index_memo_bytes += cost
        while _index_memo_bytes > INDEX_MEMO_MAX_BYTES:
            _, (_, dropped) = _INDEX_MEMO.popitem(last=False)
            _index_memo_bytes -= dropped
    return names


def weights_format(directory: str) -> Optional[str]:
    """Which weights upstream's ``auto`` would load from ``directory``, found as it finds them.

    Returns:
        ``"safetensors"`` (``*.safetensors`` files), else ``"bin"`` or ``"pt"``
        (PyTorch pickles, which the fast path leaves to upstream), else None (no weights,
        or the directory cannot be listed: ``resolve_checkpoint_files`` says why).
    """
    try:
        names = [n for n in os.listdir(directory) if not n.startswith(".") and n not in _NOT_WEIGHTS]
    except OSError:
        return None
    if any(n.endswith(SHARD_SUFFIX) for n in names):  # upstream's first pattern (an index alone is none)
        return "safetensors"
    for suffix in (".bin", ".pt"):
        if any(n.endswith(suffix) for n in names):
            return suffix[1:]
    return None


# A parsed index (one object per distinct index text: ``_INDEX_MEMO``) joined to a directory:
# its shards, their paths and the tensor -> path map, made once per pair instead of once per
# update (6,291 entries: ~2 ms). Each value holds ``names``, so the id in its key stays
# that object's. Callers never mutate the map.
_WEIGHT_MAPS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_WEIGHT_MAPS_KEPT = 4


def _keep_recent(memo: "collections.OrderedDict", key, value) -> None:
    """Put ``value`` in ``memo`` under ``key``; drop the oldest entries beyond ``_WEIGHT_MAPS_KEPT``."""
    memo[key] = value
    while len(memo) > _WEIGHT_MAPS_KEPT:
        memo.popitem(last=False)


def _weight_map_of(directory: str, names: Dict[str, str]) -> Tuple[list, Tuple[str, ...], Dict[str, str]]:
    key = (directory, id(names))
    hit = _WEIGHT_MAPS.get(key)
    if hit is not None and hit[0] is names:
        _WEIGHT_MAPS.move_to_end(key)
        return hit[1], hit[2], hit[3]
    shards = sorted(set(names.values()))
    # One path object per shard, shared by ``files`` and every weight-map entry: no join
    # per tensor, and comparisons against header keys stop at identity.
    paths = {s: os.path.join(directory, s) for s in shards}
    files = tuple(paths[s] for s in shards)
    weight_map = {tensor: paths[shard] for tensor, shard in names.items()}
    _keep_recent(_WEIGHT_MAPS, key, (names, shards, files, weight_map))
    return shards, files, weight_map


def _safetensors_names(directory: str) -> list:
    """The names upstream's ``glob("*.safetensors")`` lists in ``directory``, sorted."""
    try:
        entries = os.listdir(directory)
    except OSError as e:
        raise CheckpointIndexError(directory, f"cannot list checkpoint directory: {e.strerror or e}") from None
    return sorted(n for n in entries if n.endswith(SHARD_SUFFIX) and not n.startswith("."))


def _without_consolidated(names: list) -> list:
    """Upstream's rule for Mistral releases without an index: of exactly a
    ``consolidated.safetensors`` and a ``model.safetensors``, only the latter is loaded."""
    if len(names) == 2 and names[0].endswith("consolidated.safetensors") and names[1].endswith("model.safetensors"):
        return names[1:]
    return names


def resolve_checkpoint_files(directory: str) -> CheckpointFiles:
    """List the shards to load from ``directory`` and the index's weight map, if any.

    Raises:
        CheckpointIndexError: no such directory, no safetensors file, an index upstream
            cannot read or naming a file that does not exist, or a shard that is not a
            readable regular file (naming it).
    """
    directory = os.path.abspath(os.fspath(directory))
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise CheckpointIndexError(directory, "checkpoint directory does not exist") from None
    except OSError as e:
        raise CheckpointIndexError(directory, f"cannot access checkpoint directory: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointIndexError(directory, "checkpoint path is not a directory")
    names = _safetensors_names(directory)
    index = os.path.join(directory, INDEX_NAME)

    if os.path.isfile(index):  # upstream's test: a regular file, links followed
        index_path, weights = _read_index(directory)
        named, files, weight_map = _weight_map_of(directory, weights)
        missing = [n for n in named if not os.path.isfile(os.path.join(directory, n))]
        if missing:  # upstream refuses these too ("references shard file(s) missing")
            label = f"shard {_short(missing[0])} named by the index"
            if os.path.lexists(os.path.join(directory, missing[0])):
                _check_member(directory, missing[0], index_path, label)  # says what it is instead
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointIndexError(index_path, f"{label} does not exist in {directory}{more}")
        chosen = set(names)
        files = tuple(f for n, f in zip(named, files) if n in chosen)
        if not files:
            raise CheckpointIndexError(
                index_path, f"the index names no *{SHARD_SUFFIX} file of {directory} (it names {_short(named)})"
            )
        for path in files:
            name = os.path.basename(path)
            _check_member(directory, name, index_path, f"shard {name!r} named by the index")
        others = [n for n in named if n not in chosen]
        note = None
        if others:
            listed = ", ".join(map(repr, others[:5])) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            note = (f"{index_path} also names {listed}, which upstream's loader does not load either "
                    f"(not a *{SHARD_SUFFIX} file of the directory): skipped")
        return CheckpointFiles(directory, files, weight_map, index_path, note)

    note = None
    if os.path.lexists(index):
        note = (f"{index} is not a regular file (a dangling link or a directory): loading every "
                f"*{SHARD_SUFFIX} file of the directory, as upstream's loader does")
    if not names:
        raise CheckpointIndexError(
            directory, f"no safetensors files (*{SHARD_SUFFIX}) and no {INDEX_NAME} in the directory"
        )
    files = tuple(
        _check_member(directory, s, os.path.join(directory, s), f"shard {s!r}") for s in _without_consolidated(names)
    )
    return CheckpointFiles(directory, files, None, None, note)


def check_weight_map(files: CheckpointFiles, headers: Mapping[str, SafetensorsHeader]) -> Optional[str]:
    """Check that no tensor name is in two shards, and say where the index disagrees with them.

    ``headers`` maps each path of ``files.files`` to its header. Upstream's loader uses the
    index only to choose the shards (every one must exist: ``resolve_checkpoint_files``), then
    loads every tensor each chosen shard holds, wherever the index says it is; so does this
    loader, and an index that maps a tensor elsewhere, names one no shard holds, or misses one
    (a trainer that kept a base model's index, or dropped a tied ``lm_head``) is only noted.
    What the model needs is checked by the replay against the headers. A tensor in two shards
    is refused: upstream would keep whichever file comes last, without a word.

    Returns:
        None, or a note naming the first tensor on which the index and the headers disagree
        and how many do.

    Raises:
        CheckpointIndexError: a tensor name in two shards, naming the second shard and the tensor.
    """
    missing = [f for f in files.files if f not in headers]
    if missing:
        raise ValueError(f"check_weight_map: no header given for {missing}")
    # An RL job checks the same index against the same headers every step: the map and the
    # headers' tensor tables are the memoized objects, so a pair checked before gives the same answer.
    tables = tuple(headers[f].tensors for f in files.files)
    key = (id(files.weight_map), files.files, tuple(map(id, tables)))
    checked = _CHECKED_WEIGHT_MAPS.get(key)
    if checked is not None and checked[0] is files.weight_map and all(map(operator.is_, checked[1], tables)):
        _CHECKED_WEIGHT_MAPS.move_to_end(key)
        return checked[2]
    note = _check_weight_map(files, headers)
    _keep_recent(_CHECKED_WEIGHT_MAPS, key, (files.weight_map, tables, note))  # holds them: the ids stay theirs
    return note


# (id of the weight map, shard paths, ids of the headers' tensor tables) of checks made, with their notes.
_CHECKED_WEIGHT_MAPS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def _check_weight_map(files: CheckpointFiles, headers: Mapping[str, SafetensorsHeader]) -> Optional[str]:
    owner: Dict[str, str] = {}
    for shard in files.files:
        for name in headers[shard].tensors:
            if name in owner:
                raise CheckpointIndexError(
                    shard,
                    f"tensor is also in {owner[name]}; a tensor may appear in only one shard "
                    f"(upstream's loader would keep the last file's without a word)",
                    name,
                )
            owner[name] = shard
    weight_map = files.weight_map
    if weight_map is None or weight_map == owner:
        return None
    index_path = files.index_path or os.path.join(files.directory, INDEX_NAME)
    disagree = [(name, shard, weight_map.get(name)) for name, shard in owner.items() if weight_map.get(name) != shard]
    disagree += [(name, None, shard) for name, shard in weight_map.items() if name not in owner]
    name, held, mapped = disagree[0]
    where = (f"{name!r} is in shard {os.path.basename(held)}" if held else f"{name!r} is in no shard") + (
        f" but the index maps it to {os.path.basename(mapped)}" if mapped else " but the index does not name it")
    return (f"{index_path} disagrees with the shards on {len(disagree)} tensor(s), e.g. {where}; every tensor "
            f"is loaded from the shard that holds it, as upstream's loader does")
