"""Python entry points of the fused half-space projection.

    x <- x - clamp((<a, x>·use_dot - b) / ||a||², 0, max_step) · a

with x and a lists of tensors and the inner products taken over the whole flattened list.

- SPAG (safety projection): x = trainable parameters, a = safety gradients, b = τ - ℓ,
  ``use_dot=False``, ``max_step`` = the trust-region cap η_safe.
- Gradient surgery (A-GEM / SafeGrad): x = utility gradients, a = -safety gradients, b = 0,
  ``use_dot=True``.

Pairs where either entry is None (a parameter without a gradient) are skipped. Tensors may be
non-contiguous (they are worked on through a contiguous copy and written back) and the two lists
may hold different floating dtypes (bf16 parameters with fp32 gradients). Sums are taken in fp64
on the CPU (the products of 16/32-bit inputs are exact there) and, on CUDA, in fp32 within a
16-byte vector and fp64 across; the results are fp32 (±inf when a sum leaves the fp32 range,
which makes the call a no-op). The coefficient is formed in float64 from those float32 sums
(CPU kernels), so a tiny ||a||² still gives its step; the returned coef is its float32 value
(+inf past that range, the step then applied in float64). x is written as by a native in-place
op: every entry is checked before any is written (entries of x must not share memory), and the
version counters are bumped. Nothing here reads a device value on the host.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from itertools import repeat
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ._autograd import inference_error, writable_b
from .flat import FlatLayout

TensorList = Sequence[Optional[Tensor]]
_SEQUENCES = (list, tuple)
_FLOAT32_OVERFLOW = 3.4028235677973366e38  # the smallest magnitude that rounds to inf in float32


class ProjectionResult(NamedTuple):
    coef: Tensor
    """Step actually applied (0-d float32); 0 when the constraint held or a sum was not finite."""
    dot: Tensor
    """<a, x> over the list (0-d float32); 0 when ``use_dot=False``."""
    sqnorm: Tensor
    """||a||² over the list (0-d float32)."""

    @property
    def finite(self) -> Tensor:
        """0-d bool tensor: whether the reductions were finite (when not, x was left untouched)."""
        return torch.isfinite(self.dot) & torch.isfinite(self.sqnorm)


def _entries(seq, name: str, op: str) -> list:
    if isinstance(seq, (Tensor, str, bytes)) or not isinstance(seq, Iterable):
        got = "a single tensor" if isinstance(seq, Tensor) else type(seq).__name__
        raise TypeError(f"{op}: x and a must be lists of tensors, got {got}")
    entries = list(seq)
    for i, t in enumerate(entries):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor or None, got {type(t).__name__}")
    return entries


def _pairs(x, a: TensorList, op: str) -> tuple[list[Tensor], list[Tensor]]:
    if isinstance(x, FlatLayout):  # one flat buffer per group; a holds one tensor per group too
        xs = x.checked_buffers(op)
        if isinstance(a, FlatLayout):
            a = a.checked_buffers(op)
        if type(a) not in _SEQUENCES or len(a) != len(xs) or not all(map(isinstance, a, repeat(Tensor))):
            raise ValueError(f"{op}: x is a FlatLayout of {len(xs)} buffer(s), so a must be a list of "
                             f"{len(xs)} flat tensors shaped like them (layout.zeros()), got "
                             f"{len(a) if type(a) in _SEQUENCES else type(a).__name__}")
        return xs, a
    # The common call (two lists or tuples of tensors, no None) passes through untouched: on a few
    # hundred tensors, building new lists costs as much as the kernels' own checks.
    if (type(x) in _SEQUENCES and type(a) in _SEQUENCES and len(x) == len(a)
            and all(map(isinstance, x, repeat(Tensor))) and all(map(isinstance, a, repeat(Tensor)))):
        return x, a
    x, a = _entries(x, "x", op), _entries(a, "a", op)
    if len(x) != len(a):
        raise ValueError(f"{op}: x and a must have the same length, got {len(x)} and {len(a)}")
    kept = [(xi, ai) for xi, ai in zip(x, a) if xi is not None and ai is not None]
    return [p for p, _ in kept], [g for _, g in kept]


def _scalar(value, name: str, op: str) -> Tensor:
    """A 0-d tensor for ``value``: a tensor stays where it is (a device tensor is read by the
    kernels on the device); a number becomes a CPU scalar, which the CUDA kernels take by value
    (no copy to the device, no host synchronisation, capturable in a CUDA graph). A number must
    be finite in float32: NaN or ±inf there would make the call a silent no-op (a tensor's
    non-finite value does so by design, found on the device without a host read)."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return value
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} must be a scalar (float or one-element tensor), got shape {tuple(value.shape)}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a float or a one-element floating-point tensor, "
                        f"got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and abs(value) < _FLOAT32_OVERFLOW):
        raise ValueError(f"{op}: {name} must be a finite number (in float32), got {value!r}")
    return torch.tensor(value, dtype=torch.float32)


def _max_step(max_step: Optional[float], op: str) -> float:
    if max_step is not None and (isinstance(max_step, bool) or not isinstance(max_step, numbers.Real)):
        raise TypeError(f"{op}: max_step must be a float >= 0 or None (no cap), got {type(max_step).__name__}")
    value = math.inf if max_step is None else float(max_step)
    if not value >= 0:
        raise ValueError(f"{op}: max_step must be >= 0 or None (no cap), got {max_step}")
    return value


def _device(xs: list[Tensor], fallback) -> torch.device:
    """Device of the lists; for empty lists, of ``fallback`` (a tensor or a device), else CPU."""
    if xs:
        return xs[0].device
    if isinstance(fallback, Tensor):
        return fallback.device
    if isinstance(fallback, (str, torch.device)):
        return torch.device(fallback)
    return torch.device("cpu")


