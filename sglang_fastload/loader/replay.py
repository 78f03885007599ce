"""Discover where every checkpoint tensor lands by replaying the model's own ``load_weights``.

Each checkpoint tensor is replaced by a *probe*: a meta tensor of the same shape and dtype,
which holds no data. SGLang's real ``load_weights`` and weight loaders run on the probes,
so name mapping, stacking (q/k/v, gate/up), tied embeddings, tensor-parallel slicing,
kv-head replication and expert placement are exactly upstream's. A dispatch mode
intercepts the writes: each ``copy_`` into a parameter is recorded (which probe elements
go to which parameter elements) instead of run, each ``zero_``/``fill_(0)`` is recorded as
padding. No parameter is modified during a replay.

Anything a loader does that cannot be expressed as "copy a strided view of a checkpoint
tensor into a strided view of a parameter" raises ``UnsupportedModelError``; the caller then
uses upstream's loader for the whole load.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_fastload.errors import CheckpointMismatchError, UnsupportedModelError
from sglang_fastload.module_walks import parameters_by_name

aten = torch.ops.aten

# View geometry in elements: (storage offset, sizes, strides).
Geometry = Tuple[int, Tuple[int, ...], Tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class RecordedCopy:
    """One ``param_view.copy_(checkpoint_view)`` seen during a replay."""

    tensor: str  # checkpoint tensor name
    param: str  # parameter name (as in model.named_parameters())
    src: Geometry  # elements of the checkpoint tensor (contiguous, row-major)
    dst: Geometry  # elements of the parameter's storage, relative to the parameter's offset


@dataclasses.dataclass(frozen=True)
class RecordedZero:
    """A region of a parameter that the loaders zero-fill (padding)."""

    param: str
    dst: Geometry


@dataclasses.dataclass
class ReplayResult:
    copies: List[RecordedCopy]
    zeros: List[RecordedZero]
    tensors_used: set  # checkpoint names that fed at least one parameter on this rank
    # For each zero-fill, how many copies the loaders had made before it (their order).
    zeros_after: List[int] = dataclasses.field(default_factory=list)


# Widths a float checkpoint tensor may have when it feeds a float parameter of another dtype:
# upstream's ``param.copy_(tensor)`` rounds them to the parameter's dtype, and so does the
# executor. Integers, booleans and fp8 (quantized values without their scales) are refused:
# upstream would copy their raw values into an unquantized weight, which is never meant.
CONVERTIBLE_FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def converts_like_upstream(src: torch.dtype, dst: torch.dtype) -> bool:
    """True when a ``src`` checkpoint tensor may be copied (converted) into a ``dst`` parameter."""
    return src in CONVERTIBLE_FLOATS and dst in CONVERTIBLE_FLOATS


def _geometry(t: torch.Tensor, base_offset: int = 0) -> Geometry:
    return (t.storage_offset() - base_offset, tuple(t.shape), tuple(t.stride()))


# How the recorder treats an operator (decided once per operator, ``_kind_of``).
_PURE, _COPY, _ZERO, _FILL, _MUTATING = range(5)


def _kind_of(func) -> int:
    if func is aten.copy_.default:
        return _COPY
    if func is aten.zero_.default:
        return _ZERO
    if func is aten.fill_.Scalar:
        return _FILL
    return _MUTATING if func._schema.is_mutable else _PURE


class _CopyRecorder(TorchDispatchMode):
    """Records copies from probes into parameters; lets pure (non-mutating) ops run."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Otherwise torch wraps ``__torch_dispatch__`` in two Python layers that switch
        # TorchDynamo off for it: a replay never runs under torch.compile, and the
        # wrappers cost ~15 % of a MoE replay (87,000 operations at 48 x 128 experts, CPU).
        return False

    def __init__(self, params: Dict[str, torch.nn.Parameter]):
        super().__init__()
        # storage identity -> (parameter name, parameter storage offset)
        self.param_storages = {}
        for name, p in params.items():
            self.param_storages.setdefault(p.untyped_storage()._cdata, (name, p.storage_offset()))
        self.probes = {}  # storage identity -> checkpoint tensor name
        self.current: Optional[str] = None
        self.copies: List[RecordedCopy] = []
        self.zeros: List[RecordedZero] = []
        self.zeros_after: List[int] = []
        self.used: set = set()
        # Most operations a loader runs are views (slice, select, detach: ~3 per expert
        # tensor of a MoE): each is classified once, then run with no further test, through
        # the operator's own callable (an overload's ``__call__`` is one more Python frame).
        self.kinds: Dict[object, int] = {}
        self.pure: Dict[object, object] = {}

    def _param_of(self, t: torch.Tensor):
        return self.param_storages.get(t.untyped_storage()._cdata)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        run = self.pure.get(func)
        if run is not None:
            return run(*args, **kwargs) if kwargs else run(*args)
        kind = self.kinds.get(func)
        if kind is None:
            kind = self.kinds[func] = _kind_of(func)
            if kind == _PURE:
                self.pure[func] = getattr(func, "_op", func)
        if kind == _PURE:
            return func(*args, **kwargs) if kwargs else func(*args)
        if kind == _COPY:
            return self._record_copy(args[0], args[1])
        kwargs = kwargs or {}
        if kind == _ZERO or (kind == _FILL and args[1] == 0):
            target = self._param_of(args[0])
            if target is None:
                return func(*args, **kwargs)
            self.zeros.append(RecordedZero(target[0], _geometry(args[0], target[1])))
            self.zeros_after.append(len(self.copies))
            return args[0]
        # A mutating operation (``fill_`` with another value included): refused on a parameter.
        for a in args:
            if isinstance(a, torch.Tensor) and self._param_of(a) is not None:
                raise UnsupportedModelError(
                    f"weight loader applies {func} to parameter {self._param_of(a)[0]} "
                    f"while loading {self.current!r}"
                )
        return func(*args, **kwargs)

    def _record_copy(self, dst: torch.Tensor, src: torch.Tensor):
        target = self._param_of(dst)
        probe = self.probes.get(src.untyped_storage()._cdata) if src.is_meta else None
        if target is None:
            if probe is not None or dst.is_meta:
                raise UnsupportedModelError(
                    f"weight loader copies checkpoint tensor {self.current!r} into a temporary, "
                    "not into a parameter"
                )
            return aten.copy_.default(dst, src)
        if probe is None:
            raise UnsupportedModelError(
                f"weight loader writes parameter {target[0]} from a computed tensor while "
                f"loading {self.current!r}"
            )
        if dst.shape != src.shape:
            raise CheckpointMismatchError(
                "<checkpoint>",
                f"has shape that does not fit parameter {target[0]!r}: the loader copies "
                f"{list(src.shape)} into {list(dst.shape)}",
                tensor=probe,
            )
        if dst.dtype != src.dtype and not converts_like_upstream(src.dtype, dst.dtype):
            raise CheckpointMismatchError(
                "<checkpoint>",
                f"has dtype {src.dtype} but parameter {target[0]!r} is {dst.dtype}: only "
                "floating-point tensors (16, 32 or 64 bits) are converted; upstream's copy would "
                "turn integer, boolean or fp8 values into weights unscaled",
                tensor=probe,
            )
        self.copies.append(RecordedCopy(probe, target[0], _geometry(src), _geometry(dst, target[1])))
        self.used.add(probe)
        return dst


