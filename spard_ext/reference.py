"""Plain-torch reference implementations of every spard_ext op.

Written for clarity, not speed: the tests compare the kernels against these. Sums are taken in
float64 so the reference is the more accurate side of every comparison.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# Half-space projection
# ----------------------------------------------------------------------------------------------
def _kept_pairs(x: Sequence[Optional[Tensor]], a: Sequence[Optional[Tensor]]):
    return [(xi, ai) for xi, ai in zip(x, a) if xi is not None and ai is not None]


def project_reduce(x, a, use_dot: bool = True) -> tuple[Tensor, Tensor]:
    """(<a, x>, ||a||²) over the flattened lists, as float32 0-d tensors (summed in float64)."""
    pairs = _kept_pairs(x, a)
    dot = sum((xi.double() * ai.double()).sum() for xi, ai in pairs) if use_dot else 0.0
    sq = sum((ai.double() ** 2).sum() for _, ai in pairs)
    dot = torch.as_tensor(dot, dtype=torch.float64).float()
    sq = torch.as_tensor(sq, dtype=torch.float64).float()
    return dot, sq


def projection_coef(dot: float, sqnorm: float, b: float, max_step: float, use_dot: bool) -> float:
    """clamp((dot·use_dot - b) / sqnorm, 0, max_step); 0 when anything is non-finite or sqnorm = 0."""
    if not all(math.isfinite(v) for v in (dot, sqnorm, b)) or not sqnorm > 0:
        return 0.0
    c = ((dot if use_dot else 0.0) - b) / sqnorm
    c = min(max(c, 0.0), max_step)
    return c if math.isfinite(c) else 0.0


def project(x, a, b: float = 0.0, max_step: float = math.inf, use_dot: bool = False):
    """Functional projection: returns (new_x, coef, dot, sqnorm); None entries stay None."""
    dot, sq = project_reduce(x, a, use_dot)
    coef = projection_coef(float(dot), float(sq), float(b), float(max_step), use_dot)
    new_x = []
    for xi, ai in zip(x, a):
        if xi is None or ai is None or coef == 0.0:
            new_x.append(None if xi is None else xi.clone())
        else:
            new_x.append((xi.double() - coef * ai.double()).to(xi.dtype))
    return new_x, coef, dot, sq
