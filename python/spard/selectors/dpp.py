"""dpp: diversity only, the DPP of RD-DPP without its relevance term.

    L = Ê Êᵀ + εI (cosine similarity of the pool's prompts);  Y = greedy MAP of det(L_Y), |Y| = k

Same kernel code as RD-DPP (spard_ext.dpp_greedy with factor Ê). L has rank at most d (the
embedding width): past d picks every gain is about ε, and further picks go by index.
"""

from __future__ import annotations

from .rd_dpp import EPS

NAME = "dpp"
NEEDS = ("embeddings",)
SOURCE = "greedy MAP of a DPP with a pure-similarity kernel (Chen et al. 2018)"


def pick(c, k: int) -> list[int]:
    import spard_ext

    return spard_ext.dpp_greedy(factor=c.unit, k=k, eps=EPS).indices.cpu().tolist()