def replay_load_weights(
    model: torch.nn.Module,
    tensors: Iterable[Tuple[str, Tuple[int, ...], torch.dtype]],
    load_weights,
    params: Optional[Dict[str, torch.nn.Parameter]] = None,
) -> ReplayResult:
    """Run ``load_weights(model, probes)`` with meta probes and record every parameter write.

    Args:
        model: the live SGLang model (parameters are read, never written).
        tensors: ``(checkpoint name, shape, torch dtype)`` for every checkpoint tensor,
            in the order upstream would see them.
        load_weights: ``callable(model, iterator of (name, tensor))``, normally upstream's
            ``DefaultModelLoader.load_weights_only`` bound to the target device.
        params: ``parameters_by_name(model)`` when the caller has it (else walked here).

    Returns:
        The recorded copies and zero-fills, and the names that fed this rank.

    Raises:
        UnsupportedModelError: a loader does something other than strided copies.
        CheckpointMismatchError: a tensor's shape or dtype does not fit its parameter
            (the path is filled in by the caller).
    """
    recorder = _CopyRecorder(parameters_by_name(model) if params is None else params)

    # Made before the recorder is active: under it every factory call pays the mode's
    # dispatch (~11 % of a MoE replay on CPU). Meta tensors hold no memory.
    made = []
    for name, shape, dtype in tensors:
        probe = torch.empty(shape, dtype=dtype, device="meta")
        recorder.probes[probe.untyped_storage()._cdata] = name
        made.append((name, probe))

    def probes():
        for name, probe in made:
            recorder.current = name
            yield name, probe

    with recorder:
        try:
            load_weights(model, probes())
        except (UnsupportedModelError, CheckpointMismatchError):
            raise
        except Exception as exc:
            if isinstance(exc, NotImplementedError) or "meta" in str(exc).lower():
                # The loader needs real values (e.g. .item() on a scale; an operator with no
                # kernel for meta tensors): not plannable, and upstream's path loads it.
                raise UnsupportedModelError(
                    f"weight loader needs tensor values while loading {recorder.current!r}: {exc}"
                ) from exc
            raise CheckpointMismatchError(
                "<checkpoint>",
                f"upstream's weight loader rejects it: {type(exc).__name__}: {exc}",
                tensor=recorder.current,
            ) from exc
    return ReplayResult(recorder.copies, recorder.zeros, recorder.used, recorder.zeros_after)
