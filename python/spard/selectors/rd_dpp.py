"""rd-dpp: relevance-weighted DPP, SPARD's selection (docs/algorithms.md, "RD-DPP").

    r_i = clamp(q_i, 0)^β;  F = diag(r) Ê;  L = F Fᵀ + εI (never built)
    Y = greedy MAP of det(L_Y), |Y| = k   (spard_ext.dpp_greedy, Chen et al. 2018)
"""

from __future__ import annotations

NAME = "rd-dpp"
NEEDS = ("embeddings", "reference")
SOURCE = "SPARD: greedy MAP of a DPP with quality r = clamp(q, 0)^beta"
EPS = 1e-6


def factor(unit, q, beta: float):
    """F = diag(r) Ê with r = clamp(q, 0)^β, so that L = F Fᵀ + ε I."""
    return q.clamp_min(0.0).pow(beta).unsqueeze(1) * unit


def pick(c, k: int) -> list[int]:
    import spard_ext

    return spard_ext.dpp_greedy(factor=factor(c.unit, c.q, c.beta), k=k, eps=EPS).indices.cpu().tolist()
