"""Tensors laid out as views of one flat buffer, so that a projection over hundreds of them is
one call on one tensor.

    layout = FlatLayout(params)                  # each tensor's memory now lies in layout.buffers
    grads = layout.zeros()                       # flat buffers of the same shape (the gradients)
    torch._foreach_add_(layout.views(grads), per_tensor_grads)
    spard_ext.project_(layout, grads, b)         # one tensor per (device, dtype) group

Why: handing a list of tensors to an op costs the host about 2 µs per tensor pair, so a call on
256 small LoRA tensors costs more host time than a ``torch._foreach_add_`` over them and, on a GPU,
more than the kernels' own work (benchmarks/README.md). Contiguous-gradient optimizers (apex,
Megatron) keep parameters in one buffer for the same reason.

Building the layout copies every tensor into a buffer of its (device, dtype) and points the tensor
at its segment (``t.data = segment``): a ``torch.nn.Parameter`` stays the same object, so an
optimizer, a module and a state dict keep working. Entries must be plain tensors or parameters
that own their memory: a sharded parameter (an FSDP2 DTensor, an FSDP flat parameter, a DeepSpeed
ZeRO-3 partition), a view, or a tensor inside another library's flat buffer (DeepSpeed ZeRO-1/2,
FSDP's use_orig_params: that library updates the parameters through its buffer) is refused in
one line.

Staleness: the layout remembers each tensor's address and size. A tensor replaced (``p.data = ...``,
``module.to(...)`` on a new device or dtype, a load with ``assign=True``), resized or moved no
longer lies in the buffer; ``refresh()`` lays the tensors out again (values kept), and the
projection ops refuse a stale layout in one line rather than write a buffer the tensors have
left (the buffers of ``a`` were filled for the old layout). The layout holds its buffers, so
nothing is ever written to freed memory. The check reads addresses and sizes only (about 0.15 µs
a tensor): a tensor reinterpreted in place as another dtype of the same size is not seen.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional, Sequence

import torch
from torch import Tensor

_DATA_PTR = torch._C.TensorBase.data_ptr
_NUMEL = torch._C.TensorBase.numel


# Set on each tensor a layout places: the address of the buffer it was placed in. A tensor still
# in that buffer was laid out by a FlatLayout (alive or not), not by another library.
_MARK = "_spard_flat_buffer"


def _in_foreign_buffer(t: Tensor) -> bool:
    """Whether t is a window into a larger allocation that no FlatLayout made: the parameters of
    DeepSpeed ZeRO-1/2, FSDP's use_orig_params or a contiguous-gradient optimizer, which that
    library keeps updating through its own buffer."""
    storage = t.untyped_storage()
    if t.numel() == 0 or storage.nbytes() == t.numel() * t.element_size():
        return False
    return getattr(t, _MARK, None) != storage.data_ptr()


class StaleLayoutError(ValueError):
    """A FlatLayout whose tensors no longer lie in its buffers was used (call ``refresh()``)."""


def _sharding(t: Tensor) -> Optional[str]:
    """What kind of sharded parameter ``t`` is, or None."""
    if type(t).__name__ == "DTensor":
        return "a DTensor (sharded by FSDP2 or tensor parallelism)"
    if getattr(t, "_is_flat_param", False):
        return "an FSDP flat parameter"
    if hasattr(t, "ds_id"):
        return "a DeepSpeed ZeRO-3 partitioned parameter"
    return None


def _span(t: Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) of t's elements (strides are >= 0 for owned memory)."""
    if t.numel() == 0:
        return (t.data_ptr(), t.data_ptr())
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size())


def layout_problem(tensors: Sequence, name: str = "tensors",
                   names: Optional[Sequence[str]] = None) -> Optional[str]:
    """Why ``tensors`` cannot be laid out flat (one line), or None when they can."""
    def label(i: int) -> str:
        return names[i] if names is not None else f"{name}[{i}]"

    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            return f"{label(i)} must be a tensor, got {type(t).__name__}"
        sharded = _sharding(t)
        if sharded:
            return (f"{label(i)} is {sharded}: a flat layout needs whole tensors on this process; "
                    "sharded parameters are projected as lists of their local shards "
                    "(spard.distributed.project_across_ranks)")
        if type(t) not in (Tensor, torch.nn.Parameter):
            return f"{label(i)} is a {type(t).__name__}: a flat layout takes plain tensors and torch.nn.Parameter"
        if t.layout != torch.strided:
            return f"{label(i)} has layout {t.layout}: a flat layout takes dense (strided) tensors"
        if not t.is_floating_point():
            return f"{label(i)} has dtype {t.dtype}: a flat layout takes floating-point tensors"
        if t.device.type == "meta":
            return f"{label(i)} is on the meta device (no memory to lay out): materialize the model first"
        if t.is_inference():
            return f"{label(i)} is an inference tensor: lay out tensors made outside torch.inference_mode()"
        if t.requires_grad and not t.is_leaf:
            return f"{label(i)} is not a leaf (it has a grad_fn): a flat layout takes parameters and other leaves"
        if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
            return f"{label(i)} has elements that share memory (an expanded view)"
        if t._is_view():
            return (f"{label(i)} is a view of another tensor: laid out, it would stop sharing memory "
                    "with its base; pass the base")
        if _in_foreign_buffer(t):
            return (f"{label(i)} lies inside a larger buffer (another library's flat parameters: DeepSpeed "
                    "ZeRO, FSDP use_orig_params, a contiguous-gradient optimizer), which would no longer "
                    "update it once laid out again")
    spans = sorted((str(t.device),) + _span(t) + (i,) for i, t in enumerate(tensors) if t.numel())
    for (d0, _, e0, i), (d1, s1, _, j) in zip(spans, spans[1:]):
        if d0 == d1 and s1 < e0:
            i, j = min(i, j), max(i, j)
            return f"{label(i)} and {label(j)} share memory (the same tensor twice, or tied weights)"
    return None


