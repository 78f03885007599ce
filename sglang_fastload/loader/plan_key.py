"""The key of a stored load plan: a digest of everything a plan depends on.

A stored plan is reused only when every ingredient below is the same as when it was built,
so a plan can never be applied to a model, a placement, a checkpoint layout or a code base
it was not made for. Each ingredient errs towards changing the key: a needless rebuild
costs a second, a wrong reuse would load wrong weights.
"""

from __future__ import annotations

import array
import dataclasses
import enum
import hashlib
import json
import os
import sys
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from sglang_fastload import parallel_ranks
from sglang_fastload.module_walks import parameters_by_name, walk_modules
from sglang_fastload.loader import source_digest_cache
from sglang_fastload.loader.plan_store_location import store_dir

# Bump whenever the stored file's layout or the meaning of a plan's fields changes.
PLAN_SCHEMA_VERSION = 2

# Upstream packages whose loaded modules can change how a model is built or how its
# weight loaders slice (layers: linear/embedding/MoE loaders; model_loader: the default
# loader and weight utilities). Model modules are chosen from the model itself.
SOURCE_PACKAGES = ("sglang.srt.layers.", "sglang.srt.model_loader.")

# ServerArgs fields that cannot change how the model is built or what its loaders copy:
# where the server listens and the rendezvous of its processes (per start), the seed
# (SGLang draws one per start when none is given; a plan holds no values), the
# checkpoint's own location (the layout key covers its files; a trainer restarts from a
# new step directory), the served name, secrets (rotating a key must not cost a rebuild),
# and logging/metrics output.
SERVER_ARGS_DENY = frozenset(
    {
        "model_path", "tokenizer_path", "served_model_name", "weight_version", "download_dir",
        "host", "port", "nccl_port", "dist_init_addr", "random_seed",
        "api_key", "admin_api_key", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs",
        "ssl_keyfile_password", "watermark_key", "watermark_key_b",
        "log_level", "log_level_http", "log_requests", "log_requests_level",
        "log_requests_format", "log_requests_target", "crash_dump_folder",
        "export_metrics_to_file_dir", "otlp_traces_endpoint", "file_storage_path",
    }
)
# ... and any field naming a network port of some side service.
SERVER_ARGS_DENY_SUFFIXES = ("_port", "_ports")

# Keys of the HF config that name where it was read from, not what the model is.
CONFIG_DENY = frozenset({"_name_or_path", "_commit_hash"})

# Environment variables never part of the key: this package's own switches (they cannot
# change the model or its loaders), and names of per-start values, endpoints and secrets
# (SGLang's launcher sets SGLANG_RUN_ID to a new value at every start).
ENV_DENY_PREFIX = "SGLANG_FASTLOAD"
ENV_DENY_WORDS = ("RUN_ID", "PORT", "HOST", "ADDR", "URL", "KEY", "TOKEN", "SECRET", "PASSWORD")


