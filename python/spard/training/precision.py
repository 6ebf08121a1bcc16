"""Mixed precision the way the ecosystem does it: the base weights keep the model's dtype
(bf16/fp16), the trainable (LoRA) weights and the optimizer state are fp32, and the forward pass
runs under ``torch.autocast`` in the base dtype."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

HALF = (torch.bfloat16, torch.float16)


def base_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the frozen floating-point weights (the trainable ones when all train)."""
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    if frozen:
        return max(set(frozen), key=frozen.count)
    params = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return params[0] if params else torch.float32


def upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable parameters in fp32 (peft does this for adapters on half models; this also
    covers any other trainable weight), so the optimizer state is fp32 too."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in HALF:
            p.data = p.data.float()


def autocast_for(model: torch.nn.Module) -> Callable[[], object]:
    """A context factory: autocast in the base dtype for a half-precision model, else no-op."""
    dtype = base_dtype(model)
    if dtype not in HALF:
        return nullcontext
    device_type = next(model.parameters()).device.type
    return lambda: torch.autocast(device_type=device_type, dtype=dtype)
