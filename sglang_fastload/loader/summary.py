"""The one summary log line of each fast load."""

from __future__ import annotations

import dataclasses
from typing import Dict


# Where a load's plan came from: reused from memory, read from the plan store, or built
# (replayed). The summary line says it in these words.
PLAN_CACHED = "cached"
PLAN_STORED = "stored"
PLAN_BUILT = "built"


@dataclasses.dataclass
class LoadSummary:
    """What one fast load did; ``plan_source`` is one of ``cached``, ``stored``, ``built``
    (``plan_cached`` is kept for readers of the older field: True only for ``cached``)."""

    directory: str
    files: int = 0
    tensors: int = 0
    tensors_used: int = 0
    checkpoint_bytes: int = 0
    bytes_read: int = 0
    plan_seconds: float = 0.0
    plan_cached: bool = False
    plan_source: str = ""
    validate_seconds: float = 0.0
    copy_seconds: float = 0.0
    threads: int = 0
    rank: str = ""
    load_format: str = "fast"
    copy_setup_seconds: float = 0.0  # part of copy_seconds spent before the first read
    # Bytes this rank took out of spans its node's ranks read together (shared_spans.py).
    shared_bytes: int = 0
    # Part of copy_seconds that ran while the plan was built (a start-up stream).
    copy_overlap_seconds: float = 0.0
    # Where read/copy time went (``ExecutionStats.phases``): logged at debug level.
    copy_phases: Dict[str, float] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        source = self.plan_source or (PLAN_CACHED if self.plan_cached else PLAN_BUILT)
        total = self.plan_seconds + self.validate_seconds + self.copy_seconds - self.copy_overlap_seconds
        gbps = self.bytes_read / self.copy_seconds / 1e9 if self.copy_seconds > 0 else 0.0
        return (
            f"sglang-fastload: loaded {self.directory}{self.rank}: {self.files} files, "
            f"{self.tensors} tensors ({self.tensors_used} used here), "
            f"read {self.bytes_read} of {self.checkpoint_bytes} bytes "
            f"({self.bytes_read / 1e9:.3f} GB) with {self.threads} threads; "
            f"plan {self.plan_seconds:.3f} s ({source}), "
            f"validate {self.validate_seconds:.3f} s, read/copy {self.copy_seconds:.3f} s"
            + (f" ({self.copy_overlap_seconds:.3f} s of it while the plan was built)" if self.copy_overlap_seconds else "")
            + ", "
            f"total {total:.3f} s, {gbps:.2f} GB/s; format {self.load_format}; "
            f"read/copy set-up {self.copy_setup_seconds:.3f} s"
            + (f"; {self.shared_bytes} bytes out of spans shared with the node's ranks" if self.shared_bytes else "")
        )
