"""Ways to damage a copy of a checkpoint, each the way a real bad checkpoint looks on disk."""

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def copy_checkpoint(src, dst) -> Path:
    dst = Path(dst)
    shutil.copytree(src, dst)
    return dst


def shards(ckpt) -> list:
    return sorted(Path(ckpt).glob("*.safetensors"))


def read_raw(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_raw(path, header, body):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + body)


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def rewrite_tensors(path, mutate):
    """Load a shard, let ``mutate(dict)`` change it, save it back (valid safetensors)."""
    tensors = load_file(str(path))
    mutate(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def update_index(ckpt, mutate):
    index = Path(ckpt) / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        mutate(data["weight_map"])
        index.write_text(json.dumps(data))


def truncate(ckpt):
    path = shards(ckpt)[-1]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 64)
    return path.name, None


def header_length_too_large(ckpt):
    path = shards(ckpt)[0]
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    path.write_bytes(bytes(data))
    return path.name, None


def header_not_json(ckpt):
    path = shards(ckpt)[0]
    data = bytearray(path.read_bytes())
    data[8] = ord("x")
    path.write_bytes(bytes(data))
    return path.name, None


def offsets_past_end(ckpt):
    path = shards(ckpt)[0]
    header, body = read_raw(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    last = names[-1]
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin + 1024, end + 1024]
    write_raw(path, header, body)
    return path.name, last


