"""Checkpoint directories: shard discovery, the index, symlink policy, index/header agreement."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from sglang_fastload.checkpoint import checkpoint_files as cf
from sglang_fastload.checkpoint.checkpoint_files import (
    INDEX_NAME,
    CheckpointFiles,
    check_weight_map,
    parse_index,
    resolve_checkpoint_files,
    weights_format,
)
from sglang_fastload.checkpoint.safetensors_header import read_header
from sglang_fastload.errors import CheckpointError, CheckpointIndexError

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
SHARD1_TENSORS = ("embed.weight", "layers.0.weight")
SHARD2_TENSORS = ("layers.1.weight", "lm_head.weight")


def write_shard(path, names):
    save_file({n: torch.full((2, 2), float(i), dtype=torch.bfloat16) for i, n in enumerate(names)}, str(path))
    return path


def write_index(directory, weight_map, extra=None):
    body = {"metadata": {"total_size": 32}, "weight_map": weight_map}
    body.update(extra or {})
    path = directory / INDEX_NAME
    path.write_text(json.dumps(body))
    return path


def default_map():
    wm = {n: SHARD1 for n in SHARD1_TENSORS}
    wm.update({n: SHARD2 for n in SHARD2_TENSORS})
    return wm


@pytest.fixture
def sharded(tmp_path):
    """A two-shard checkpoint with an index, as Hugging Face writes it."""
    d = tmp_path / "ckpt"
    d.mkdir()
    write_shard(d / SHARD1, SHARD1_TENSORS)
    write_shard(d / SHARD2, SHARD2_TENSORS)
    write_index(d, default_map())
    return d


def headers_of(files: CheckpointFiles):
    return {f: read_header(f) for f in files.files}


# ------------------------------------------------------------------------- happy paths


def test_single_file_without_index(tmp_path):
    write_shard(tmp_path / "model.safetensors", ["w"])
    files = resolve_checkpoint_files(str(tmp_path))
    assert files == CheckpointFiles(str(tmp_path), (str(tmp_path / "model.safetensors"),), None, None)
    check_weight_map(files, headers_of(files))


def test_files_sorted_and_filtered_without_index(tmp_path):
    for name in ["b.safetensors", "a.safetensors", "c.safetensors"]:
        write_shard(tmp_path / name, [name])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / ".hidden.safetensors").write_bytes(b"junk")
    (tmp_path / "sub").mkdir()
    write_shard(tmp_path / "sub" / "deep.safetensors", ["deep"])
    files = resolve_checkpoint_files(str(tmp_path))
    assert files.files == tuple(str(tmp_path / n) for n in ["a.safetensors", "b.safetensors", "c.safetensors"])
    assert files.weight_map is None and files.index_path is None


def test_with_index(sharded):
    (sharded / "consolidated.safetensors").write_bytes(b"not even a safetensors file")
    files = resolve_checkpoint_files(str(sharded))
    assert files.directory == str(sharded)
    assert files.index_path == str(sharded / INDEX_NAME)
    # Only the shards the index names, like SGLang; sorted by name.
    assert files.files == (str(sharded / SHARD1), str(sharded / SHARD2))
    assert files.weight_map == {n: str(sharded / s) for n, s in default_map().items()}
    check_weight_map(files, headers_of(files))


def test_relative_directory_becomes_absolute(sharded, monkeypatch):
    monkeypatch.chdir(sharded.parent)
    files = resolve_checkpoint_files("ckpt")
    assert files.directory == str(sharded)
    assert all(os.path.isabs(f) for f in files.files)


def test_index_with_one_shard_among_several(tmp_path):
    write_shard(tmp_path / SHARD1, ["a"])
    write_shard(tmp_path / SHARD2, ["b"])
    write_index(tmp_path, {"a": SHARD1})
    files = resolve_checkpoint_files(str(tmp_path))
    assert files.files == (str(tmp_path / SHARD1),)


def test_index_naming_files_upstream_does_not_load_chooses_only_the_directorys_shards(sharded, tmp_path):
    """Upstream joins each name the index gives to the directory, requires it to exist, and
    loads only the directory's own *.safetensors files among them: a value head kept as a
    .bin, a hidden file, one in a subfolder or outside are never read, only noted."""
    (sharded / "value_head.bin").write_bytes(b"pickle")
    (sharded / ".hidden.safetensors").write_bytes(b"junk")
    (sharded / "extras").mkdir()
    write_shard(sharded / "extras" / "v.safetensors", ["v_head.weight"])
    outside = write_shard(tmp_path / "outside.safetensors", ["v_head.bias"])
    extra = {"v_head.a": "value_head.bin", "v_head.b": ".hidden.safetensors", "v_head.c": "extras/v.safetensors",
             "v_head.d": str(outside), "v_head.e": f"../{outside.name}"}
    write_index(sharded, {**default_map(), **extra})
    files = resolve_checkpoint_files(str(sharded))
    assert files.files == (str(sharded / SHARD1), str(sharded / SHARD2))
    for name in ("value_head.bin", ".hidden.safetensors", "extras/v.safetensors", "outside.safetensors"):
        assert name in files.note, files.note
    assert files.note.startswith(str(sharded / INDEX_NAME))
    note = check_weight_map(files, headers_of(files))  # the unloaded names hold no tensor of the shards
    assert note is not None and "v_head." in note


@pytest.mark.parametrize("index_kind", ["dangling-link", "directory"])
def test_an_index_that_is_not_a_regular_file_is_no_index_as_upstream_sees_it(sharded, index_kind):
    index = sharded / INDEX_NAME
    index.unlink()
    if index_kind == "dangling-link":
        index.symlink_to(sharded / "gone.json")
    else:
        index.mkdir()
    write_shard(sharded / "extra.safetensors", ["extra.weight"])
    files = resolve_checkpoint_files(str(sharded))
    # upstream's os.path.isfile(index) is False: every *.safetensors file loads
    assert files.files == tuple(str(sharded / n) for n in ("extra.safetensors", SHARD1, SHARD2))
    assert files.weight_map is None and files.index_path is None
    assert str(index) in files.note and "not a regular file" in files.note


def test_consolidated_beside_model_without_index_loads_model_only_as_upstream(tmp_path):
    """Upstream's rule for Mistral releases: of exactly consolidated.safetensors and
    model.safetensors (same tensors twice), only model.safetensors."""
    write_shard(tmp_path / "consolidated.safetensors", ["a", "b"])
    write_shard(tmp_path / "model.safetensors", ["a", "b"])
    files = resolve_checkpoint_files(str(tmp_path))
    assert files.files == (str(tmp_path / "model.safetensors"),)
    check_weight_map(files, headers_of(files))  # no tensor in two loaded shards
    write_shard(tmp_path / "other.safetensors", ["c"])  # three files: the rule does not apply
    assert len(resolve_checkpoint_files(str(tmp_path)).files) == 3


def test_bin_weights_beside_a_leftover_safetensors_index_are_bin_weights(tmp_path):
    """Upstream globs *.safetensors first, then *.bin; an index alone is no safetensors file."""
    torch.save({"a": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    write_index(tmp_path, {"a": SHARD1})
    assert weights_format(str(tmp_path)) == "bin"
    write_shard(tmp_path / SHARD1, ["a"])
    assert weights_format(str(tmp_path)) == "safetensors"


# ------------------------------------------------------------------ directory errors


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointIndexError, match="checkpoint directory does not exist") as info:
        resolve_checkpoint_files(str(tmp_path / "nope"))
    assert info.value.path == str(tmp_path / "nope")


def test_not_a_directory(tmp_path):
    f = write_shard(tmp_path / "model.safetensors", ["w"])
    with pytest.raises(CheckpointIndexError, match="not a directory"):
        resolve_checkpoint_files(str(f))


@pytest.mark.parametrize("contents", [[], ["model.bin", "config.json"], [".hidden.safetensors"]])
def test_no_safetensors_files(tmp_path, contents):
    for name in contents:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(CheckpointIndexError, match="no safetensors files") as info:
        resolve_checkpoint_files(str(tmp_path))
    assert info.value.path == str(tmp_path)


def test_safetensors_name_that_is_a_directory(tmp_path):
    (tmp_path / "weird.safetensors").mkdir()
    with pytest.raises(CheckpointIndexError, match="is not a regular file"):
        resolve_checkpoint_files(str(tmp_path))


# ----------------------------------------------------------------------- index rules
#
# Rows: id, index file bytes (or a JSON-able object), expected fragment, tensor named.

INDEX_RULES = [
    ("not-utf8", b'{"weight_map": {"\xff": "a.safetensors"}}', "index is not valid UTF-8", None),
    ("not-json", b"{weight_map: 1}", "index is not valid JSON", None),
    ("empty-file", b"", "index is not valid JSON", None),
    ("too-deep", b"[" * 100000 + b"]" * 100000, "nested too deeply", None),
    ("array", [], "index JSON must be an object, got list", None),
    ("no-weight-map", {"metadata": {}}, "index has no 'weight_map'", None),
    ("weight-map-list", {"weight_map": [SHARD1]}, "'weight_map' must be an object", None),
    ("weight-map-null", {"weight_map": None}, "'weight_map' must be an object", None),
    ("weight-map-empty", {"weight_map": {}}, "'weight_map' is empty", None),
    ("value-not-string", {"weight_map": {"a": 1}}, "weight_map value must be a shard file name (string), got 1", "a"),
    ("value-list", {"weight_map": {"a": [SHARD1]}}, "must be a shard file name", "a"),
    ("repeated-weight-map-last-empty", b'{"weight_map": {"a": "x.safetensors"}, "weight_map": {}}', "'weight_map' is empty", None),
    # Any name is joined to the directory as upstream joins it, and must exist there (upstream:
    # "references shard file(s) missing"); nothing it names outside is ever loaded.
    ("parent-dir", {"weight_map": {"a": "../x.safetensors"}}, "shard '../x.safetensors' named by the index does not exist", None),
    ("absolute", {"weight_map": {"a": "/nonexistent/x.safetensors"}}, "named by the index does not exist", None),
    ("subfolder", {"weight_map": {"a": "sub/x.safetensors"}}, "named by the index does not exist", None),
    ("backslash", {"weight_map": {"a": "..\\x.safetensors"}}, "named by the index does not exist", None),
    ("dotdot", {"weight_map": {"a": ".."}}, "shard '..' named by the index", None),  # a directory:
    ("dot", {"weight_map": {"a": "."}}, "is not a regular file", None),  # said so
    ("empty-name", {"weight_map": {"a": ""}}, "shard '' named by the index", None),
    ("hidden", {"weight_map": {"a": ".x.safetensors"}}, "named by the index does not exist", None),
    ("not-safetensors", {"weight_map": {"a": "pytorch_model-00001.bin"}}, "named by the index does not exist", None),
    ("nul", {"weight_map": {"a": "x\x00.safetensors"}}, "named by the index does not exist", None),
    ("surrogate-shard", b'{"weight_map": {"a": "\\udc80.safetensors"}}', "named by the index does not exist", None),
    ("surrogate-tensor", b'{"weight_map": {"\\ud800": "x.safetensors"}}', "shard 'x.safetensors' named by the index does not exist", None),
    ("only-unloaded-files", {"weight_map": {"a": "dir.safetensors/../model-00001-of-00002.safetensors"}}, "the index names no *.safetensors file of", None),
    ("missing-shard", {"weight_map": {"a": SHARD1, "b": "model-00003-of-00002.safetensors"}}, "shard 'model-00003-of-00002.safetensors' named by the index does not exist", None),
    ("shard-is-directory", {"weight_map": {"a": "dir.safetensors"}}, "shard 'dir.safetensors' named by the index", None),
    ("shard-is-directory-said-so", {"weight_map": {"a": "dir.safetensors"}}, "is not a regular file", None),
]


@pytest.mark.parametrize("content, fragment, tensor", [pytest.param(*r[1:], id=r[0]) for r in INDEX_RULES])
def test_index_rule(tmp_path, content, fragment, tensor):
    write_shard(tmp_path / SHARD1, ["a"])
    (tmp_path / "dir.safetensors").mkdir()
    index = tmp_path / INDEX_NAME
    index.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(CheckpointIndexError) as info:
        resolve_checkpoint_files(str(tmp_path))
    err = info.value
    assert fragment in str(err), str(err)
    assert err.path == str(index)
    assert err.tensor == tensor
    assert str(err).startswith(str(index) + ": ")


def test_index_rule_ids_unique():
    assert len({r[0] for r in INDEX_RULES}) == len(INDEX_RULES)


def test_parse_index_directly():
    assert parse_index("i.json", b'{"weight_map": {"a": "x.safetensors"}, "metadata": {"total_size": NaN}}') == {
        "a": "x.safetensors"
    }
    with pytest.raises(CheckpointIndexError, match="not valid JSON"):
        parse_index("i.json", b'{"weight_map": {"a": "x.safetensors"}, "n": ' + b"9" * 5000 + b"}")


def test_repeated_index_keys_keep_their_last_value_as_upstreams_json_load():
    """Upstream reads the index with ``json.load``: a repeated key keeps its last value."""
    text = b'{"weight_map": {"a": "x.safetensors", "b": "x.safetensors", "a": "y.safetensors"}}'
    assert parse_index("i.json", text) == json.loads(text)["weight_map"] == {"a": "y.safetensors", "b": "x.safetensors"}
    text = b'{"weight_map": {}, "metadata": {}, "weight_map": {"a": "x.safetensors"}}'
    assert parse_index("i.json", text) == {"a": "x.safetensors"}


def test_index_size_bound_checked_before_reading(tmp_path, monkeypatch):
    write_shard(tmp_path / SHARD1, ["a"])
    write_index(tmp_path, {"a": SHARD1}, extra={"padding": "x" * 1000})
    monkeypatch.setattr(cf, "MAX_INDEX_BYTES", 100)
    read_calls = []
    real_open = open

    def spy_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if str(path).endswith(INDEX_NAME):
            real_read = f.read

            class Spy:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def fileno(self):
                    return f.fileno()

                def read(self, *a):
                    read_calls.append(a)
                    return real_read(*a)

            return Spy()
        return f

    monkeypatch.setattr("builtins.open", spy_open)
    with pytest.raises(CheckpointIndexError, match="more than the limit of 100") as info:
        resolve_checkpoint_files(str(tmp_path))
    assert info.value.path == str(tmp_path / INDEX_NAME)
    assert read_calls == []


def test_index_errors_are_checkpoint_errors(tmp_path):
    (tmp_path / INDEX_NAME).write_text("[]")
    with pytest.raises(CheckpointError):
        resolve_checkpoint_files(str(tmp_path))


# --------------------------------------------------------------------------- symlinks


def test_symlink_to_file_inside_directory_accepted(tmp_path):
    write_shard(tmp_path / "real.bin", ["w"])  # not *.safetensors: only the link is listed
    os.symlink("real.bin", tmp_path / "model.safetensors")
    files = resolve_checkpoint_files(str(tmp_path))
    # The path stays the link's path (not resolved).
    assert files.files == (str(tmp_path / "model.safetensors"),)
    read_header(files.files[0])


def test_absolute_symlink_inside_directory_accepted(tmp_path):
    (tmp_path / "store").mkdir()
    write_shard(tmp_path / "store" / "blob", ["w"])
    os.symlink(str(tmp_path / "store" / "blob"), tmp_path / "model.safetensors")
    assert resolve_checkpoint_files(str(tmp_path)).files == (str(tmp_path / "model.safetensors"),)


def step_dirs(tmp_path):
    """A checkpoint manager's layout: step-12 links its unchanged shard to step-11's file."""
    old, new = tmp_path / "step-11", tmp_path / "step-12"
    old.mkdir()
    new.mkdir()
    write_shard(old / SHARD1, SHARD1_TENSORS)
    write_shard(new / SHARD2, SHARD2_TENSORS)
    os.symlink(f"../step-11/{SHARD1}", new / SHARD1)
    write_index(new, default_map())
    return old, new


def test_symlink_to_previous_step_directory_followed(tmp_path):
    old, new = step_dirs(tmp_path)
    files = resolve_checkpoint_files(str(new))
    # The path stays the link's path; reading it reads the previous step's file.
    assert files.files == (str(new / SHARD1), str(new / SHARD2))
    headers = headers_of(files)
    check_weight_map(files, headers)
    assert set(headers[str(new / SHARD1)].tensors) == set(SHARD1_TENSORS)


def test_symlink_to_file_anywhere_followed(tmp_path):
    """Upstream follows any link; whoever can plant a link can plant weights too."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (tmp_path / "store" / "deep").mkdir(parents=True)
    write_shard(tmp_path / "store" / "deep" / "blob", ["w"])
    os.symlink(str(tmp_path / "store" / "deep" / "blob"), ckpt / "model.safetensors")
    assert resolve_checkpoint_files(str(ckpt)).files == (str(ckpt / "model.safetensors"),)


