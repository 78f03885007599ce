"""Environment variables and fixed names shared by the hook, the engine and the CLI.

Stdlib-free on purpose: the start-up hook imports this module in every interpreter.
"""

# "0" turns the overlay off entirely (the hook installs nothing, upstream runs untouched).
ENV_ENABLE = "SGLANG_FASTLOAD"
# "1" makes the hook print why it stayed inactive even when that is expected (debugging).
ENV_VERBOSE = "SGLANG_FASTLOAD_VERBOSE"

# Name of the load format this package adds to SGLang.
LOAD_FORMAT = "fast"
# Upstream modules that define the command line's list of load formats,
# LOAD_FORMAT_CHOICES: arg_groups/choices.py since sglang 0.5.20, server_args.py before
# (it re-exports the same list since). Right after such a module runs, the start-up hook
# appends LOAD_FORMAT to that list, so no fork is needed wherever the list moves.
LOAD_FORMAT_CHOICES_MODULES = ("sglang.srt.arg_groups.choices", "sglang.srt.server_args")
# File names placed in site-packages by the wheel.
PTH_NAME = "sglang_fastload.pth"
START_NAME = "sglang_fastload.start"
# Folder (inside the installed package, or at the root of a source checkout) holding the forks.
OVERLAY_DIR_INSTALLED = "_overlay"
OVERLAY_DIR_SOURCE = "overlay"
MANIFEST_NAME = "manifest.json"
# The one line a process logs once the overlay serves a forked module to SGLang.
ACTIVE_NOTICE = "sglang-fastload overlay active"

# Fault injection for tests of the rollback path: when this variable names a file that
# exists at the start of a fast load, that load fails with an I/O error after copying the
# number of bytes written in the file, and the file is removed (one fault per file).
ENV_FAULT_FILE = "SGLANG_FASTLOAD_FAULT_FILE"
# The file may also hold a second word, "persist": then the file stays and every fast load
# fails the same way until it is removed (a checkpoint that can never be read consistently).
FAULT_PERSIST_WORD = "persist"
# ... or "touch": instead of an I/O error, the first shard's modification time moves on, as if
# a writer changed it during the read (the load must notice it by itself).
FAULT_TOUCH_WORD = "touch"

# "1" makes `--load-format auto` (and updates that ask for `auto`) load through `fast` for the
# models the fast path supports, so frameworks that hard-code `auto` get it unpatched. Set in
# the environment, it reaches SGLang's scheduler processes whatever launched them.
ENV_AUTO_MEANS_FAST = "SGLANG_FASTLOAD_AUTO_MEANS_FAST"
# "1" keeps a host-memory copy of each rank's parameters, refreshed before every update, so a
# failed update can always be undone even when the previous checkpoint is gone.
ENV_UPDATE_SNAPSHOT = "SGLANG_FASTLOAD_UPDATE_SNAPSHOT"
# How often a failed update re-reads its own checkpoint when the previous one is gone or was
# rewritten (the only consistent weights left to reach), and the pause before each try.
UPDATE_REREAD_ATTEMPTS = 3
UPDATE_REREAD_PAUSE_S = 0.5
# Weight files whose identities (device, inode, size, mtime) say whether a served checkpoint
# directory still holds what was loaded from it.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")

# "0" makes the fast loader queue its host-to-device copies through torch instead of calling
# the CUDA runtime library directly (cuda_runtime.py), e.g. to rule that path out.
ENV_DIRECT_CUDA_CALLS = "SGLANG_FASTLOAD_DIRECT_CUDA_CALLS"

# "0" keeps every reader thread to the chunks dealt to it: a reader that has run out no
# longer takes the last unstarted chunk of the reader with the most bytes left (executor.py).
ENV_STEAL_CHUNKS = "SGLANG_FASTLOAD_STEAL_CHUNKS"

# How a load's chunks are dealt to the reader threads (binding.py): "runs" (default), each
# reader a contiguous run of the files' chunks, so every reader reads one region front to
# back; "round-robin", reader k the chunks k, k + T, k + 2T, ... (the dealing before
# 2026-12-03), so all readers move through the same region together.
ENV_DEAL_CHUNKS = "SGLANG_FASTLOAD_DEAL_CHUNKS"
DEAL_RUNS = "runs"
DEAL_ROUND_ROBIN = "round-robin"

# Load plans kept between server starts (sglang_fastload/loader/plan_store.py): "0" switches
# the store off; the directory defaults to $XDG_CACHE_HOME (else ~/.cache) + PLAN_STORE_SUBDIR.
ENV_PLAN_STORE = "SGLANG_FASTLOAD_PLAN_STORE"
ENV_PLAN_DIR = "SGLANG_FASTLOAD_PLAN_DIR"
PLAN_STORE_SUBDIR = ("sglang_fastload", "plans")
# Plan files kept (the most recently used): one per model, rank, placement and layout, so
# two or more configurations of an 8-rank server.
PLAN_STORE_MAX_FILES = 32
# Seconds a normal interpreter exit waits for each plan still being stored (a stalled
# file system must not hold a server's shutdown).
PLAN_STORE_EXIT_WAIT_S = 10.0

