"""What one execution of a load plan did (``executor.execute_plan``'s result)."""

from __future__ import annotations

import dataclasses
from typing import Dict


@dataclasses.dataclass
class ExecutionStats:
    """What one execution did.

    Attributes:
        bytes_read, read_calls: bytes copied out of the files and the calls that did it.
        seconds: the whole execution.
        setup_seconds: binding views, buffers and mappings before the first read.
        register_seconds: the zero-copy lane's page-cache registrations (summed).
        read_seconds: reader threads in read calls and gathers (summed over threads).
        gather_seconds: the part of ``read_seconds`` spent gathering strided shards.
        wait_seconds: reader threads waiting for the device to free a buffer (summed).
        issue_seconds: threads queueing device copies (summed, lane included).
        lane_wait_seconds: the lane's copier waiting for its registrar.
        shared_seconds: the rounds in which the node's ranks read the spans they share.
        shared_bytes: bytes this rank copied out of those spans into its parameters.
        threads_seconds: from the first read until every thread had queued its last copy.
        tail_seconds: from the first reader running out of chunks to the last one.
        drain_seconds: after that, until the device had finished every copy.
        scratch_seconds: a start-up stream's copies out of its scratch once its plan was
            built and its last file had landed (startup_stream.py; those of earlier files
            ran while later ones were read).
        taken_chunks: chunks a reader ran that were dealt to another.
    """

    bytes_read: int = 0
    read_calls: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    register_seconds: float = 0.0
    read_seconds: float = 0.0
    gather_seconds: float = 0.0
    wait_seconds: float = 0.0
    issue_seconds: float = 0.0
    lane_wait_seconds: float = 0.0
    shared_seconds: float = 0.0
    shared_bytes: int = 0
    threads_seconds: float = 0.0
    tail_seconds: float = 0.0
    drain_seconds: float = 0.0
    scratch_seconds: float = 0.0
    taken_chunks: int = 0

    def phases(self) -> Dict[str, float]:
        """Where the time of the execution went, in seconds (summed ones may exceed it)."""
        names = ("setup", "threads", "tail", "drain", "read", "gather", "wait", "issue", "register", "lane_wait", "shared",
                 "scratch")
        return {name: round(getattr(self, name + "_seconds"), 4) for name in names}
