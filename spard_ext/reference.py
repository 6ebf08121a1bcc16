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


# ----------------------------------------------------------------------------------------------
# Greedy DPP MAP inference
# ----------------------------------------------------------------------------------------------
def _dpp_masks(n: int, include, exclude, device) -> tuple[Tensor, Tensor]:
    """(available, included) bool masks; include/exclude may be bool masks or index lists."""

    def as_mask(m):
        out = torch.zeros(n, dtype=torch.bool, device=device)
        if m is None:
            return out
        m = torch.as_tensor(m, device=device)
        if m.dtype == torch.bool:
            return out | m
        out[m.long()] = True
        return out

    excluded = as_mask(exclude)
    return ~excluded, as_mask(include) & ~excluded


def dpp_greedy(kernel: Optional[Tensor] = None, *, factor: Optional[Tensor] = None, k: int,
               eps: float = 1e-6, eps_stop: float = 1e-10, include=None, exclude=None,
               dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Greedy MAP inference by the incremental Cholesky update (Chen, Zhang, Zhou, 2018).

    Either a dense PSD ``kernel`` L (N x N) or a low-rank ``factor`` F (N x D), meaning
    L = F Fᵀ + eps·I (never built). Items in ``include`` are taken first (greedily among
    themselves; once the best of them fails the stop rule, the rest are left to the general
    pool and the picks go on over all items), items in ``exclude`` never. Stops after k picks, when no candidate is left, or
    when the best gain is below ``eps_stop`` (or not positive). Ties go to the smallest index.
    ``dtype`` is the working precision. Returns (indices int64, gains float64 = d² at pick time).
    """
    if kernel is not None:
        mat = kernel.to(dtype)
        n = mat.shape[0]
        d2 = mat.diagonal().clone()

        def row(j):
            return mat[j]
    else:
        mat = factor.to(dtype)
        n = mat.shape[0]
        d2 = (mat * mat).sum(1) + eps
        eye = torch.eye(n, dtype=dtype, device=mat.device) if n <= 4096 else None

        def row(j):
            # elementwise product + sum: identical rows give bit-identical values (exact ties)
            r = (mat * mat[j]).sum(1)
            if eye is not None:
                return r + eps * eye[j]
            r[j] += eps
            return r

    available, included = _dpp_masks(n, include, exclude, mat.device)
    k_max = max(0, min(int(k), n))
    c = torch.zeros(k_max, n, dtype=dtype, device=mat.device)
    picks, gains = [], []
    while (t := len(picks)) < k_max:
        pool = included if bool(included.any()) else available
        if not bool(pool.any()):
            break
        scores = torch.where(pool, d2, torch.full_like(d2, -math.inf))
        j = int(torch.argmax(scores))  # first maximum: ties go to the smallest index
        gain = float(d2[j])
        if not (gain >= eps_stop and gain > 0):
            if pool is included:  # no include item can be picked: go on over all items
                included[:] = False
                continue
            break
        picks.append(j)
        gains.append(gain)
        available[j] = False
        included[j] = False
        e = (row(j) - (c[:t] * c[:t, j : j + 1]).sum(0)) / math.sqrt(gain)
        c[t] = e
        d2 = d2 - e * e
    return (torch.tensor(picks, dtype=torch.int64, device=mat.device),
            torch.tensor(gains, dtype=torch.float64, device=mat.device))


def dpp_greedy_brute_force(kernel: Tensor, *, k: int, eps_stop: float = 1e-10, include=None,
                           exclude=None) -> tuple[Tensor, Tensor]:
    """The greedy by definition: each step, argmax over candidates i of log det L_{Y+i} (fp64).

    For small N only (one slogdet per candidate per step). Same masks, stop rule and tie rule
    as :func:`dpp_greedy`; the gain is det L_{Y+i} / det L_Y.
    """
    mat = kernel.double()
    n = mat.shape[0]
    available, included = _dpp_masks(n, include, exclude, mat.device)
    picks, gains, logdet = [], [], 0.0
    while len(picks) < max(0, min(int(k), n)):
        pool = included if bool(included.any()) else available
        best, best_j = -math.inf, -1
        for i in torch.nonzero(pool).flatten().tolist():
            idx = torch.tensor(picks + [i])
            sign, ld = torch.linalg.slogdet(mat[idx][:, idx])
            value = float(ld) if float(sign) > 0 else -math.inf
            if value > best:
                best, best_j = value, i
        gain = math.exp(best - logdet) if best_j >= 0 else 0.0
        if best_j < 0 or not (gain >= eps_stop and gain > 0):
            if pool is included:  # no include item can be picked: go on over all items
                included[:] = False
                continue
            break
        picks.append(best_j)
        gains.append(gain)
        logdet = best
        available[best_j] = False
        included[best_j] = False
    return torch.tensor(picks, dtype=torch.int64), torch.tensor(gains, dtype=torch.float64)
