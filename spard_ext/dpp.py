"""Greedy MAP inference for a determinantal point process (Chen, Zhang, Zhou, NeurIPS 2018).

Pick k items one by one, each maximising the gain in log det L_Y. The kernel is either dense
(``kernel``, N x N, symmetric PSD) or low rank plus a ridge (``factor`` F, N x D):
L = F Fᵀ + eps·I, where the N x N matrix is never built.

    res = dpp_greedy(factor=emb * quality[:, None], k=1000)
    res.indices   # int64, in pick order
    res.gains     # float64, d² of each pick at pick time; res.logdet = Σ log d² = log det L_Y

Rules (the same on every backend and in ``spard_ext.reference.dpp_greedy``):
- ties go to the smallest index, so the result is deterministic;
- ``include`` items are picked first (greedily among themselves), ``exclude`` items never; once
  the best included item fails the stop rule, the other included items are left to the
  general pool and the picks go on over all items;
- the loop stops after k picks, when no candidate is left (k > N is fine), or when the best
  gain is below ``eps_stop`` or not positive. In low-rank form every gain is at least about
  eps, so with the default eps_stop (1e-10 < eps) picks go on past the rank of F, ordered by
  the ridge (quality); a dense singular kernel stops at its rank only as far as its entries
  are exact: a kernel rounded to float32 leaves gains of about 1e-7 x its largest diagonal
  entry past the rank, so stop at the numerical rank with eps_stop ~ 1e-5 x that entry
  (docs/dpp.md).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import NamedTuple, Optional

import torch
from torch import Tensor

METHODS = ("auto", "cholesky", "inverse")


class DppResult(NamedTuple):
    indices: Tensor
    """Picked items (int64), in pick order."""
    gains: Tensor
    """d² of each pick at the time it was picked (float64); log det L_Y = Σ log d²."""

    @property
    def logdet(self) -> Tensor:
        """log det of the kernel restricted to the picked items (0-d float64)."""
        return torch.log(self.gains).sum()


def _mask(value, name: str, n: int, device: torch.device, owner: str) -> Optional[Tensor]:
    """A bool mask of length n (or None) from a bool mask or a sequence/tensor of indices.

    An empty sequence means no item. A tensor must be on ``device`` or on the CPU (then moved,
    without waiting for the device).
    """
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"dpp_greedy: {name} must be on {device} like the {owner}, got {value.device}")
        t = value
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None:
            raise TypeError(f"dpp_greedy: {name} must be a bool mask or integer indices, got {type(value).__name__}")
    if t.numel() == 0 and t.dim() <= 1 and not (t.dtype == torch.bool and n == 0):
        return None  # [], (), an empty index array of any dtype: no item
    if t.dtype == torch.bool:
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(f"dpp_greedy: {name} as a bool mask must have length N = {n}, got shape {tuple(t.shape)}")
        return t.to(device, non_blocking=True)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"dpp_greedy: {name} must be a bool mask or integer indices, got {t.dtype}")
    t = t.reshape(-1).long()
    lo, hi = torch.stack([t.min(), t.max()]).tolist()  # one host read (none for CPU indices)
    if lo < 0 or hi >= n:
        raise ValueError(f"dpp_greedy: {name} indices must lie in [0, {n}), got range [{lo}, {hi}]")
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    mask[t] = True
    return mask.to(device, non_blocking=True)


def _count(value, name: str) -> int:
    """An int >= 0 from an int, a numpy integer or anything with __index__ (not a bool)."""
    if not isinstance(value, bool):
        try:
            value = operator.index(value)
        except TypeError:
            pass
        else:
            if value >= 0:
                return value
    raise ValueError(f"dpp_greedy: {name} must be an int >= 0, got {value!r}")


def _number(value, name: str, *, at_least_zero: bool) -> float:
    """A float from a real number (numpy scalars too); NaN refused, and < 0 where asked."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok and at_least_zero:
        ok = value >= 0
    if not ok:
        raise ValueError(f"dpp_greedy: {name} must be a number{' >= 0' if at_least_zero else ''}, got {value!r}")
    return float(value)


def dpp_greedy(kernel: Optional[Tensor] = None, *, factor: Optional[Tensor] = None, k: int,
               eps: float = 1e-6, eps_stop: float = 1e-10, include=None, exclude=None,
               method: str = "auto") -> DppResult:
    """Greedy DPP MAP inference; see the module docstring for the rules.

    Args:
        kernel: dense PSD kernel (N x N, float32/float64), or None with ``factor``.
        factor: low-rank factor F (N x D, float32/float64); L = F Fᵀ + eps·I.
        k: number of items to pick (>= 0).
        eps: ridge of the low-rank form (ignored for a dense kernel).
        eps_stop: stop when the best gain d² falls below this.
        include / exclude: bool masks of length N, or index sequences.
        method: low-rank update: "cholesky" (incremental Cholesky, O(N k) memory), "inverse"
            (keeps (F_Yᵀ F_Y + eps I)⁻¹, O(N + k D + D²) memory, needs eps > 0) or "auto" (the
            cheaper for these sizes). A dense kernel always uses the Cholesky update.

    The inputs stay where they are (CPU or CUDA); on CUDA the loop runs on the device and the
    host reads the device once, at the end (the number of picks and the input checks).
    """
    if (kernel is None) == (factor is None):
        raise ValueError("dpp_greedy: give exactly one of kernel (dense N x N) or factor (N x D)")
    k = _count(k, "k")
    eps = _number(eps, "eps", at_least_zero=True)
    eps_stop = _number(eps_stop, "eps_stop", at_least_zero=False)
    if method not in METHODS:
        raise ValueError(f"dpp_greedy: method must be one of {METHODS}, got {method!r}")
    mat = kernel if kernel is not None else factor
    name = "kernel" if kernel is not None else "factor"
    if not isinstance(mat, Tensor):
        raise TypeError(f"dpp_greedy: {name} must be a tensor, got {type(mat).__name__}")
    if mat.dim() != 2:
        raise ValueError(f"dpp_greedy: {name} must be 2-D, got shape {tuple(mat.shape)}")
    n = mat.shape[0]
    inc = _mask(include, "include", n, mat.device, name)
    exc = _mask(exclude, "exclude", n, mat.device, name)
    if kernel is not None:
        idx, gains = _run("dpp_greedy_dense", (kernel.detach(), k, eps_stop, inc, exc))
    else:
        idx, gains = _run("dpp_greedy_lowrank", (factor.detach(), k, eps, eps_stop, inc, exc, method))
    return DppResult(idx, gains)


def _run(name: str, args: tuple):
    """Runs torch.ops.spard_ext.<name>(*args) under no_grad. The CPU kernels (stable ABI) raise
    their input refusals as RuntimeError with a message that starts with the op's name: here
    that becomes TypeError for a matrix of the wrong dtype and ValueError for the rest (shape,
    non-finite entries, an asymmetric kernel, overlapping masks), as the CUDA kernels raise."""
    try:
        with torch.no_grad():
            return getattr(torch.ops.spard_ext, name)(*args)
    except RuntimeError as e:
        message = str(e)
        if not message.startswith(f"{name}: "):
            raise
        kind = ValueError if args[0].dtype in (torch.float32, torch.float64) else TypeError
        raise kind(message) from None
