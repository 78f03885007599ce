"""Host memory a CUDA device copies from at full speed: staging buffers, and the page cache itself.

Measured on one H200 host (``bench/host_path_bench.py``, docs/benchmarks.md):
- ``torch.empty(pin_memory=True)`` pins about 1 GB/s; plain memory advised to use huge pages,
  touched, then registered with ``cudaHostRegister`` takes ~0.06 s per GB. Staging buffers
  and snapshots are made the second way (``pinned_empty``).
- Reading the page cache into pinned buffers and copying those to the device tops out near
  31 GB/s (three passes over host memory). The checkpoint's own page-cache pages, mapped
  read-only and registered, are copied by the device with no CPU pass; registration runs at
  ~40 GB/s on one thread and does not scale with threads. Doing both at once, about half of
  the bytes each way, reached 46 GB/s on a 53 GB/s link (``MappedFile``). But pages never
  pinned before (a checkpoint written just before the load, as in a training loop) register
  at about half that rate, and registration holds the driver lock the readers' copies wait
  on: the loaders' zero-copy lane is therefore off unless asked for (``zero_copy_share``).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import torch

from sglang_fastload.loader import cuda_runtime

logger = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_PROT_READ = 1
_MAP_SHARED = 1
# cudaHostRegisterDefault / cudaHostRegisterReadOnly (the pages are never written by the device).
_REGISTER_DEFAULT = 0
_REGISTER_READ_ONLY = 8

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _register(address: int, nbytes: int, flags: int) -> int:
    return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, flags))


def _unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


def register_host(address: int, nbytes: int) -> bool:
    """Register existing host memory with CUDA, so device copies from it run asynchronously.

    Returns:
        True when registered (undo with ``unregister_host``); False where CUDA refused.
    """
    if _register(address, nbytes, _REGISTER_DEFAULT) == 0:
        return True
    _clear_last_error()
    return False


def unregister_host(address: int) -> None:
    """End a registration made by ``register_host``."""
    _unregister(address)


def host_view(address: int, nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor over ``nbytes`` of memory at ``address`` (only ever a copy source)."""
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=torch.uint8)


def _touch(buf: torch.Tensor, piece: int = 64 << 20) -> None:
    """Fault ``buf``'s pages in from several threads (a server process may give torch one
    intra-op thread; the kernel's page zeroing, ~0.2 s per GB on one thread, is the cost)."""
    pieces = [buf.narrow(0, p, min(piece, buf.numel() - p)) for p in range(0, buf.numel(), piece)]
    if len(pieces) <= 1:
        buf.fill_(0)
        return
    with ThreadPoolExecutor(min(len(pieces), os.cpu_count() or 4, 16)) as pool:
        list(pool.map(lambda t: t.fill_(0), pieces))


def pinned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 host tensor of ``nbytes`` that CUDA copies from asynchronously.

    Plain memory on huge pages, touched and registered (about 15 x faster than
    ``pin_memory=True`` for large buffers); falls back to ``pin_memory=True`` where
    registration fails. The registration ends when the returned tensor is freed: views
    outliving it still read correctly, through CUDA's pageable path.

    Args:
        nbytes: size in bytes.

    Returns:
        The tensor (pinned).
    """
    if nbytes <= 0 or not torch.cuda.is_available():
        return torch.empty(max(nbytes, 0), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    raw = torch.empty(nbytes + _HUGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _HUGE
    buf = raw.narrow(0, start, nbytes)
    _libc.madvise(buf.data_ptr(), nbytes, _MADV_HUGEPAGE)  # advice only: failure is harmless
    _touch(buf)
    address = buf.data_ptr()
    if _register(address, nbytes, _REGISTER_DEFAULT) != 0:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    # Not at interpreter exit: CUDA may be torn down by then, and the OS frees the pages.
    weakref.finalize(buf, _unregister, address).atexit = False
    return buf


def _clear_last_error() -> None:
    """Reset CUDA's last-error state after a failed registration (torch would report it later)."""
    runtime = cuda_runtime.runtime()
    if runtime is not None:
        runtime.clear_last_error()


def uncovered(ranges: List[Tuple[int, int]], start: int, end: int) -> List[Tuple[int, int]]:
    """The parts of ``[start, end)`` outside ``ranges`` (sorted, disjoint ``(start, end)`` pairs).

    Args:
        ranges: what is covered already.
        start, end: the range asked for.

    Returns:
        Sorted, disjoint pieces of ``[start, end)`` not in ``ranges``.
    """
    out = []
    pos = start
    i = max(bisect.bisect_right(ranges, (start, float("inf"))) - 1, 0)
    while pos < end and i < len(ranges):
        s, e = ranges[i]
        if e <= pos:
            i += 1
            continue
        if s >= end:
            break
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
        i += 1
    if pos < end:
        out.append((pos, end))
    return out


