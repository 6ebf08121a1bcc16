"""Safety-set selection methods, one module each, registered by name.

Every method picks ``k`` rows of the safety pool from what ``Candidates`` holds about it; what it
needs beyond the pool (``NEEDS``: "embeddings" of the pool's prompts, "reference" = the user's
task rows) is checked by ``spard.select.select_safe_data`` before any row is embedded.

| name | module | what it picks |
| --- | --- | --- |
| rd-dpp | rd_dpp | greedy MAP of a DPP with kernel diag(r) Ê Êᵀ diag(r): relevant and diverse (SPARD) |
| random | uniform | a seeded uniform sample |
| relevance | relevance | the top k by relevance to the task |
| dpp | dpp | greedy MAP of a DPP with kernel Ê Êᵀ: diverse only |
| k-center | k_center | farthest-first traversal (k-center greedy) |
| behavior-aware | behavior_aware | refusals, spread evenly over harm topics and clusters (Pham et al. 2025) |

Pharmacist (Liu et al., NeurIPS 2025) is not here: its ranking comes from a selector trained
jointly with the model on the alignment data (docs/data-and-selection.md says more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import behavior_aware, dpp, k_center, rd_dpp, relevance, uniform


@dataclass
class Candidates:
    """What a method may use about the pool's ``n`` rows."""

    n: int
    seed: int = 0
    unit: Optional[torch.Tensor] = None
    """[n, d] unit-norm prompt embeddings (None without an embedder)."""
    q: Optional[torch.Tensor] = None
    """[n] relevance to the task, q_i = max_z cos(ê_i, ê_z) (None without task rows)."""
    beta: float = 4.0
    refusals: Optional[Sequence[str]] = None
    """The rows' ``safe`` responses."""
    categories: Optional[Sequence] = None
    """The rows' harm-category labels, when the pool has them."""


@dataclass(frozen=True)
class Method:
    name: str
    needs: tuple
    pick: Callable[[Candidates, int], list]
    source: str


METHODS: dict[str, Method] = {
    m.NAME: Method(m.NAME, tuple(m.NEEDS), m.pick, m.SOURCE)
    for m in (rd_dpp, uniform, relevance, dpp, k_center, behavior_aware)
}

__all__ = ["Candidates", "METHODS", "Method"]
