"""SGLang glue for ``--load-format fast``: a ``DefaultModelLoader`` that plans, validates, reads.

Upstream's update path only accepts ``DefaultModelLoader`` subclasses and calls
``_get_weights_iterator`` then ``load_weights_and_postprocess``; start-up calls
``load_model``. So the loader hands out a ``FastCheckpoint`` in place of the iterator, and
recognises it when asked to load. Iterating a ``FastCheckpoint`` yields upstream's own
threaded iterator, so anything that does not know it still works.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Dict, Optional, Tuple

import torch

from sglang.srt.configs.load_config import LoadConfig, LoadFormat
from sglang.srt.model_loader.loader import BaseModelLoader, DefaultModelLoader

from sglang_fastload import constants, parallel_ranks, update_guard
from sglang_fastload.checkpoint.checkpoint_files import (
    check_weight_map,
    resolve_checkpoint_files,
    weights_format,
)
from sglang_fastload.checkpoint.file_stamps import check_unchanged, stamp_files
from sglang_fastload.checkpoint.safetensors_header import read_header, torch_dtype_name
from sglang_fastload.errors import CheckpointError, UnsupportedModelError
from sglang_fastload.loader import collector_pause, shared_spans, startup_stream, validate
from sglang_fastload.loader.checkpoint_state import state_of
from sglang_fastload.loader.executor import DEFAULT_CHUNK_BYTES, DEFAULT_ZERO_COPY_SHARE, execute_plan, prepare_in_background
from sglang_fastload.loader.plan import DEFAULT_MIN_SEGMENT_BYTES, build_plan, cut_into_chunks
from sglang_fastload.loader.dispatch import auto_means_fast
from sglang_fastload.loader.replay import replay_load_weights
from sglang_fastload.loader.settled_writes import settle_writes
from sglang_fastload.loader import plan_store
from sglang_fastload.loader.plan_key import KeyStart, LoadKnobs, expert_location_digest, key_start
from sglang_fastload.loader.progress import ChunkProgress
from sglang_fastload.loader.summary import PLAN_BUILT, PLAN_CACHED, PLAN_STORED, LoadSummary
from sglang_fastload.model_support import unsupported_architecture_reason
from sglang_fastload.module_walks import parameters_by_name
from sglang_fastload.served_checkpoint import record_served

logger = logging.getLogger(__name__)

EXTRA_CONFIG_KEYS = {"enable_multithread_load", "num_threads", "chunk_mb", "min_segment_bytes", "zero_copy_share",
                     constants.STARTUP_STREAM_KEY}
# Page-cache reads scale to ~16 threads on a large host; 8 stays useful where cores are few
# (reads release the GIL and mostly wait on memory).
DEFAULT_NUM_THREADS = max(8, min(16, os.cpu_count() or 8))
# Fewest reader threads per rank when a node's CPUs are shared by several ranks (8 ranks on
# one 16-CPU H200 host: 2 threads each updated 11 % faster than 4, 4 faster than 8).
MIN_RANK_THREADS = 2


def default_num_threads() -> int:
    """Reader threads for this rank: the node's CPUs shared by the node's tensor-parallel ranks.

    All ranks of a node read at once and share its CPUs and memory bandwidth; on one H200
    host (16 CPUs) 4 ranks updated 1.2-1.3 x faster with 4 threads each than with 16, and
    8 ranks faster with 2 each than with 4.

    Returns:
        ``DEFAULT_NUM_THREADS`` at TP=1, else the CPU count / ranks on this node, 2 to 16.
    """
    ranks = parallel_ranks.tp_size() or 1
    if ranks > 1:
        try:
            from sglang.srt.runtime_context import get_server_args

            ranks //= max(1, int(getattr(get_server_args(), "nnodes", 1) or 1))
        except Exception:
            pass
    if ranks <= 1:
        return DEFAULT_NUM_THREADS
    return max(MIN_RANK_THREADS, min(DEFAULT_NUM_THREADS, (os.cpu_count() or 8) // ranks))


def _rank_suffix() -> str:
    size = parallel_ranks.tp_size()
    return f" [tp rank {parallel_ranks.tp_rank()}/{size}]" if size is not None and size > 1 else ""


def node_group() -> Optional[shared_spans.NodeGroup]:
    """The tensor-parallel group this rank loads with, when its ranks may share spans.

    Sharing is opt-in (``SGLANG_FASTLOAD_SHARED_SPANS=1``): with all ranks on one GPU and
    one PCIe link it measured slower than each rank gathering by itself (docs/benchmarks.md).

    Returns:
        The group (``shared_spans.agree`` then checks that every rank is on this host), or
        None at TP=1, outside a distributed run, or when sharing is not switched on.
    """
    if os.environ.get(constants.ENV_SHARED_SPANS, "").strip() != "1":
        return None
    try:
        import torch.distributed as dist

        group = parallel_ranks.tp_group()
        if group is None or group.world_size <= 1 or not dist.is_initialized():
            return None
        return shared_spans.NodeGroup(rank=group.rank_in_group, size=group.world_size, cpu_group=group.cpu_group)
    except Exception:
        return None


def _single_rank() -> bool:
    """True when this rank keeps every byte of the checkpoint (no tensor or expert parallelism)."""
    return parallel_ranks.tp_size() == 1


def _is_first_rank() -> bool:
    return parallel_ranks.tp_rank() in (0, None)


def unsupported_reason(model, load_config: LoadConfig) -> Optional[str]:
    """Return why ``model`` cannot be fast-loaded, or None when it can."""
    # Only the classes the support table lists (exactly): a subclass may load differently.
    reason = unsupported_architecture_reason(type(model))
    if reason is not None:
        return reason
    if getattr(model, "quant_config", None) is not None:
        return "quantized models are loaded by upstream"
    if load_config.draft_model_idx is not None:
        return "draft (MTP) models are loaded by upstream"
    inner = getattr(model, "model", None)
    start, end = getattr(inner, "start_layer", 0), getattr(inner, "end_layer", None)
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", end)
    if start != 0 or (end is not None and end != layers):
        return "pipeline-parallel stages are loaded by upstream"
    return None


def _format_label(load_format) -> str:
    if load_format == LoadFormat.AUTO and auto_means_fast():
        return f"auto served as fast ({constants.ENV_AUTO_MEANS_FAST}=1)"
    return constants.LOAD_FORMAT


class FastCheckpoint:
    """A checkpoint source the fast loader can plan; iterates like upstream's iterator."""

    def __init__(self, loader: "FastModelLoader", source, iterator_kwargs: dict):
        self.loader = loader
        self.source = source
        self.iterator_kwargs = iterator_kwargs
        self._prepared = None  # (model id, prepared state)

    def __iter__(self):
        return iter(DefaultModelLoader._get_weights_iterator(self.loader, self.source, **self.iterator_kwargs))

    # --- phase 1+2: headers, plan, validation (no parameter written) ---------------------
    def directory(self) -> str:
        path = self.source.model_or_path
        if os.path.isdir(path) or os.path.isabs(path) or os.path.exists(path):
            return path
        # A hub id: let upstream download (or find in cache) the files first.
        hf_folder, _, _ = self.loader._prepare_weights(
            path, self.source.revision, False, self.source.allow_patterns_overrides
        )
        return hf_folder

    def prepare(self, model, target_device) -> "PreparedLoad":
        """Parse headers, build or reuse the plan and validate the checkpoint against it.

        Raises:
            CheckpointError: any problem with the checkpoint, naming file and tensor.
            UnsupportedModelError: the model's loaders cannot be planned.
        """
        if self._prepared is not None and self._prepared[0] == id(model):
            return self._prepared[1]
        prepared = PreparedLoad.build(self, model, target_device)
        self._prepared = (id(model), prepared)
        return prepared

    def try_prepare(self, model, target_device) -> Tuple[Optional["PreparedLoad"], Optional[str]]:
        """``prepare`` when the model can be fast-loaded.

        Returns:
            ``(prepared load, None)``, or ``(None, why not)`` when upstream's path must load it.

        Raises:
            CheckpointError: the checkpoint is unusable; nothing was written.
        """
        reason = unsupported_reason(model, self.loader.load_config)
        if reason is not None:
            return None, reason
        try:
            return self.prepare(model, target_device), None
        except UnsupportedModelError as exc:
            return None, str(exc)


