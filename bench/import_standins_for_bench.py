"""BENCH-ONLY import stand-ins for GPU kernel packages that are not on the benchmark machine.

The device image has torch, triton and CUDA but neither ``sgl_kernel`` (sglang-kernel is
hundreds of MB, built for another torch) nor ``cutlass`` (NVIDIA's CuTe DSL). SGLang
0.5.23 imports both at module level on CUDA:

* ``sgl_kernel``: layernorm / activation / rotary / MoE helper kernels, imported by the
  layer modules that the Qwen3 and Qwen3-MoE classes are built from. Only their
  ``forward`` calls them; building a model and loading weights never does.
* ``cutlass``: ``models/qwen2.py`` → ``layers/dual_gemm.py`` → a CuTe-DSL dual-GEMM module
  used only on SM100 (Blackwell), so nothing runs it on an H200.

:func:`activate` appends a finder at the *end* of ``sys.meta_path``: it answers only for
those top-level names, and only when no real finder found them (a real install always
wins). What it hands out are placeholders: attributes are further placeholders, calls
with arguments return placeholders (decorators such as ``@cute.jit`` work), a placeholder
is false and iterates as empty, and anything that needs a real value (a zero-argument
call, ``int()``, arithmetic) raises :class:`StandinUsed` naming the attribute. A benchmark that
runs a forward pass must not use these.

This module lives under ``bench/`` and is never part of the installed package.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Iterable, List, Tuple

__all__ = ["activate", "deactivate", "served", "StandinUsed", "DEFAULT_NAMES"]

DEFAULT_NAMES: Tuple[str, ...] = ("sgl_kernel", "cutlass")
_MARK = "__bench_import_standin__"
_SERVED: List[str] = []


class StandinUsed(RuntimeError):
    """Code needed a real value from a bench import stand-in (a kernel package is missing)."""


def _fail(qualname: str, what: str):
    raise StandinUsed(f"{qualname}: {what} on a bench import stand-in (the real package is not installed)")


class _Value:
    """A placeholder value: any attribute is another placeholder."""

    __slots__ = ("_qualname", "__weakref__")

    def __init__(self, qualname: str):
        object.__setattr__(self, "_qualname", qualname)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Value(f"{self._qualname}.{name}")

    def __setattr__(self, name, value):
        pass

    def __call__(self, *args, **kwargs):
        if not args and not kwargs:
            _fail(self._qualname, "zero-argument call")
        return _Value(f"{self._qualname}(...)")

    def __getitem__(self, key):
        return _Value(f"{self._qualname}[...]")

    def __mro_entries__(self, bases):
        # ``class K(cutlass.SomeBase)``: derive from a fresh empty class instead.
        return (type(self._qualname.rpartition(".")[2] or "Standin", (), {}),)

    def __iter__(self):
        return iter(())  # an empty container, like a missing optional feature list

    def __bool__(self):
        return False

    def __index__(self):
        _fail(self._qualname, "integer conversion")

    __int__ = __index__

    def __float__(self):
        _fail(self._qualname, "float conversion")

    def __repr__(self):
        return f"<bench import stand-in {self._qualname}>"

    def __eq__(self, other):
        return self is other

    def __hash__(self):
        return id(self)


def _arith(self, *args):
    _fail(self._qualname, "arithmetic")


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift"):
    setattr(_Value, f"__{_op}__", _arith)
    setattr(_Value, f"__r{_op}__", _arith)
for _op in ("lt", "le", "gt", "ge"):
    setattr(_Value, f"__{_op}__", _arith)
del _op


class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Value(f"{self.__name__}.{name}")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return _Module(spec.name)

    def exec_module(self, module):
        module.__path__ = []  # a package: ``import a.b.c`` works at any depth
        setattr(module, _MARK, True)
        if "." not in module.__name__:
            module.__version__ = "0.0.0+bench-standin"
        _SERVED.append(module.__name__)


class BenchStandinFinder(importlib.abc.MetaPathFinder):
    """Serves placeholders for ``names`` once every real finder has said no."""

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None

    def invalidate_caches(self):
        pass

    def __repr__(self):
        return f"<BenchStandinFinder {sorted(self.names)} (bench-only)>"


def activate(names: Iterable[str] = DEFAULT_NAMES) -> BenchStandinFinder:
    """Append the finder for ``names`` (idempotent per name set) and return it."""
    names = frozenset(names)
    for finder in sys.meta_path:
        if isinstance(finder, BenchStandinFinder) and finder.names == names:
            return finder
    finder = BenchStandinFinder(names)
    sys.meta_path.append(finder)
    return finder


def deactivate() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, BenchStandinFinder)]


def served() -> List[str]:
    """Module names handed out as stand-ins so far in this process."""
    return list(_SERVED)
