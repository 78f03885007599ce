"""The few CUDA runtime calls a reader thread makes per chunk, called without torch.

Through torch, a host-to-device copy or an event costs tens of microseconds of Python and
dispatcher work per call. With small staging buffers (that stay in the CPU cache) a load
makes thousands of such calls from 16 threads, and that work serialises them. These calls go
straight to the CUDA runtime library torch itself loaded. Queueing a copy or recording an
event takes a few microseconds and never waits for the device, so those two keep the
interpreter lock: handing it over and taking it back among 16 threads costs more than the
call (on one H200 host up to ~0.3 ms per chunk). Waiting for an event releases it, and
happens only when asking first found the work unfinished. Where that library is not found
(ROCm builds, a statically linked runtime) callers keep torch's calls.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
from typing import Optional

from sglang_fastload.errors import CudaCallError

_MEMCPY_HOST_TO_DEVICE = 1  # cudaMemcpyHostToDevice
_MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice
_EVENT_DISABLE_TIMING = 2  # cudaEventDisableTiming
_EVENT_BLOCKING_SYNC = 1  # cudaEventBlockingSync
_NOT_READY = 600  # cudaErrorNotReady


@dataclasses.dataclass(frozen=True)
class CudaRuntime:
    """Copies and events of the CUDA runtime library, by raw handle.

    Attributes:
        lib: the library (``libcudart``) torch loaded into this process; its calls release
            the interpreter lock.
        path: where it was loaded from.
        held: the same library, its calls keeping the interpreter lock (short calls only).
    """

    lib: ctypes.CDLL
    path: str
    held: ctypes.PyDLL  # the same library, called with the interpreter lock held

    def _check(self, code: int, call: str) -> None:
        if code != 0:
            self.lib.cudaGetLastError()  # torch would otherwise report it on its next call
            name = self.lib.cudaGetErrorString(code)
            raise CudaCallError(f"{call} failed: CUDA error {code} ({(name or b'?').decode()})")

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue a copy of ``nbytes`` from host address ``src`` to device address ``dst``.

        Raises:
            CudaCallError: the runtime refused the copy.
        """
        self._check(self.held.cudaMemcpyAsync(dst, src, nbytes, _MEMCPY_HOST_TO_DEVICE, stream), "cudaMemcpyAsync")

    def copy_within_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue a copy of ``nbytes`` from device address ``src`` to device address ``dst``.

        Raises:
            CudaCallError: the runtime refused the copy.
        """
        self._check(self.held.cudaMemcpyAsync(dst, src, nbytes, _MEMCPY_DEVICE_TO_DEVICE, stream), "cudaMemcpyAsync")

    def copy_2d_to_device(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: int) -> None:
        """Queue a copy of ``height`` rows of ``width`` bytes, ``spitch`` bytes apart at host
        address ``src``, to rows ``dpitch`` bytes apart at device address ``dst``.

        Raises:
            CudaCallError: the runtime refused the copy.
        """
        code = self.held.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, _MEMCPY_HOST_TO_DEVICE, stream)
        self._check(code, "cudaMemcpy2DAsync")

    def new_event(self, blocking: bool = False) -> int:
        """A new event without timing (``blocking``: a wait sleeps instead of spinning).

        Raises:
            CudaCallError: the runtime could not make one.
        """
        handle = ctypes.c_void_p()
        flags = _EVENT_DISABLE_TIMING | (_EVENT_BLOCKING_SYNC if blocking else 0)
        self._check(self.lib.cudaEventCreateWithFlags(ctypes.byref(handle), flags), "cudaEventCreateWithFlags")
        return int(handle.value)

    def record(self, event: int, stream: int) -> None:
        """Record ``event`` on ``stream`` (what is queued there so far).

        Raises:
            CudaCallError: the runtime refused.
        """
        self._check(self.held.cudaEventRecord(event, stream), "cudaEventRecord")

    def done(self, event: int) -> bool:
        """True when the work ``event`` recorded is done (asks without waiting or releasing
        the interpreter lock).

        Raises:
            CudaCallError: that work failed.
        """
        code = self.held.cudaEventQuery(event)
        if code == _NOT_READY:
            return False
        self._check(code, "cudaEventQuery")
        return True

    def wait(self, event: int) -> None:
        """Block until the work ``event`` recorded is done.

        Raises:
            CudaCallError: that work failed.
        """
        self._check(self.lib.cudaEventSynchronize(event), "cudaEventSynchronize")

    def clear_last_error(self) -> None:
        """Reset the runtime's last-error state (after a failed call torch did not make)."""
        self.lib.cudaGetLastError()


def _loaded_runtime_paths() -> list:
    try:
        with open("/proc/self/maps") as maps:
            found = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except OSError:
        return []
    return sorted(found)


def _declare(lib) -> None:
    void_p, size_t, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    lib.cudaMemcpyAsync.argtypes = [void_p, void_p, size_t, c_int, void_p]
    lib.cudaMemcpy2DAsync.argtypes = [void_p, size_t, void_p, size_t, size_t, size_t, c_int, void_p]
    lib.cudaEventCreateWithFlags.argtypes = [ctypes.POINTER(void_p), ctypes.c_uint]
    lib.cudaEventRecord.argtypes = [void_p, void_p]
    lib.cudaEventSynchronize.argtypes = [void_p]
    lib.cudaEventQuery.argtypes = [void_p]
    lib.cudaGetErrorString.argtypes = [c_int]
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    for name in ("cudaMemcpyAsync", "cudaMemcpy2DAsync", "cudaEventCreateWithFlags", "cudaEventRecord", "cudaEventSynchronize", "cudaEventQuery",
                 "cudaGetLastError"):
        getattr(lib, name).restype = c_int


def _bind(path: str) -> CudaRuntime:
    lib, held = ctypes.CDLL(path), ctypes.PyDLL(path)  # already loaded: these only look it up
    _declare(lib)
    _declare(held)
    return CudaRuntime(lib, path, held)


_LOCK = threading.Lock()
_RUNTIME: Optional[CudaRuntime] = None
_LOOKED = False


def runtime() -> Optional[CudaRuntime]:
    """The CUDA runtime library torch uses, once CUDA is initialised; None where not found.

    Returns:
        The bound library, or None (not loaded as a shared library, or several different
        ones loaded, so which one torch's handles belong to is unclear).
    """
    global _RUNTIME, _LOOKED
    with _LOCK:
        if _LOOKED:
            return _RUNTIME
        paths = _loaded_runtime_paths()
        if not paths:
            return None  # CUDA not initialised yet: look again next time
        _LOOKED = True
        if len(paths) == 1:
            try:
                _RUNTIME = _bind(paths[0])
            except (OSError, AttributeError):
                _RUNTIME = None
        return _RUNTIME