def test_symlink_chain_leaving_directory_followed(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_shard(tmp_path / "outside.safetensors", ["w"])
    os.symlink("../outside.safetensors", ckpt / "hop.bin")
    os.symlink("hop.bin", ckpt / "model.safetensors")
    files = resolve_checkpoint_files(str(ckpt))
    assert set(read_header(files.files[0]).tensors) == {"w"}


def test_index_symlinked_outside_followed(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    write_shard(ckpt / SHARD1, ["a"])
    write_index(tmp_path, {"a": SHARD1})
    os.symlink("../" + INDEX_NAME, ckpt / INDEX_NAME)
    files = resolve_checkpoint_files(str(ckpt))
    assert files.weight_map == {"a": str(ckpt / SHARD1)}


@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_symlink_outside_to_non_regular_file_rejected(tmp_path, kind):
    """A FIFO would hang the reader, a device would stream forever: never followed."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    if kind == "fifo":
        target = tmp_path / "pipe"
        os.mkfifo(target)
    elif kind == "device":
        target = "/dev/zero"
    else:
        target = tmp_path / "somedir"
        target.mkdir()
    os.symlink(str(target), ckpt / SHARD1)
    write_index(ckpt, {"a": SHARD1})
    with pytest.raises(CheckpointIndexError, match="not a regular file") as info:
        resolve_checkpoint_files(str(ckpt))
    assert info.value.path == str(ckpt / INDEX_NAME)
    assert SHARD1 in str(info.value)


def test_dangling_symlink_outside(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink("../step-10/model.safetensors", ckpt / "model.safetensors")  # cleaned up
    with pytest.raises(CheckpointIndexError, match="does not resolve") as info:
        resolve_checkpoint_files(str(ckpt))
    assert info.value.path == str(ckpt / "model.safetensors")


def test_dangling_symlink(tmp_path):
    os.symlink("missing.bin", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointIndexError, match="does not resolve"):
        resolve_checkpoint_files(str(tmp_path))


def test_symlink_loop(tmp_path):
    os.symlink("b.safetensors", tmp_path / "a.safetensors")
    os.symlink("a.safetensors", tmp_path / "b.safetensors")
    with pytest.raises(CheckpointIndexError, match="does not resolve"):
        resolve_checkpoint_files(str(tmp_path))


def test_symlink_to_directory_inside_rejected_as_not_file(tmp_path):
    (tmp_path / "d").mkdir()
    os.symlink("d", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointIndexError, match="not a regular file"):
        resolve_checkpoint_files(str(tmp_path))


def test_directory_given_through_symlink(tmp_path, sharded):
    link = tmp_path / "link-to-ckpt"
    os.symlink(str(sharded), link)
    files = resolve_checkpoint_files(str(link))
    assert files.directory == str(link)
    assert files.files == (str(link / SHARD1), str(link / SHARD2))


def make_hf_cache(root, repo="models--org--name", rev="0123abcd", subfolder=None, absolute=False):
    """A Hugging Face hub cache entry: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo_dir = root / repo
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot = repo_dir / "snapshots" / rev
    if subfolder:
        snapshot = snapshot / subfolder
    snapshot.mkdir(parents=True)
    depth = 2 + (1 if subfolder else 0)
    up = "/".join([".."] * depth)

    def link(name, blob_hash, write):
        write(blobs / blob_hash)
        target = str(blobs / blob_hash) if absolute else f"{up}/blobs/{blob_hash}"
        os.symlink(target, snapshot / name)

    link(SHARD1, "a" * 64, lambda p: write_shard(p, SHARD1_TENSORS))
    link(SHARD2, "b" * 64, lambda p: write_shard(p, SHARD2_TENSORS))
    index_text = json.dumps({"metadata": {}, "weight_map": default_map()})
    link(INDEX_NAME, "c" * 40, lambda p: p.write_text(index_text))
    return snapshot


@pytest.mark.parametrize("absolute", [False, True], ids=["relative-links", "absolute-links"])
def test_hf_cache_layout_accepted(tmp_path, absolute):
    snapshot = make_hf_cache(tmp_path / "hub", absolute=absolute)
    files = resolve_checkpoint_files(str(snapshot))
    assert files.files == (str(snapshot / SHARD1), str(snapshot / SHARD2))
    assert files.index_path == str(snapshot / INDEX_NAME)
    check_weight_map(files, headers_of(files))


def test_hf_cache_subfolder_accepted(tmp_path):
    snapshot = make_hf_cache(tmp_path / "hub", subfolder="transformer")
    files = resolve_checkpoint_files(str(snapshot))
    assert len(files.files) == 2


def test_hf_cache_blobs_dir_on_other_disk(tmp_path):
    """<repo>/blobs itself a symlink (cache spread over disks) is still the repo's blobs."""
    snapshot = make_hf_cache(tmp_path / "hub")
    blobs = tmp_path / "hub" / "models--org--name" / "blobs"
    os.rename(blobs, tmp_path / "other-disk")
    os.symlink(str(tmp_path / "other-disk"), blobs)
    assert len(resolve_checkpoint_files(str(snapshot)).files) == 2


def test_hf_cache_link_into_other_repo_followed(tmp_path):
    """A link is followed wherever it leads, the hub cache's own layout included."""
    hub = tmp_path / "hub"
    snapshot = make_hf_cache(hub)
    other = make_hf_cache(hub, repo="models--other--repo")
    other_blob = other.parent.parent / "blobs" / ("a" * 64)
    os.remove(snapshot / SHARD1)
    os.symlink(f"../../../models--other--repo/blobs/{other_blob.name}", snapshot / SHARD1)
    assert len(resolve_checkpoint_files(str(snapshot)).files) == 2


# ------------------------------------------------------------------ weights_format


@pytest.mark.parametrize(
    "contents,expected",
    [
        ([SHARD1], "safetensors"),
        ([INDEX_NAME], None),  # an index alone names no weights upstream globs
        (["model.safetensors", "pytorch_model.bin"], "safetensors"),  # upstream prefers safetensors
        (["pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"], "bin"),
        (["model.pt"], "pt"),
        (["training_args.bin", "config.json"], None),  # upstream never loads it as weights
        ([".hidden.safetensors"], None),
        ([], None),
    ],
)
def test_weights_format_finds_what_upstream_would_load(tmp_path, contents, expected):
    for name in contents:
        (tmp_path / name).write_bytes(b"x")
    assert cf.weights_format(str(tmp_path)) == expected


# ----------------------------------------------------------------- check_weight_map


def test_repeated_checks_reuse_the_map_and_still_catch_a_changed_shard_or_index(sharded):
    # Updates re-resolve and re-check the same files every step: the map is made once, a pair
    # checked before is not checked again, and a rewritten shard or index is checked afresh.
    first = resolve_checkpoint_files(str(sharded))
    assert check_weight_map(first, headers_of(first)) is None
    again = resolve_checkpoint_files(str(sharded))
    assert again.weight_map is first.weight_map
    assert check_weight_map(again, headers_of(again)) is None
    write_shard(sharded / SHARD2, SHARD2_TENSORS + ("extra.weight",))  # same index, new header
    assert "'extra.weight' is in shard" in check_weight_map(again, headers_of(again))
    write_shard(sharded / SHARD2, SHARD2_TENSORS + (SHARD1_TENSORS[0],))  # now in two shards
    with pytest.raises(CheckpointIndexError, match="tensor is also in"):
        check_weight_map(again, headers_of(again))
    write_shard(sharded / SHARD2, SHARD2_TENSORS)
    wm = default_map()
    wm["embed.weight"] = SHARD2  # new index, the same headers as the pair that passed
    write_index(sharded, wm)
    moved = resolve_checkpoint_files(str(sharded))
    assert moved.weight_map is not first.weight_map
    assert "but the index maps it to" in check_weight_map(moved, headers_of(moved))


# Upstream's loader uses the index only to choose the shards, then loads every tensor each
# holds: an index that disagrees with the headers is noted, and each tensor loads from the
# shard that holds it.


def test_check_weight_map_tensor_missing_from_index(tmp_path):
    write_shard(tmp_path / SHARD1, SHARD1_TENSORS + ("extra.weight",))
    write_shard(tmp_path / SHARD2, SHARD2_TENSORS)
    write_index(tmp_path, default_map())
    files = resolve_checkpoint_files(str(tmp_path))
    note = check_weight_map(files, headers_of(files))
    assert note.startswith(str(tmp_path / INDEX_NAME)) and "on 1 tensor(s)" in note
    assert f"'extra.weight' is in shard {SHARD1} but the index does not name it" in note


def test_check_weight_map_tensor_missing_from_shard(tmp_path):
    write_shard(tmp_path / SHARD1, SHARD1_TENSORS[:1])
    write_shard(tmp_path / SHARD2, SHARD2_TENSORS)
    write_index(tmp_path, default_map())
    files = resolve_checkpoint_files(str(tmp_path))
    note = check_weight_map(files, headers_of(files))
    assert f"{SHARD1_TENSORS[1]!r} is in no shard but the index maps it to {SHARD1}" in note


def test_check_weight_map_tensor_in_wrong_shard(tmp_path):
    write_shard(tmp_path / SHARD1, SHARD1_TENSORS)
    write_shard(tmp_path / SHARD2, SHARD2_TENSORS)
    wm = default_map()
    wm["embed.weight"] = SHARD2
    write_index(tmp_path, wm)
    files = resolve_checkpoint_files(str(tmp_path))
    note = check_weight_map(files, headers_of(files))
    assert f"'embed.weight' is in shard {SHARD1} but the index maps it to {SHARD2}" in note


def test_check_weight_map_tensor_in_two_shards_with_index(tmp_path):
    write_shard(tmp_path / SHARD1, SHARD1_TENSORS)
    write_shard(tmp_path / SHARD2, SHARD2_TENSORS + ("embed.weight",))
    write_index(tmp_path, default_map())
    files = resolve_checkpoint_files(str(tmp_path))
    with pytest.raises(CheckpointIndexError, match=f"tensor is also in .*{SHARD1}") as info:
        check_weight_map(files, headers_of(files))
    assert info.value.tensor == "embed.weight"
    assert info.value.path == str(tmp_path / SHARD2)


def test_check_weight_map_duplicate_without_index(tmp_path):
    write_shard(tmp_path / "a.safetensors", ["w", "x"])
    write_shard(tmp_path / "b.safetensors", ["w"])
    files = resolve_checkpoint_files(str(tmp_path))
    with pytest.raises(CheckpointIndexError, match="tensor is also in .*a.safetensors") as info:
        check_weight_map(files, headers_of(files))
    assert info.value.tensor == "w"
    assert info.value.path == str(tmp_path / "b.safetensors")


def test_check_weight_map_needs_every_header(sharded):
    files = resolve_checkpoint_files(str(sharded))
    headers = headers_of(files)
    headers.pop(files.files[0])
    with pytest.raises(ValueError, match="no header given"):
        check_weight_map(files, headers)


def test_index_memo_is_bounded_by_bytes(tmp_path, monkeypatch):
    import collections

    monkeypatch.setattr(cf, "_INDEX_MEMO", collections.OrderedDict())
    monkeypatch.setattr(cf, "_index_memo_bytes", 0)
    monkeypatch.setattr(cf, "INDEX_MEMO_MAX_BYTES", 8 << 10)
    d = tmp_path / "ckpt"
    d.mkdir()
    write_shard(d / SHARD1, SHARD1_TENSORS)
    write_shard(d / SHARD2, SHARD2_TENSORS)
    for step in range(40):  # a writer that stamps the step into the index
        write_index(d, default_map(), extra={"metadata": {"total_size": 32, "step": step}})
        assert resolve_checkpoint_files(str(d)).weight_map[SHARD1_TENSORS[0]] == str(d / SHARD1)
        assert cf._index_memo_bytes <= 8 << 10
    assert 1 <= len(cf._INDEX_MEMO) < 40
    assert cf._index_memo_bytes == sum(cost for _, cost in cf._INDEX_MEMO.values())