def cut_at(edges: List[int], offset: int, nbytes: int) -> List[Tuple[int, int]]:
    """``[offset, offset + nbytes)`` cut at every value of the sorted ``edges`` inside it.

    A device copy from registered memory must lie inside one registration, so copies are
    cut where registrations begin and end.

    Returns:
        ``(offset, nbytes)`` pieces, in order.
    """
    end = offset + nbytes
    out = []
    pos = offset
    for edge in edges[bisect.bisect_right(edges, offset):bisect.bisect_left(edges, end)]:
        if edge > pos:  # touching registrations share an edge
            out.append((pos, edge - pos))
            pos = edge
    if pos < end:
        out.append((pos, end - pos))
    return out


class MappedFile:
    """A checkpoint file mapped read-only, its pages registered with CUDA as copies need them.

    Registrations are page-aligned and never overlap (CUDA refuses to register a page
    twice); copies are cut where registrations begin and end (``pieces``: CUDA rejects a copy
    that spans two). A range that cannot be registered is still copied correctly (CUDA's
    pageable path, slower). ``release`` must run only when no copy from the mapping is in
    flight.
    """

    def __init__(self, path: str, fd: int):
        self.path = path
        self.size = os.fstat(fd).st_size
        self.address = 0
        self.registered: List[Tuple[int, int]] = []  # sorted, disjoint (start, end)
        self.edges: List[int] = []  # every start and end of ``registered``, sorted
        self.failed = False
        if self.size:
            address = _libc.mmap(None, self.size, _PROT_READ, _MAP_SHARED, fd, 0)
            if address in (None, _MAP_FAILED):
                raise OSError(ctypes.get_errno(), f"cannot map {path}")
            self.address = address

    def pieces(self, offset: int, nbytes: int) -> List[Tuple[int, int]]:
        """``[offset, offset + nbytes)`` cut where registrations begin and end."""
        return cut_at(self.edges, offset, nbytes)

    def ensure(self, offset: int, nbytes: int) -> None:
        """Register the pages holding ``[offset, offset + nbytes)`` not registered yet (best effort)."""
        if self.failed or nbytes <= 0:
            return
        start = offset // PAGE * PAGE
        end = min(-(-(offset + nbytes) // PAGE) * PAGE, -(-self.size // PAGE) * PAGE)
        for s, e in uncovered(self.registered, start, end):
            err = _register(self.address + s, e - s, _REGISTER_READ_ONLY)
            if err != 0:
                _clear_last_error()
                self.failed = True  # e.g. no read-only registration on this platform
                logger.info("sglang-fastload: page-cache registration unavailable (CUDA error %d); "
                            "copying through staging buffers only", err)
                return
            bisect.insort(self.registered, (s, e))
            bisect.insort(self.edges, s)
            bisect.insort(self.edges, e)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        """The file's bytes ``[offset, offset + nbytes)`` as a CPU tensor over the mapping."""
        return host_view(self.address + offset, nbytes)

    def release(self) -> None:
        """Unregister every range and unmap the file."""
        for s, _ in self.registered:
            _unregister(self.address + s)
        self.registered, self.edges = [], []
        if self.address:
            _libc.munmap(self.address, self.size)
            self.address = 0


_RELEASES: List[threading.Thread] = []
_RELEASE_LOCK = threading.Lock()


def release_later(files: List) -> None:
    """Release mappings in the background (their ``release()``: unregistering costs ~10 ms
    per GB, unmapping touched pages about as much)."""
    if not files:
        return
    thread = threading.Thread(target=lambda: [f.release() for f in files], name="fastload-release", daemon=True)
    with _RELEASE_LOCK:
        _RELEASES.append(thread)
    thread.start()


def wait_for_releases() -> None:
    """Block until every background release has finished."""
    with _RELEASE_LOCK:
        pending = list(_RELEASES)
        _RELEASES.clear()
    for thread in pending:
        thread.join()


def open_mapped(path: str) -> Optional[MappedFile]:
    """Map ``path`` for zero-copy reads, or None if it cannot be mapped."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return MappedFile(path, fd)
    except OSError as exc:
        logger.info("sglang-fastload: %s", exc)
        return None
    finally:
        os.close(fd)