# "1" makes the tensor-parallel ranks of a node read the spans holding row shards once
# between them and share them (sglang_fastload/loader/shared_spans.py) instead of each rank
# gathering its shards from its own mapping of the file. Opt-in: see docs/benchmarks.md.
ENV_SHARED_SPANS = "SGLANG_FASTLOAD_SHARED_SPANS"

# A start-up load that builds its plan streams the checkpoint into a device scratch while it
# does (sglang_fastload/loader/startup_stream.py); the loader's extra config key
# "startup_stream" says where: "auto" (default: CUDA, one rank, room on the device, a
# checkpoint of many tensors), "on" (any checkpoint, also into host memory: parameters on
# the CPU) or "off".
STARTUP_STREAM_KEY = "startup_stream"
STARTUP_STREAM_SETTINGS = ("auto", "on", "off")
# Device bytes left free beside the scratch (the plan's own allocations, fragmentation).
STARTUP_STREAM_HEADROOM_BYTES = 2 << 30
# While the stream's readers and the plan's replay share the interpreter, the lock is handed
# over at least this often (seconds; Python's default is 0.005, which leaves a reader that
# finished a read waiting behind the replay for up to that long). Restored afterwards.
# SGLANG_FASTLOAD_STARTUP_SWITCH_INTERVAL overrides it ("0": keep the interpreter's own).
STARTUP_STREAM_SWITCH_INTERVAL_S = 0.0005
ENV_STARTUP_SWITCH_INTERVAL = "SGLANG_FASTLOAD_STARTUP_SWITCH_INTERVAL"
# The stream's readers while the plan is built, and after. On a 16-CPU H200 host 16 readers
# slowed a replay-like loop 2.9-4.2 x (every core busy copying) and a MoE replay 2.1 x; 8
# readers of 64 MiB reads left the loop at its speed while streaming 27 GB/s and slowed the
# replay 1.2 x (docs/benchmarks.md, fifteenth run). Reads that large are slower once the
# plan is built (39 GB/s from 16 threads, 90 GB/s with 4 MiB), so then the loader's threads
# read its chunk size. SGLANG_FASTLOAD_STARTUP_STREAM_READERS ("8" or "8/16": during/after)
# and SGLANG_FASTLOAD_STARTUP_STREAM_READ_MB (during) override them.
STARTUP_STREAM_READ_BYTES = 64 << 20
ENV_STARTUP_STREAM_READERS = "SGLANG_FASTLOAD_STARTUP_STREAM_READERS"
ENV_STARTUP_STREAM_READ_MB = "SGLANG_FASTLOAD_STARTUP_STREAM_READ_MB"
# "auto" streams only checkpoints of at least this many tensors: the replay's time grows with
# the tensors it feeds (on the H200 hosts 0.07 s for Qwen3-8B's 399, 0.4-1.3 s for 6,291 of
# Qwen3-30B-A3B's), and the stream's own costs (a second pool of readers, the copies out of
# the scratch) outweighed the 0.07 s it could hide: Qwen3-8B first starts took 0.56-0.58 s
# streamed against 0.47-0.48 s not (docs/benchmarks.md, fifteenth run). "on" streams any.
STARTUP_STREAM_MIN_TENSORS = 2000

# Upstream functions that module_walks.py (and idle_restores.py) answer faster, by qualified
# name, with the SHA-256 of each one's source text as it was written from (sglang 0.5.23). A
# fork binds the faster twin only while upstream's source still has this digest;
# tests/loader/test_module_walks.py checks both.
UPSTREAM_WALK_SOURCES = {
    "_unsupported_derived_weight_cache_error": "b4a2d89508b2355ef6354cf47ecf6014ac0ed31ac1f7260b419d5305104467c1",
    "_modules_with_quant_method": "ab0a5441cc705d6166cb71728d948264c9aa1b924be8fb8df1dd8750fcbe92e4",
    # idle_restores.py: skipped when every hook in it would do nothing.
    "DefaultModelLoader.restore_weights_before_loading": "0802a5551be6af3dc9ff45d6d16a78cee63d5cc728d280564fcbd40eca8d581b",
}

# SGLang's ``WeightUpdater`` methods that write parameters from a trainer's tensors, not from
# disk (the overlay's weight_updater fork marks the model's served checkpoint as replaced
# when one runs: served_checkpoint.record_replaced). Absent ones are skipped.
TENSOR_UPDATE_METHODS = (
    "update_weights_from_tensor",
    "update_weights_from_ipc",
    "receive_weights_from_distributed",
    "load_weights_from_distributed",
    "begin_weight_update",
)
