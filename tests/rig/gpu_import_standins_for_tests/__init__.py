"""TEST-ONLY stand-ins for GPU-only packages that SGLang imports unconditionally.

This package is part of the CPU test rig, never of the shipped wheel. It is installed
into a test virtual environment by ``tests/rig/install_standins.py`` together with a
``gpu_import_standins_for_tests.pth`` file, so that every interpreter of that venv
(including the scheduler processes SGLang spawns) calls :func:`activate` at start-up.

:func:`activate` appends a finder to the *end* of ``sys.meta_path``. Because every real
finder runs first, the finder is only asked about a module that is genuinely not
installed; it then answers for a short, fixed list of GPU-only packages:

* ``triton`` (imported unconditionally by ``sglang.srt.utils.common``), with the two
  behaviours torch and SGLang depend on: ``triton.backends.backends`` is an empty dict
  (torch tests ``"cpu" in triton.backends.backends``; a truthy answer makes the first
  forward hang), and any zero-argument call such as
  ``triton.runtime.driver.active.get_current_target()`` raises, so callers fall back
  to "cpu";
* ``torchvision``, ``torchao``, ``torchaudio`` (imported by multimodal/config modules and
  at server start);
* ``vllm`` fallbacks that SGLang's layer code reaches on a CPU without AMX: these are
  mapped onto SGLang's own pure-torch implementations (see ``_vllm_fallbacks``).

Everything handed out is a placeholder: a class (so ``isinstance`` checks against it and
subclassing work) whose attributes are further placeholders; calls with arguments yield
placeholders (so decorators such as ``@triton.jit`` and ``@triton.autotune(...)`` work at
import time), and anything that would need a real value (a zero-argument call, ``int()``,
arithmetic) raises :class:`StandinUsedError`.

Set ``GPU_IMPORT_STANDINS_FOR_TESTS=0`` to switch the finder off in a process.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

__all__ = ["activate", "deactivate", "StandinFinder", "StandinUsedError", "STANDIN_PACKAGES", "is_standin"]

ENV_SWITCH = "GPU_IMPORT_STANDINS_FOR_TESTS"

# Top-level packages served as generic placeholders when (and only when) not installed.
STANDIN_PACKAGES = ("triton", "torchvision", "torchao", "torchaudio")
# Modules served by ``_vllm_fallbacks`` (a real module mapping vllm names to SGLang's own
# pure-torch code); the parent packages are empty placeholders.
VLLM_FALLBACK_MODULES = ("vllm", "vllm._custom_ops")

_STANDIN_MARK = "__gpu_import_standin_for_tests__"
_STANDIN_VERSION = "0.0.0"


class StandinUsedError(RuntimeError):
    """Raised when code needs a real value from a GPU-only package's test stand-in."""


def _fail(qualname: str, what: str):
    raise StandinUsedError(
        f"{qualname}: {what} on a test stand-in for a GPU-only package that is not installed"
    )


class _StandinMeta(type):
    """Metaclass of the placeholder values.

    Placeholders are classes, so ``isinstance(x, triton.runtime.jit.JITFunction)`` and
    ``class K(triton.runtime.KernelInterface)`` work (torch does the former at import
    time); every other behaviour comes from this metaclass.
    """

    def __getattr__(cls, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        child = _make_standin(f"{cls._standin_qualname}.{name}")
        type.__setattr__(cls, name, child)  # stable identity: tl.constexpr is tl.constexpr
        return child

    def __setattr__(cls, name, value):
        type.__setattr__(cls, name, value)

    def __call__(cls, *args, **kwargs):
        if not args and not kwargs:
            _fail(cls._standin_qualname, "zero-argument call")
        # Decorators (@triton.jit, @triton.autotune(...)), Config(...), kernel[grid](...).
        return _make_standin(f"{cls._standin_qualname}(...)")

    def __getitem__(cls, key):
        return _make_standin(f"{cls._standin_qualname}[...]")

    # A placeholder behaves as an empty, false container.
    def __iter__(cls):
        return iter(())

    def __len__(cls):
        return 0

    def __contains__(cls, item):
        return False

    def __bool__(cls):
        return False

    def __index__(cls):
        _fail(cls._standin_qualname, "integer conversion")

    def __int__(cls):
        _fail(cls._standin_qualname, "integer conversion")

    def __float__(cls):
        _fail(cls._standin_qualname, "float conversion")

    def __repr__(cls):
        own = cls.__dict__.get("_standin_qualname")
        return f"<test stand-in {own}>" if own else f"<subclass {cls.__qualname__} of a test stand-in>"


def _arith(cls, *args):
    _fail(cls._standin_qualname, "arithmetic")


# ``|`` stays type's (``X | None`` annotations must keep working).
for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "lshift", "rshift", "and", "xor", "matmul"):
    setattr(_StandinMeta, f"__{_op}__", _arith)
    setattr(_StandinMeta, f"__r{_op}__", _arith)