def digest(ingredients: Mapping) -> str:
    """sha256 of the canonical JSON of ``ingredients`` (sorted keys, no whitespace)."""
    text = json.dumps(ingredients, sort_keys=True, separators=(",", ":"), default=_stable_repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _stable_repr(value) -> str:
    # Enums, dtypes, paths: their text. An object whose text carries its address would make
    # every key unique: never a wrong reuse, only a rebuild.
    if isinstance(value, (set, frozenset)):
        return json.dumps(sorted(map(str, value)))
    if isinstance(value, torch.Tensor):
        return _tensor_digest(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    return str(value)


def _tensor_digest(t: torch.Tensor) -> str:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return f"{t.dtype}{tuple(t.shape)}:" + hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- source files

# (path, size, mtime_ns, inode) -> content digest: each file is read once while unchanged;
# kept beside the stored plans between processes (source_digest_cache.py).
_FILE_DIGESTS: Dict[tuple, str] = {}
# The store directory whose kept digests were merged into _FILE_DIGESTS (once per process).
_DIGESTS_FROM: Optional[str] = None


def _file_digest(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"unreadable:{exc.errno}"
    memo = (path, st.st_size, st.st_mtime_ns, st.st_ino)
    cached = _FILE_DIGESTS.get(memo)
    if cached is None:
        try:
            with open(path, "rb") as f:
                cached = hashlib.sha256(f.read()).hexdigest()
        except OSError as exc:
            cached = f"unreadable:{exc.errno}"
        _FILE_DIGESTS[memo] = cached
    return cached


def package_source_digest(root: Optional[str] = None) -> str:
    """Digest of this package's own files (engine, checkpoint parsing, overlay forks).

    A changed engine must not reuse plans made by another, version bump or not; the same
    files installed elsewhere give the same digest.

    Args:
        root: the package directory (default: this installed package).
    """
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith((".py", ".json")):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode() + b"\0" + _file_digest(path).encode() + b"\n")
    return h.hexdigest()


def model_source_modules(model: torch.nn.Module, params: Optional[Dict[str, torch.nn.Parameter]] = None) -> List[str]:
    """Names of the modules whose code decides how ``model`` is built and loaded.

    Every ``sglang`` module defining a class in the MRO of the model, of any of its
    submodules or of any parameter, or a parameter's ``weight_loader``, plus every loaded
    module of ``SOURCE_PACKAGES``. ``params``: ``parameters_by_name(model)`` when the caller
    has it.
    """
    # Classes and loaders are shared by many modules and parameters: collect them first.
    # (The modules and parameters of ``model.modules()`` and ``model.parameters()``, walked
    # without a generator per level unless the model's class lists them itself.)
    model_class, own = type(model), torch.nn.Module
    modules = walk_modules(model) if model_class.modules is own.modules else model.modules()
    if model_class.parameters is own.parameters:
        every = (parameters_by_name(model) if params is None else params).values()
    else:
        every = model.parameters()
    classes = {type(m) for m in modules}
    loaders = {}  # by id: a loader object need not be hashable
    for p in every:
        classes.add(type(p))  # SGLang's parameter classes carry loading methods
        loader = getattr(p, "weight_loader", None)
        func = getattr(loader, "__func__", loader)
        loaders[id(func)] = func
    names = {c.__module__ for cls in classes for c in cls.__mro__}
    for func in loaders.values():
        module = getattr(func, "__module__", None)
        if module:
            names.add(module)
    names.update(n for n in list(sys.modules) if n.startswith(SOURCE_PACKAGES))
    return sorted(n for n in names if n == "sglang" or n.startswith("sglang."))


def modules_source_digest(module_names: Iterable[str]) -> str:
    """Digest of the source files of ``module_names`` (as loaded: overlay forks included)."""
    h = hashlib.sha256()
    for name in module_names:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        h.update(name.encode() + b"\0" + (_file_digest(path) if path else "no-file").encode() + b"\n")
    return h.hexdigest()


# --------------------------------------------------------------------------- the model


def parameter_layout(model: torch.nn.Module, params: Optional[Dict[str, torch.nn.Parameter]] = None) -> List[list]:
    """``[name, shape, dtype, tied-to index, storage offset]`` of every parameter, in order.

    The tied-to index is the position of the first parameter sharing the storage (itself
    when none does), so tying is part of the key. ``params``: ``parameters_by_name(model)``
    when the caller has it.
    """
    out = []
    first: Dict[int, int] = {}
    named = parameters_by_name(model) if params is None else params  # named_parameters' order
    for i, (name, p) in enumerate(named.items()):
        storage = p.untyped_storage()._cdata
        out.append([name, list(p.shape), str(p.dtype), first.setdefault(storage, i), p.storage_offset()])
    return out


def model_config_dict(model: torch.nn.Module) -> Optional[dict]:
    """The model's HF config as a dict, without the keys naming where it was read from."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    to_dict = getattr(config, "to_dict", None)
    data = to_dict() if callable(to_dict) else dict(vars(config))
    return {k: v for k, v in data.items() if k not in CONFIG_DENY}


def parallel_placement() -> Dict[str, Optional[int]]:
    """This process's ranks and group sizes (None where SGLang has no such group here)."""
    return parallel_ranks.placement()


def expert_location_digest() -> Optional[str]:
    """Digest of SGLang's expert-location map, when one is set (EPLB may move experts)."""
    try:
        from sglang.srt.eplb.expert_location import get_global_expert_location_metadata

        meta = get_global_expert_location_metadata()
    except Exception:
        return None
    if meta is None:
        return None
    fields = {}
    for f in dataclasses.fields(meta):
        value = getattr(meta, f.name)
        fields[f.name] = _tensor_digest(value) if isinstance(value, torch.Tensor) else value
    return digest(fields)


def server_args_dict() -> Optional[dict]:
    """Every ServerArgs field except ``SERVER_ARGS_DENY`` (None when none is published)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        args = get_server_args()
    except Exception:
        return None
    names = getattr(type(args), "__struct_fields__", None)
    if names is None:
        names = [f.name for f in dataclasses.fields(args)]
    return {
        n: getattr(args, n, None)
        for n in names
        if n not in SERVER_ARGS_DENY and not n.endswith(SERVER_ARGS_DENY_SUFFIXES)
    }


def sglang_environment() -> Dict[str, str]:
    """SGLang's own environment switches (some change which loader branch runs)."""
    return {
        k: v for k, v in os.environ.items()
        if k.startswith("SGLANG_") and not k.startswith(ENV_DENY_PREFIX)
        and not any(word in k for word in ENV_DENY_WORDS)
    }


# --------------------------------------------------------------------------- the key


@dataclasses.dataclass(frozen=True)
class LoadKnobs:
    """The load settings that shape a plan."""

    min_segment_bytes: int
    chunk_bytes: int
    target_device: str


def checkpoint_layout(headers: Mapping[str, object]) -> List[Tuple[str, str]]:
    """Per file (by base name, as plans bind files): a digest of its header's layout."""
    return [(os.path.basename(path), layout_digest(h)) for path, h in sorted(headers.items())]


def layout_digest(header) -> str:
    """sha256 of what ``SafetensorsHeader.layout_key`` holds (sizes, names, dtypes, shapes,
    offsets; not the metadata), in an encoding that decodes back to it: the names' UTF-8
    and their lengths, the dtype names, every integer as 64 bits. Per tensor a few list
    items instead of a ``repr``: half the time (6,291 tensors: 15 -> 7 ms on the CI machine kind)."""
    entries = header.tensors.values()
    ints = array.array("Q", [header.file_size, header.data_start, len(header.tensors)])
    ints.extend([x for t in entries for x in (len(t.name), t.start, t.end, len(t.shape), *t.shape)])
    h = hashlib.sha256(ints.tobytes())
    h.update(" ".join([t.dtype for t in entries]).encode())  # fixed names without spaces
    h.update("".join([t.name for t in entries]).encode())
    return h.hexdigest()


# Hex digits of the digest of a key's other ingredients that start the key (``KeyStart``).
PREFIX_DIGITS = 16


def _ingredients_but_sources(model: torch.nn.Module, knobs: LoadKnobs, headers: Mapping[str, object],
                             params: Optional[Dict[str, torch.nn.Parameter]] = None) -> Tuple[dict, List[str]]:
    """Every ingredient of the key but the digests of source files, and the SGLang modules
    whose files those digests cover.

    Raises:
        LookupError: no ServerArgs are published (the caller then skips the store); any
            other failure to determine an ingredient propagates the same way.
    """
    import sglang

    from sglang_fastload import __version__

    server_args = server_args_dict()
    if server_args is None:
        raise LookupError("no ServerArgs are published in this process")
    params = parameters_by_name(model) if params is None else params
    modules = model_source_modules(model, params)
    cls = type(model)
    return {
        "schema": PLAN_SCHEMA_VERSION,
        "package": {"version": __version__},
        "sglang": {"version": getattr(sglang, "__version__", None)},
        "torch": torch.__version__,
        "model_class": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": parameter_layout(model, params),
        "config": model_config_dict(model),
        "placement": parallel_placement(),
        "expert_location": expert_location_digest(),
        "server_args": server_args,
        "environment": sglang_environment(),
        "knobs": dataclasses.asdict(knobs),
        "checkpoint": checkpoint_layout(headers),
    }, modules


@dataclasses.dataclass(frozen=True)
class KeyStart:
    """A stored plan's key before the digests of its source files are taken.

    Those digests mean reading and hashing a few hundred files (SGLang's layer and loader
    modules, the model's, this package's: for Qwen3-8B where none was kept, 22-24 ms on a
    2-CPU machine, 27 ms profiled on an H200 host), and they only decide anything where a
    plan with every other ingredient is stored. ``prefix``, a digest of those other
    ingredients, starts the key (and the file name) of every plan stored for them: where none
    is stored, a first start looks no further and the plan's writer takes the digests
    (``complete``) off its path.

    Attributes:
        ingredients: every ingredient but the source digests, as plain data.
        module_names: the SGLang modules whose files the key covers (``model_source_modules``).
        prefix: the first ``PREFIX_DIGITS`` hex digits of ``digest(ingredients)``.
    """

    ingredients: dict
    module_names: Tuple[str, ...]
    prefix: str

    def complete(self) -> Tuple[str, str]:
        """The key and its parts, with the source digests taken now (``plan_key_and_parts``).

        Returns:
            ``("<prefix>-<digest of every ingredient>", "name=1a2b3c4d ...")``.
        """
        global _DIGESTS_FROM
        directory = store_dir()
        if directory is not None and _DIGESTS_FROM != directory:
            for memo, value in source_digest_cache.load(directory).items():
                _FILE_DIGESTS.setdefault(memo, value)
            _DIGESTS_FROM = directory
        known = len(_FILE_DIGESTS)
        ingredients = dict(self.ingredients)
        ingredients["package"] = {**ingredients["package"], "source": package_source_digest()}
        ingredients["sglang"] = {**ingredients["sglang"], "source": modules_source_digest(self.module_names)}
        if directory is not None and len(_FILE_DIGESTS) > known:  # some files were hashed
            source_digest_cache.save(directory, _FILE_DIGESTS)
        return f"{self.prefix}-{digest(ingredients)}", parts_of(ingredients)


def parts_of(ingredients: Mapping) -> str:
    """A short digest of each ingredient ("server_args=1a2b3c4d ..."): two starts that should
    share a plan but do not log different parts, naming the ingredient that changed."""
    return " ".join(f"{name}={digest({name: value})[:8]}" for name, value in sorted(ingredients.items()))


def key_start(model: torch.nn.Module, knobs: LoadKnobs, headers: Mapping[str, object],
              params: Optional[Dict[str, torch.nn.Parameter]] = None) -> KeyStart:
    """The key of a plan for ``model``, ``knobs`` and ``headers`` up to its source digests.

    Args:
        model: the live model the plan would load into.
        knobs: the loader settings that shape the plan.
        headers: ``{path: parsed safetensors header}`` of the checkpoint.
        params: ``parameters_by_name(model)`` when the caller has it (else walked here).

    Returns:
        The key's start (``KeyStart.complete`` gives the key).

    Raises:
        LookupError: no ServerArgs are published (see ``_ingredients_but_sources``).
    """
    ingredients, modules = _ingredients_but_sources(model, knobs, headers, params)
    return KeyStart(ingredients, tuple(modules), digest(ingredients)[:PREFIX_DIGITS])


def plan_key_and_parts(model: torch.nn.Module, knobs: LoadKnobs, headers: Mapping[str, object]) -> Tuple[str, str]:
    """The stored plan's key, and a short digest of each ingredient (``parts_of``).

    The key is ``<prefix>-<digest>``: the digest covers every ingredient (the source
    digests included), the prefix every one but those (``KeyStart``).
    """
    return key_start(model, knobs, headers).complete()
