"""How good a picked safety set is, measured without training (pure functions).

All similarities are cosines of unit-norm prompt embeddings; distance is 1 - cosine.

- coverage of the pool: the mean (and max) distance from a pool row to its nearest pick; lower
  is better (the max is the k-center objective);
- redundancy: the mean and max cosine similarity between two distinct picks; lower is better;
- relevance to the task: the mean over picks of the similarity to the nearest task row (q, as
  RD-DPP defines it) and the mean similarity over all (pick, task row) pairs;
- categories: how many of the pool's harm categories the picks cover, of how many.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def label_set(value) -> frozenset:
    """The categories one row belongs to: a string, a list of strings, or a mapping of category to
    a flag (BeaverTails' ``category`` field: {"animal_abuse": false, ...}). None: none."""
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset([value])
    if isinstance(value, dict):
        return frozenset(str(name) for name, flag in value.items() if flag)
    if isinstance(value, (list, tuple)):
        return frozenset(str(v) for v in value)
    raise ValueError(f"category: expected a string, a list of strings or a mapping to flags, got {value!r}")


def label_key(value) -> str:
    """One stratum name per row (a multi-label row's categories joined)."""
    return "|".join(sorted(label_set(value)))


def _picked(pool_unit: torch.Tensor, picked: Sequence[int]) -> torch.Tensor:
    if len(picked) == 0:
        raise ValueError("picked: empty selection")
    return pool_unit[torch.as_tensor(list(picked), dtype=torch.long, device=pool_unit.device)]


def coverage(pool_unit: torch.Tensor, picked: Sequence[int], *, block: int = 8192) -> dict:
    """Distance (1 - cos) from each pool row to its nearest pick: mean and max over the pool.
    Blocks of ``block`` pool rows keep memory at block x k."""
    centers = _picked(pool_unit, picked)
    nearest = torch.cat([1.0 - (pool_unit[i : i + block] @ centers.T).amax(dim=1)
                         for i in range(0, pool_unit.shape[0], block)]).clamp_min(0.0).double()
    return {"mean": float(nearest.mean()), "max": float(nearest.max())}


def redundancy(picked_unit: torch.Tensor) -> dict:
    """Cosine similarity between distinct picks: mean and max (None for a single pick)."""
    k = picked_unit.shape[0]
    if k < 2:
        return {"mean": None, "max": None}
    sims = (picked_unit @ picked_unit.T).double()
    off = sims[~torch.eye(k, dtype=torch.bool, device=sims.device)]
    return {"mean": float(off.mean()), "max": float(off.max())}


def task_relevance(picked_unit: torch.Tensor, reference_unit: torch.Tensor, *, block: int = 16384) -> dict:
    """``nearest``: mean over picks of max cos to a task row (RD-DPP's q); ``mean``: mean cos over
    every (pick, task row) pair."""
    best = torch.full((picked_unit.shape[0],), -float("inf"), dtype=torch.float64, device=picked_unit.device)
    total = torch.zeros((), dtype=torch.float64, device=picked_unit.device)
    for j in range(0, reference_unit.shape[0], block):
        sims = (picked_unit @ reference_unit[j : j + block].T).double()
        best = torch.maximum(best, sims.amax(dim=1))
        total += sims.sum()
    return {"nearest": float(best.mean()), "mean": float(total / (picked_unit.shape[0] * reference_unit.shape[0]))}


def category_coverage(labels: Sequence, picked: Sequence[int]) -> dict:
    """How many of the pool's categories the picks cover, of how many, and the sizes in the pool
    of those left out."""
    sets = [label_set(v) for v in labels]
    pool_counts: dict = {}
    for s in sets:
        for name in s:
            pool_counts[name] = pool_counts.get(name, 0) + 1
    covered = set().union(*(sets[i] for i in picked)) if len(picked) else set()
    missed = {name: n for name, n in sorted(pool_counts.items()) if name not in covered}
    return {"covered": len(covered & set(pool_counts)), "of": len(pool_counts), "missed": missed}


def selection_quality(pool_unit: Optional[torch.Tensor], picked: Sequence[int], *,
                      reference_unit: Optional[torch.Tensor] = None, labels: Optional[Sequence] = None) -> dict:
    """Every measure that the inputs allow: coverage and redundancy need the pool's unit
    embeddings, relevance the task's too, categories the pool rows' labels."""
    out: dict = {"k": len(picked)}
    if pool_unit is not None:
        unit = _picked(pool_unit, picked)
        out["coverage"] = coverage(pool_unit, picked)
        out["redundancy"] = redundancy(unit)
        if reference_unit is not None and reference_unit.shape[0]:
            out["task_relevance"] = task_relevance(unit, reference_unit)
    if labels is not None:
        out["categories"] = category_coverage(labels, picked)
    return out