def memory_plan_key(loader, headers, target_device) -> tuple:
    """Key of a plan kept in memory between loads into one model.

    Within one process the model, its placement and the code are fixed; what can still
    change is the checkpoint layout, the knobs that shape a plan, and where SGLang keeps
    each expert (EPLB can move experts between GPUs while the server runs).

    Returns:
        A hashable key.
    """
    return (
        str(target_device),
        tuple((os.path.basename(p), h.layout_key()) for p, h in sorted(headers.items())),
        loader.min_segment_bytes,
        loader.chunk_bytes,
        expert_location_digest(),
    )


class PreparedLoad:
    """A validated plan for one checkpoint and one model, ready to execute."""

    # A first start's stream of the checkpoint (startup_stream.py), consumed by the load.
    stream: Optional[startup_stream.StartupStream] = None
    stream_overlap = 0.0

    def __init__(self, **kw):
        self.__dict__.update(kw)

    @classmethod
    def build(cls, ckpt: FastCheckpoint, model, target_device) -> "PreparedLoad":
        t0 = time.perf_counter()
        directory = ckpt.directory()
        found = weights_format(directory)
        if found is not None and found != "safetensors":
            # Upstream's `auto` loads these; the fast path plans safetensors only.
            raise UnsupportedModelError(f"the checkpoint has {found} weights, no safetensors")
        files = resolve_checkpoint_files(directory)
        headers = {path: read_header(path) for path in files.files}
        # What config.json, the index and the headers say beyond what upstream's loader reads
        # of them: noted, never a refusal (the replay checks every tensor against the model).
        notes = [validate.config_note(directory, type(model).__name__), files.note, check_weight_map(files, headers)]
        header_notes = [n for n in (header.ignored_keys_note() for header in headers.values()) if n is not None]
        if header_notes:  # one line per load, however many shards a writer marks alike
            more = len(header_notes) - 1
            notes.append(header_notes[0] + (f" (and in {more} more files)" if more else ""))
        for note in notes:
            if note is not None:
                logger.warning("sglang-fastload: %s", note)
        state = state_of(model)
        key = memory_plan_key(ckpt.loader, headers, target_device)
        plan = state.cached_plan(key)
        source = PLAN_CACHED if plan is not None else None
        tensors: Dict[str, Tuple[str, Tuple[int, ...], str]] = {}
        t1 = time.perf_counter()
        store_key = None
        stream = None
        stamps = None
        if source is None:
            # A plan stored by an earlier start is as good as one built here: its key covers
            # everything the plan depends on (plan_key.py), and it is checked against these
            # headers and parameters before use.
            # One walk of the parameters for the key, the stored plan's check and the replay
            # (~0.8 ms each on an H200 host for Qwen3-8B): nothing changes them in between.
            params = parameters_by_name(model)
            start = cls._key_start(ckpt.loader, model, headers, target_device, params)
            if start is not None and plan_store.any_stored(start.prefix):
                store_key, parts = cls._complete_key(start)
                if store_key is not None:
                    plan = plan_store.read_plan(store_key, headers, params, parts)
            elif start is not None:
                # No plan of this model, placement and layout is stored: the source digests
                # that complete the key are taken where the built plan is written (and the
                # key's parts logged there).
                store_key = start
                logger.info("sglang-fastload: no stored load plan for this model and checkpoint layout "
                            "(key prefix %s; key parts logged where the plan is stored)", start.prefix)
            if plan is not None:
                source = PLAN_STORED
                state.remember_plan(key, plan, built=False)
        if source is None:
            # What the checkpoint must satisfy is what the model's own loader consumes: the
            # replay checks that shapes and dtypes fit and that every parameter is fed. A
            # cached or stored plan was checked when it was made for this exact layout
            # (names, dtypes, shapes, offsets, sizes); a different tensor set is another layout.
            for path, header in headers.items():
                for name, entry in header.tensors.items():
                    tensors[name] = (path, entry.shape, entry.dtype)
            # A first start reads the whole checkpoint while the plan is built (startup_stream.py).
            stamps = stamp_files(headers)  # before any byte is read
            # Only a start-up streams: an update (or its restore) of a model another loader
            # started has no room reserved for the scratch, and nothing would end the stream
            # if upstream's restore pass failed before the load.
            startup = not state.loaded and update_guard.current_update() is None
            stream = startup_stream.maybe_start(ckpt.loader, headers, startup, _single_rank(), torch.device(target_device))
            try:
                # Built in whole steps: a streamed start copies them out of the scratch, a
                # CUDA bind cuts large straight steps into pieces by arithmetic
                # (straight_pieces.py) and groups the rest; the steps are cut into chunks
                # where the plan is stored (``_store_plan``), and a later bind finds those
                # chunks (cutting on the start's path: MoE ~25 ms, Qwen3-8B 8-15 ms on H200 hosts).
                plan = cls._make_plan(ckpt, model, headers, tensors, directory, params)
            except BaseException:
                if stream is not None:
                    stream.abandon()
                raise
            source = PLAN_BUILT
            state.remember_plan(key, plan)
        t2 = time.perf_counter()
        return cls(
            directory=directory,
            headers=headers,
            tensors=tensors,
            plan=plan,
            plan_cached=source == PLAN_CACHED,
            plan_source=source,
            # A built plan is stored once a load with it succeeded.
            store_key=store_key if source == PLAN_BUILT else None,
            validate_seconds=t1 - t0,
            plan_seconds=t2 - t1,
            stats=stamps if stamps is not None else stamp_files(headers),
            stream=stream,
            # The part of the stream's time that passed while the plan was built.
            stream_overlap=t2 - stream.started if stream is not None else 0.0,
        )

    @staticmethod
    def _key_start(loader, model, headers, target_device, params) -> Optional[KeyStart]:
        """The plan store's key for this load up to its source digests, or None (store off,
        or a key that cannot be computed here)."""
        if plan_store.store_dir() is None:
            return None
        knobs = LoadKnobs(loader.min_segment_bytes, loader.chunk_bytes, str(target_device))
        try:
            return key_start(model, knobs, headers, params)
        except Exception as exc:
            logger.info("sglang-fastload: load plan store not used (%s: %s)", type(exc).__name__, exc)
            return None

    @staticmethod
    def _complete_key(start: KeyStart) -> Tuple[Optional[str], str]:
        """``start.complete()``, or ``(None, "")`` when it fails (the store never fails a load)."""
        try:
            return start.complete()
        except Exception as exc:
            logger.info("sglang-fastload: load plan store not used (%s: %s)", type(exc).__name__, exc)
            return None, ""

    @staticmethod
    def _make_plan(ckpt, model, headers, tensors, directory, params):
        loader = ckpt.loader
        order = []  # upstream's order: files sorted, and the names in each file (safetensors' keys())
        locations = {}
        for path in sorted(headers):
            for name, entry in sorted(headers[path].tensors.items()):
                order.append((name, entry.shape, getattr(torch, torch_dtype_name(entry.dtype))))
                locations[name] = (path, entry.start, entry.itemsize, order[-1][2])
        try:
            result = replay_load_weights(model, order, lambda m, it: m.load_weights(it), params)
        except CheckpointError as exc:
            if exc.tensor in tensors:
                raise type(exc)(tensors[exc.tensor][0], exc.reason, tensor=exc.tensor) from exc
            raise type(exc)(directory, exc.reason, tensor=exc.tensor) from exc
        # Every element fed, each by the write upstream makes last (tied parameters share storage).
        settled = settle_writes(result, params, directory)
        unused = [n for n in tensors if n not in result.tensors_used and not validate.is_known_skip(n)]
        if unused:
            logger.warning(
                "sglang-fastload: %d checkpoint tensors feed no parameter on this rank%s and are "
                "ignored (e.g. %s)",
                len(unused), _rank_suffix(), unused[:3],
            )
        return build_plan(
            settled.copies,
            settled.zeros,
            locations,
            {n: (tuple(p.shape), p.dtype) for n, p in params.items()},
            frozenset(result.tensors_used),
            len(tensors),
            min_segment_bytes=loader.min_segment_bytes,
            max_step_bytes=loader.chunk_bytes,
            cut=False,  # cut where the plan is stored (``_store_plan``) and, on CUDA, by the bind
        )


