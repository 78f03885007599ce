"""The demo's embedded default: a random Qwen3-MoE checkpoint pair (A and B), written locally.

Nothing is downloaded. The tensors come from the test rig's writer
(``tests/rig/checkpoints.py``): same shapes and config as a real Qwen3-MoE release, random
bf16 weights that depend only on the seed, and a tiny tokenizer. A and B differ only in
their seeds, so B is an update target of A and greedy outputs differ between them.

The pair is written once into the work directory (default ``.cache/demo`` in the
repository, ignored by git) and reused while its sizes and the writer stay the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORK_DIR = REPO / ".cache" / "demo"

SEED_A, SEED_B = 1, 2
FORMAT_VERSION = 1  # bump to invalidate cached pairs


@dataclass(frozen=True)
class Spec:
    name: str
    num_experts: int
    num_shards: int
    sizes: Tuple[Tuple[str, int], ...]

    def describe(self) -> str:
        s = dict(self.sizes)
        return (
            f"Qwen3-MoE, {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
            f"{self.num_experts} experts (top-2, intermediate {s['moe_intermediate_size']}), "
            f"vocab {s['vocab_size']}, bf16, {self.num_shards} shards"
        )


# A few hundred MB: big enough that a load is measured in GB/s rather than in overheads,
# small enough that two CPU servers start and serve it quickly on 2 cores. All sizes stay
# aligned so SGLang pads nothing on CPU (its normal weight-loader branches run).
DEFAULT = Spec(
    name="qwen3-moe-64e",
    num_experts=64,
    num_shards=4,
    sizes=tuple(
        dict(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            intermediate_size=1024,
            moe_intermediate_size=256,
            vocab_size=1024,
        ).items()
    ),
)

# --tiny (CI): the test suite's model size, a few MB.
TINY = Spec(
    name="qwen3-moe-tiny",
    num_experts=16,
    num_shards=2,
    sizes=tuple(
        dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=256,
            moe_intermediate_size=128,
            vocab_size=1024,
        ).items()
    ),
)


def _key(spec: Spec) -> str:
    writer = (REPO / "tests" / "rig" / "checkpoints.py").read_bytes()
    blob = json.dumps([FORMAT_VERSION, spec.name, spec.num_experts, spec.num_shards, spec.sizes, SEED_A, SEED_B])
    return hashlib.sha256(blob.encode() + hashlib.sha256(writer).digest()).hexdigest()[:12]


@contextlib.contextmanager
def _one_torch_thread():
    # Random tensors are generated one small tensor at a time; several OpenMP threads only
    # fight over the cores (on a busy 2-core machine this is ~7x slower than one thread).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ensure_pair(spec: Spec, work_dir=None, log: Callable[[str], None] = print) -> Tuple[Path, Path]:
    """Return ``(dir_a, dir_b)`` of ``spec``, writing them first unless already cached."""
    from tests.rig.checkpoints import checkpoint_bytes, write_qwen3_moe

    work = Path(work_dir) if work_dir else DEFAULT_WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    final = work / f"{spec.name}-{_key(spec)}"
    if (final / ".complete").exists():
        log(f"using the cached checkpoints in {final}")
        return final / "a", final / "b"

    # Older pairs of the same name (other sizes or writer) are only disk space now.
    for stale in work.glob(f"{spec.name}-*"):
        if stale != final and (stale / ".complete").exists():
            shutil.rmtree(stale, ignore_errors=True)

    tmp = work / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _one_torch_thread():
            for label, seed in (("a", SEED_A), ("b", SEED_B)):
                t0 = time.perf_counter()
                log(f"writing checkpoint {label.upper()} (seed {seed}) ...")
                path = write_qwen3_moe(
                    tmp / label,
                    seed=seed,
                    num_experts=spec.num_experts,
                    layout="sharded",
                    num_shards=spec.num_shards,
                    **dict(spec.sizes),
                )
                log(f"  {checkpoint_bytes(path) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        (tmp / ".complete").write_text(json.dumps({"spec": spec.describe()}) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another demo run finished the same pair first
            if not (final / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "a", final / "b"