class FlatLayout:
    """``tensors`` laid out as views of one flat buffer per (device, dtype) group.

    Args:
        tensors: leaf tensors or ``torch.nn.Parameter`` objects, in the order their views keep.
        name: what the tensors are, for messages ("tensors[3] ...").
        names: one name per tensor (parameter names), for messages instead.

    Attributes:
        tensors: the tensors, as given.
        buffers: one flat contiguous buffer per group, in the order of their first tensor.
        rebuilds: how many times ``refresh()`` laid the tensors out again.
    """

    def __init__(self, tensors: Iterable[Tensor], *, name: str = "tensors",
                 names: Optional[Sequence[str]] = None):
        if isinstance(tensors, Tensor) or not isinstance(tensors, Iterable):
            raise TypeError(f"FlatLayout: {name} must be a list of tensors, got {type(tensors).__name__}")
        self.tensors = list(tensors)
        if names is not None and len(names) != len(self.tensors):
            raise ValueError(f"FlatLayout: names has {len(names)} entries for {len(self.tensors)} tensors")
        self.name, self.names = name, None if names is None else list(names)
        problem = layout_problem(self.tensors, name, self.names)
        if problem:
            raise ValueError(f"FlatLayout: {problem}")
        self.rebuilds = 0
        self._build()

    def __len__(self) -> int:
        return len(self.buffers)

    def __repr__(self) -> str:
        groups = ", ".join(f"{b.numel()} x {str(b.dtype).replace('torch.', '')} on {b.device}" for b in self.buffers)
        return f"FlatLayout({len(self.tensors)} tensors in {len(self.buffers)} buffer(s): {groups})"

    # -- building --------------------------------------------------------------------------------
    def _build(self) -> None:
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(self.tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        buffers, slots = [], [None] * len(self.tensors)
        with torch.no_grad():
            for g, ((device, dtype), members) in enumerate(groups.items()):
                buf = torch.empty(sum(self.tensors[i].numel() for i in members), dtype=dtype, device=device)
                offset = 0
                for i in members:
                    t = self.tensors[i]
                    segment = buf[offset:offset + t.numel()].view(t.shape)
                    segment.copy_(t)
                    t.data = segment  # the same tensor object, its memory now in the buffer
                    setattr(t, _MARK, buf.data_ptr())
                    slots[i] = (g, offset, t.numel(), t.shape)
                    offset += t.numel()
                buffers.append(buf)
        self.buffers: list[Tensor] = buffers
        self._slots = slots
        self._ptrs = list(map(_DATA_PTR, self.tensors))
        self._numels = list(map(_NUMEL, self.tensors))

    # -- staleness -------------------------------------------------------------------------------
    def stale(self) -> Optional[str]:
        """None while every tensor lies where the layout put it; else what changed (one line)."""
        if list(map(_DATA_PTR, self.tensors)) == self._ptrs and list(map(_NUMEL, self.tensors)) == self._numels:
            return None
        for i, t in enumerate(self.tensors):
            what = self.names[i] if self.names is not None else f"{self.name}[{i}]"
            if t.numel() != self._numels[i]:
                return f"{what} was resized ({self._numels[i]} -> {t.numel()} elements)"
            if t.data_ptr() != self._ptrs[i]:
                return f"{what} was replaced or moved (its memory is no longer in the layout's buffer)"
        return None  # pragma: no cover  (the lists differed, so some entry did)

    def refresh(self) -> bool:
        """Lays the tensors out again if any changed (values kept); returns whether it did.
        Buffers made by ``zeros()`` before a refresh belong to the old layout: make new ones."""
        if self.stale() is None:
            return False
        problem = layout_problem(self.tensors, self.name, self.names)
        if problem:
            raise ValueError(f"FlatLayout.refresh: {problem}")
        self._build()
        self.rebuilds += 1
        return True

    def checked_buffers(self, op: str) -> list[Tensor]:
        """The buffers, after the staleness check (``op`` names the caller in the refusal)."""
        why = self.stale()
        if why is not None:
            raise StaleLayoutError(f"{op}: the FlatLayout's tensors changed since it was built: {why}; "
                                   "call layout.refresh() and refill the buffers of a")
        return self.buffers

    # -- buffers of the same shape ---------------------------------------------------------------
    def zeros(self, dtype: Optional[torch.dtype] = None) -> list[Tensor]:
        """New zero buffers shaped like the layout's (for gradients); ``dtype`` overrides each group's."""
        return [torch.zeros(b.numel(), dtype=dtype or b.dtype, device=b.device) for b in self.buffers]

    def views(self, buffers: Sequence[Tensor]) -> list[Tensor]:
        """One view per tensor into ``buffers`` (from ``zeros()``), each shaped like its tensor."""
        if len(buffers) != len(self.buffers) or any(
                not isinstance(b, Tensor) or b.dim() != 1 or b.numel() != own.numel() or b.device != own.device
                for b, own in zip(buffers, self.buffers)):
            raise ValueError(f"FlatLayout.views: buffers must be {len(self.buffers)} flat tensors shaped like "
                             "the layout's (layout.zeros()), got "
                             + ", ".join(f"{tuple(b.shape)} on {b.device}" if isinstance(b, Tensor) else type(b).__name__
                                         for b in buffers))
        return [buffers[g][offset:offset + n].view(shape) for g, offset, n, shape in self._slots]