# Phrases of the kernels' refusals of a dtype (csrc/project.cpp); every other refusal is a value's.
_TYPE_REFUSALS = ("must be float32, float16, bfloat16 or float64", "must be a floating-point tensor")


def _refusal_type(name: str, message: str):
    """Python type of a refusal of the CPU kernels, or None for any other error.

    The CPU kernels (stable ABI) raise every input refusal as RuntimeError whose message starts
    with the op's name (the CUDA kernels raise ValueError / TypeError themselves); the entry
    points give it the type the CUDA kernels give. Only these messages are re-typed: an error
    from elsewhere (a sparse tensor, a transform such as vmap) goes through as it came.
    """
    if not message.startswith(f"{name}: "):
        return None
    return TypeError if any(p in message for p in _TYPE_REFUSALS) else ValueError


_OPS = {name: getattr(torch.ops.spard_ext, name).default for name in ("project_", "project_apply_", "project_reduce")}
_IS_INFERENCE = Tensor.is_inference
_BELOW_AD_INPLACE_OR_VIEW = torch._C._AutoDispatchBelowADInplaceOrView
_B_INDEX = {"project_": 2, "project_apply_": 4}


def _run(name: str, args: tuple, writes_x: bool):
    """Runs torch.ops.spard_ext.<name>(*args) under no_grad; a refusal of the kernels becomes its
    typed error.

    Eager calls of the writing ops do here what the ADInplaceOrView kernel (_autograd.py) does
    for the raw op, on the lists already at hand, and call the op below that key: the Python
    kernel would convert both lists to Python objects and back on every call, which cost more
    than the kernels on a few hundred small tensors. Under no_grad its grad check has nothing
    to refuse; inference tensors are refused here, before anything is written (a list made only
    of them has no ADInplaceOrView key at all); version counters are bumped after the write.
    While torch.compile traces, the op is called as it is (the traced call reaches that kernel).
    """
    op = _OPS[name]
    xs = args[0]
    try:
        if writes_x and not torch.compiler.is_compiling():
            if not torch.is_inference_mode_enabled() and any(map(_IS_INFERENCE, xs)):
                raise inference_error(name, next(i for i, t in enumerate(xs) if t.is_inference()))
            with _BELOW_AD_INPLACE_OR_VIEW():  # no autograd keys below it: no grad mode to set
                out = op(*args)
            torch.autograd.graph.increment_version(xs)
            return out
        if writes_x:  # traced: b goes through the inference check that runs in the graph
            at = _B_INDEX[name]
            args = args[:at] + (writable_b(xs, args[at], name),) + args[at + 1:]
        with torch.no_grad():
            return op(*args)
    except RuntimeError as e:
        kind = _refusal_type(name, str(e))
        if kind is None:
            raise
        raise kind(str(e)) from None


def _bump_layout(x) -> None:
    # The tensors of a layout keep their own version counters (``t.data = segment`` does not
    # share the buffer's): bump them as a write to each would.
    if isinstance(x, FlatLayout) and not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(x.tensors)


def project_(x: TensorList, a: TensorList, b=0.0, *, max_step: Optional[float] = None,
             use_dot: bool = False) -> ProjectionResult:
    """Project x in place onto the half-space {y : <a, y>·use_dot <= b}, capped at max_step.

    ``x`` may be a :class:`spard_ext.FlatLayout` (its tensors are projected through its flat
    buffers, one tensor per group: far less host time than the list) with ``a`` the matching
    list of flat buffers (``layout.zeros()``); a layout whose tensors changed is refused.

    ``b`` may be a float or a one-element tensor: on the device (read there) or on the CPU
    (passed to the CUDA kernels by value). Neither copies to the device nor waits for it.
    Returns the coefficient and the reductions as 0-d tensors, for logging.
    """
    xs, as_ = _pairs(x, a, "project_")
    bt = _scalar(b, "b", "project_")
    step = _max_step(max_step, "project_")
    coef, dot, sqnorm = _run("project_", (xs, as_, bt, step, bool(use_dot)), True)
    _bump_layout(x)
    return ProjectionResult(coef, dot, sqnorm)


def project_reduce(x: TensorList, a: TensorList, *, use_dot: bool = True,
                   device=None) -> tuple[Tensor, Tensor]:
    """Local partial sums (<a, x>, ||a||²) as 0-d float32 tensors.

    Under sharded training, all-reduce (sum) both, then call :func:`project_apply_`.
    ``device`` places the zeros returned for an empty list (a rank that holds no shard).
    """
    xs, as_ = _pairs(x, a, "project_reduce")
    if not xs:
        dev = _device(xs, device)
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        return zero, zero.clone()
    return tuple(_run("project_reduce", (xs, as_, bool(use_dot)), False))


def project_apply_(x: TensorList, a: TensorList, dot: Tensor, sqnorm: Tensor, b=0.0, *,
                   max_step: Optional[float] = None, use_dot: bool = False) -> Tensor:
    """Apply the projection with already reduced sums; returns the coefficient (0-d float32)."""
    xs, as_ = _pairs(x, a, "project_apply_")
    dot_t = _scalar(dot, "dot", "project_apply_")
    sq_t = _scalar(sqnorm, "sqnorm", "project_apply_")
    bt = _scalar(b, "b", "project_apply_")
    step = _max_step(max_step, "project_apply_")
    coef = _run("project_apply_", (xs, as_, dot_t, sq_t, bt, step, bool(use_dot)), True)
    _bump_layout(x)
    return coef