def overlapping_offsets(ckpt):
    path = shards(ckpt)[0]
    header, body = read_raw(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = names[0], names[1]
    header[b] = dict(header[b], data_offsets=list(header[a]["data_offsets"]), shape=header[a]["shape"], dtype=header[a]["dtype"])
    write_raw(path, header, body)
    return path.name, None


def missing_tensor(ckpt):
    path = shards(ckpt)[0]
    name = sorted(load_file(str(path)))[0]
    rewrite_tensors(path, lambda t: t.pop(name))
    update_index(ckpt, lambda m: m.pop(name, None))
    return None, name


def unknown_tensor(ckpt):
    path = shards(ckpt)[0]
    name = "model.layers.0.mlp.surprise.weight"
    rewrite_tensors(path, lambda t: t.__setitem__(name, torch.zeros(4, 4, dtype=torch.bfloat16)))
    update_index(ckpt, lambda m: m.__setitem__(name, path.name))
    return path.name, name


def _matrix(tensors):
    return next(k for k in sorted(tensors) if tensors[k].dim() == 2 and "norm" not in k)


def wrong_shape(ckpt):
    path = shards(ckpt)[0]
    tensors = load_file(str(path))
    name = _matrix(tensors)

    def grow(t):
        t[name] = torch.cat([t[name], t[name][:1]], dim=0)

    rewrite_tensors(path, grow)
    return path.name, name


def integer_dtype(ckpt):
    """Integers where a float weight belongs: upstream's copy_ would serve their raw values."""
    path = shards(ckpt)[0]
    name = _matrix(load_file(str(path)))
    rewrite_tensors(path, lambda t: t.__setitem__(name, (t[name] * 100).to(torch.int16)))
    return path.name, name


def index_names_missing_shard(ckpt):
    shard = "model-99999-of-99999.safetensors"
    index = Path(ckpt) / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = shard
    index.write_text(json.dumps(data))
    return shard, None


def empty_directory(ckpt):
    for p in Path(ckpt).iterdir():
        p.unlink()
    return None, None


def config_naming_another_architecture(ckpt):
    """A mislabelled config.json (upstream's update never reads it): the weights are B's."""
    path = Path(ckpt) / "config.json"
    config = json.loads(path.read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    path.write_text(json.dumps(config))


DAMAGES = {
    "truncated_shard": truncate,
    "header_length_larger_than_file": header_length_too_large,
    "header_not_json": header_not_json,
    "offsets_past_end_of_file": offsets_past_end,
    "overlapping_offsets": overlapping_offsets,
    "missing_tensor": missing_tensor,
    "wrong_shape": wrong_shape,
    "integer_dtype": integer_dtype,
    "index_names_missing_shard": index_names_missing_shard,
    "empty_directory": empty_directory,
}


# ---------------------------------------------------------------------------------------
# Changes upstream loads correctly: a fast server must accept them too (same weights).


def float32_weights(ckpt):
    """fp32 master weights, as many trainers save them (exact in bf16 here)."""
    for path in shards(ckpt):
        rewrite_tensors(path, lambda t: t.update({k: v.to(torch.float32) for k, v in t.items()}))


def float64_norms(ckpt):
    for path in shards(ckpt):
        rewrite_tensors(path, lambda t: t.update({k: v.to(torch.float64) for k, v in t.items() if "norm" in k}))


def weights_only(ckpt):
    """Shards and index without config.json: the served model's config applies."""
    for p in Path(ckpt).iterdir():
        if not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json":
            p.unlink()


def value_head_and_unused_tensors(ckpt):
    """Tensors the model's loader does not consume (a PPO value head, rotary buffers)."""
    path = shards(ckpt)[-1]
    extra = {
        "v_head.summary.weight": torch.zeros(1, 128, dtype=torch.bfloat16),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16),
        "model.layers.0.mlp.surprise.weight": torch.zeros(4, 4, dtype=torch.bfloat16),
    }
    rewrite_tensors(path, lambda t: t.update(extra))
    update_index(ckpt, lambda m: m.update({k: path.name for k in extra}))


def shard_linked_to_another_directory(ckpt):
    """A checkpoint manager links an unchanged shard to the previous step's file."""
    path = shards(ckpt)[0]
    stored = Path(ckpt).parent / f"{Path(ckpt).name}-previous-step"
    stored.mkdir()
    path.rename(stored / path.name)
    path.symlink_to(Path("..") / stored.name / path.name)


def header_spellings_safetensors_reads(ckpt):
    """Tensor entries as the safetensors library also reads them: with a writer's own keys
    (ignored), written as the array [dtype, shape, data_offsets], a dtype as {"BF16": null}."""
    for path in shards(ckpt):
        header, body = read_raw(path)
        names = [name for name in header if name != "__metadata__"]
        for name in names[2:]:
            header[name] = dict(header[name], writer_offset=header[name]["data_offsets"][0], crc32="0")
        first, second = (header[n] for n in names[:2])
        header[names[0]] = [first["dtype"], first["shape"], first["data_offsets"]]
        header[names[1]] = dict(second, dtype={second["dtype"]: None})
        write_raw(path, header, body)


def index_naming_files_upstream_skips(ckpt):
    """An index that also names a value head kept as a .bin file and one in a subfolder:
    upstream requires them to exist and loads neither (not *.safetensors files of the directory)."""
    torch.save({"v_head.summary.weight": torch.zeros(1, 8)}, Path(ckpt) / "value_head.bin")
    (Path(ckpt) / "extras").mkdir()
    save_file({"v_head.summary.bias": torch.zeros(1)}, str(Path(ckpt) / "extras" / "v_head.safetensors"))
    update_index(ckpt, lambda m: m.update({"v_head.summary.weight": "value_head.bin",
                                           "v_head.summary.bias": "extras/v_head.safetensors"}))


def index_left_dangling(ckpt):
    """The index is a link to a file that is gone: for upstream there is no index."""
    index = Path(ckpt) / "model.safetensors.index.json"
    index.unlink()
    index.symlink_to(Path(ckpt) / "gone.index.json")


UPSTREAM_LOADS = {
    "float32_weights": float32_weights,
    "float64_norms": float64_norms,
    "weights_only_directory": weights_only,
    "unused_tensors": value_head_and_unused_tensors,
    "shard_symlinked_outside": shard_linked_to_another_directory,
    "config_naming_another_architecture": config_naming_another_architecture,
    "header_spellings_safetensors_reads": header_spellings_safetensors_reads,
    "index_naming_files_upstream_skips": index_naming_files_upstream_skips,
    "index_left_dangling": index_left_dangling,
}