class FastModelLoader(DefaultModelLoader):
    """``--load-format fast``: plan → validate → pipelined reads → device copies."""

    def __init__(self, load_config: LoadConfig):
        BaseModelLoader.__init__(self, load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unexpected = set(extra) - EXTRA_CONFIG_KEYS
        if unexpected:
            raise ValueError(
                f"Unexpected extra config keys for load format {constants.LOAD_FORMAT}: "
                f"{sorted(unexpected)} (allowed: {sorted(EXTRA_CONFIG_KEYS)})"
            )
        threads = int(extra["num_threads"]) if "num_threads" in extra else default_num_threads()
        if not extra.get("enable_multithread_load", True):
            threads = 1
        if threads < 1:
            raise ValueError("num_threads in --model-loader-extra-config must be >= 1")
        self.num_threads = threads
        self.chunk_bytes = int(float(extra["chunk_mb"]) * (1 << 20)) if "chunk_mb" in extra else DEFAULT_CHUNK_BYTES
        self.min_segment_bytes = int(extra.get("min_segment_bytes", DEFAULT_MIN_SEGMENT_BYTES))
        self.zero_copy_share = float(extra.get("zero_copy_share", DEFAULT_ZERO_COPY_SHARE))
        if not 0.0 <= self.zero_copy_share <= 1.0:
            raise ValueError("zero_copy_share in --model-loader-extra-config must be between 0 and 1")
        self.startup_stream = str(extra.get(constants.STARTUP_STREAM_KEY, "auto")).lower()
        if self.startup_stream not in constants.STARTUP_STREAM_SETTINGS:
            raise ValueError(
                f"{constants.STARTUP_STREAM_KEY} in --model-loader-extra-config must be one of "
                f"{list(constants.STARTUP_STREAM_SETTINGS)}"
            )
        # Read once: the buffers pinned ahead, the stream and their release must agree.
        self.stream_readers = startup_stream.stream_readers(self.num_threads, self.chunk_bytes)
        self.last_summary: Optional[LoadSummary] = None

    def load_model(self, *, model_config, device_config):
        """Upstream's ``load_model``; the copy engine's buffers are made while the model is built.

        Returns:
            The loaded model, as upstream's.
        """
        device = torch.device(device_config.device)
        streams = False
        if device.type == "cuda" and torch.cuda.is_available():
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            prepare_in_background(device, self.num_threads, self.chunk_bytes, self.zero_copy_share)
            streams = startup_stream.streams_here(self.startup_stream, device, True, _single_rank()) and (
                startup_stream.worth_streaming(
                    self.startup_stream, startup_stream.indexed_tensor_count(getattr(model_config, "model_path", ""))
                )
            )
            if streams:
                startup_stream.prepare_buffers(device, self.stream_readers)
        try:
            return DefaultModelLoader.load_model(self, model_config=model_config, device_config=device_config)
        finally:
            if streams:  # also where no stream ran (a stored plan, no room on the device)
                startup_stream.release_buffers(device, self.stream_readers)

    def _get_weights_iterator(self, source, **kwargs):
        checkpoint = FastCheckpoint(self, source, kwargs)
        update = update_guard.current_update()
        if update is not None:
            # Upstream asks for the iterator before it writes anything: validate the whole
            # checkpoint now, on every rank, so a refusal leaves every parameter untouched.
            update_guard.on_weights_iterator_requested(update)
            error = None
            try:
                with collector_pause.collector_paused():
                    checkpoint.try_prepare(update.model, update.target_device)
            except Exception as exc:
                error = exc
            if not update_guard.all_ranks_ok(error is None):
                raise error or CheckpointError(
                    source.model_or_path, "another tensor-parallel rank rejected the checkpoint"
                )
        return checkpoint

    def _prepare_weights(self, *args, **kwargs):
        """Find (or download) the checkpoint files as upstream does for ``auto``.

        ``fast`` plans safetensors; a checkpoint of ``.bin`` files is found all the same and
        loads through upstream's path. Overriding here instead of adding ``fast`` to
        upstream's list of formats keeps the forked loader out of a function that upstream
        rewrites between releases.

        Returns:
            Upstream's ``(folder, weight files, use_safetensors)``.
        """
        import copy

        fast_config = self.load_config
        as_auto = copy.copy(fast_config)  # no __post_init__: nothing re-validated
        as_auto.load_format = LoadFormat.AUTO
        self.load_config = as_auto
        try:
            return DefaultModelLoader._prepare_weights(self, *args, **kwargs)
        finally:
            self.load_config = fast_config

    def _get_all_weights(self, model_config, model):
        if getattr(model, "secondary_weights", ()):
            return DefaultModelLoader._get_all_weights(self, model_config, model)
        return self._get_weights_iterator(DefaultModelLoader.Source.init_new(model_config, model))

    def load_weights_and_postprocess(self, model, weights, target_device):
        try:
            self._load_weights_and_postprocess(model, weights, target_device)
        except Exception as exc:
            update = update_guard.current_update()
            if update is not None and update.first_error is None:
                update.first_error = exc
            raise

    def _load_weights_and_postprocess(self, model, weights, target_device):
        node = node_group()
        if isinstance(weights, FastCheckpoint):
            with collector_pause.collector_paused():
                try:
                    prepared, reason = weights.try_prepare(model, target_device)
                except BaseException:
                    if node is not None:  # the other ranks wait for this one's vote
                        shared_spans.decline(node)
                    raise
                if prepared is not None:
                    self._load_prepared(model, prepared, target_device, node)
                    DefaultModelLoader.postprocess_weights(model, target_device)
                    return
            logger.info(
                "sglang-fastload: %s has no fast-load plan (%s); loading through upstream's "
                "threaded default path",
                type(model).__name__, reason,
            )
        if node is not None:  # the ranks that load fast wait for this one's vote
            shared_spans.decline(node)
        update_guard.note_writing()
        DefaultModelLoader.load_weights_and_postprocess(model, weights, target_device)

    @staticmethod
    def _store_plan(prepared: PreparedLoad, chunk_bytes: int) -> None:
        # After the load, so only plans that loaded a checkpoint are kept, and once; off the
        # load's path (plan_store.write_plan_in_background). A plan is stored cut into chunks
        # (a streamed start's is cut there), so a restart binds it without cutting.
        key, prepared.store_key = prepared.store_key, None
        plan = prepared.plan
        rank = _rank_suffix()

        parts = []  # a key's start is completed on the writer's thread: its parts come from there

        def complete() -> str:
            name, key_parts = key.complete()
            parts.append(key_parts)
            return name

        def stored(path: str, seconds: float) -> None:
            logger.info("sglang-fastload: load plan stored in %.3f s%s: %s%s", seconds, rank, path,
                        f" (key parts {parts[0]})" if parts else "")

        plan_store.write_plan_in_background(key if isinstance(key, str) else complete,
                                            lambda: cut_into_chunks(plan, chunk_bytes), stored)

    def _load_prepared(self, model, prepared: PreparedLoad, target_device, node=None) -> None:
        # A cached plan may come from another checkpoint of the same layout: bind its files
        # (matched by name, as in the layout key) to this checkpoint's.
        by_name = {os.path.basename(p): p for p in prepared.headers}
        plan = dataclasses.replace(
            prepared.plan,
            files=[dataclasses.replace(f, path=by_name[os.path.basename(f.path)]) for f in prepared.plan.files],
        )
        stream, prepared.stream = prepared.stream, None  # a start-up stream is used once
        params = {}
        named = parameters_by_name(model)
        for name, (shape, dtype) in plan.param_meta.items():
            p = named.get(name)
            if p is None or p.shape != shape or p.dtype != dtype:  # torch.Size is a tuple
                if node is not None:  # the other ranks wait for this one's vote
                    shared_spans.decline(node)
                if stream is not None:
                    stream.abandon()
                raise UnsupportedModelError(f"parameter {name} changed since the plan was made")
            params[name] = p.data
        device = torch.device(target_device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        progress = counted = None
        startup = not state_of(model).loaded
        if startup and _is_first_rank():
            from tqdm.auto import tqdm

            progress = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc="Loading safetensors (fast)")
            counted = ChunkProgress(progress.update, plan.nbytes)
        update_guard.note_writing()
        try:
            stats = stream.finish(plan, params) if stream is not None else None
            if stats is not None and counted is not None:
                counted(stats.bytes_read)
            if stats is None:
                stats = execute_plan(
                    plan,
                    params,
                    device=device,
                    num_threads=self.num_threads,
                    chunk_bytes=self.chunk_bytes,
                    on_bytes=counted,
                    cache=state_of(model).executor_cache,
                    zero_copy_share=self.zero_copy_share,
                    node=node,
                )
        finally:
            if progress is not None:
                counted.flush()
                progress.close()
        check_unchanged(prepared.stats)
        if prepared.store_key is not None:
            self._store_plan(prepared, self.chunk_bytes)
        if startup:
            record_served(model, prepared.directory, self.load_config.load_format)
        state_of(model).loaded = True
        summary = LoadSummary(
            directory=prepared.directory,
            files=len(prepared.headers),
            tensors=plan.tensor_count,
            tensors_used=len(plan.tensors_used),
            checkpoint_bytes=sum(h.file_size for h in prepared.headers.values()),
            bytes_read=stats.bytes_read,
            plan_seconds=prepared.plan_seconds,
            plan_cached=prepared.plan_cached,
            plan_source=prepared.plan_source,
            validate_seconds=prepared.validate_seconds,
            copy_seconds=stats.seconds,
            threads=self.num_threads,
            rank=_rank_suffix(),
            load_format=_format_label(self.load_config.load_format),
            copy_setup_seconds=stats.setup_seconds,
            copy_phases=stats.phases(),
            shared_bytes=stats.shared_bytes,
            copy_overlap_seconds=prepared.stream_overlap if stats.scratch_seconds else 0.0,
        )
        self.last_summary = summary
        logger.info(summary.line())
        logger.debug("sglang-fastload: read/copy phases (s): %s", summary.copy_phases)