for _op in ("lt", "le", "gt", "ge", "neg", "pos", "abs"):
    setattr(_StandinMeta, f"__{_op}__", _arith)
del _op


def _make_standin(qualname: str):
    short = qualname.rpartition(".")[2] or "standin"
    return _StandinMeta(short, (), {"_standin_qualname": qualname, _STANDIN_MARK: True, "__module__": qualname.partition(".")[0]})


class _StandinModule(types.ModuleType):
    """A placeholder package: unknown attributes are placeholders, submodules import."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        child = _make_standin(f"{self.__name__}.{name}")
        setattr(self, name, child)
        return child


# Attributes a placeholder module must carry with a concrete value.
_SPECIAL_ATTRS = {
    # torch: ``"cpu" in triton.backends.backends`` must be False (else the first forward hangs).
    "triton.backends": {"backends": {}},
}


def is_standin(obj) -> bool:
    """True when ``obj`` is a module or value handed out by these stand-ins."""
    return isinstance(obj, (_StandinMeta, _StandinModule)) or getattr(obj, _STANDIN_MARK, False) is True


def _top(fullname: str) -> str:
    return fullname.partition(".")[0]


class _PlaceholderLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _StandinModule(spec.name)

    def exec_module(self, module):
        name = module.__name__
        module.__path__ = []  # every placeholder is a package, so ``import a.b.c`` works
        setattr(module, _STANDIN_MARK, True)
        if "." not in name:
            module.__version__ = _STANDIN_VERSION
        for attr, value in _SPECIAL_ATTRS.get(name, {}).items():
            setattr(module, attr, value)


class _VllmFallbackLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        setattr(module, _STANDIN_MARK, True)
        module.__path__ = []
        if module.__name__ == "vllm._custom_ops":
            from gpu_import_standins_for_tests import _vllm_fallbacks

            _vllm_fallbacks.fill_custom_ops(module)


class StandinFinder(importlib.abc.MetaPathFinder):
    """Answers only for the stand-in names, and only after every real finder said no."""

    def find_spec(self, fullname, path=None, target=None):
        top = _top(fullname)
        if top in STANDIN_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, _PlaceholderLoader(), is_package=True)
        if top == "vllm":
            if fullname in VLLM_FALLBACK_MODULES:
                return importlib.machinery.ModuleSpec(fullname, _VllmFallbackLoader(), is_package=True)
            return None  # any other vllm module stays "not installed"
        return None

    def invalidate_caches(self):
        pass

    def __repr__(self):
        return "<StandinFinder (gpu_import_standins_for_tests, test-only)>"


def _installed_finder():
    for finder in sys.meta_path:
        if type(finder).__name__ == "StandinFinder":
            return finder
    return None


def activate() -> bool:
    """Append the finder to ``sys.meta_path`` (idempotent). Returns True when active."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return False
    if _installed_finder() is None:
        sys.meta_path.append(StandinFinder())
    return True


def deactivate() -> None:
    """Remove the finder (already imported placeholders stay in ``sys.modules``)."""
    finder = _installed_finder()
    while finder is not None:
        sys.meta_path.remove(finder)
        finder = _installed_finder()
