"""behavior-aware: the diversity-aware safety sampler of Pham et al., "Preventing Catastrophic
Forgetting: Behavior-Aware Sampling for Safer Language Model Fine-Tuning" (EMNLP 2025 Industry,
arXiv 2510.21885). Safety examples are chosen by their response behaviour (refusals) and spread
over harm categories by semantic clustering.

    1. behaviour: candidates = rows whose ``safe`` response is a refusal (refusal-keyword judge);
       all rows when fewer than k are
    2. strata: the rows' harm categories when the pool has them, else C = min(k, 14) k-means
       clusters of the candidates' prompt embeddings (14: BeaverTails' harm categories)
    3. quotas: k dealt round-robin over the strata, largest first, a stratum never given more
       rows than it has (so small categories get as many picks as big ones)
    4. within a stratum of quota m: k-means into m clusters, pick the row nearest each centroid

Our reading where the paper leaves a gap: the cluster counts, k-means in cosine geometry
(spherical, seeded k-means++) and the nearest-to-centroid representative are ours.
"""

from __future__ import annotations

import torch

from .kmeans import kmeans

NAME = "behavior-aware"
NEEDS = ("embeddings",)
SOURCE = "behavior-aware sampling (Pham et al., EMNLP 2025 Industry)"
N_HARM_CATEGORIES = 14


def refusal_rows(refusals) -> list[int]:
    from spard.eval.judges import RefusalJudge

    judge = RefusalJudge()
    return [i for i, r in enumerate(refusals) if judge.refuses(r)]


def quotas(sizes: list[int], k: int) -> list[int]:
    """k picks dealt one at a time over the strata, largest first (ties: first seen)."""
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    got = [0] * len(sizes)
    left = k
    while left:
        for i in order:
            if left and got[i] < sizes[i]:
                got[i] += 1
                left -= 1
    return got


def representatives(unit: torch.Tensor, m: int, seed: int) -> list[int]:
    """m rows of ``unit`` (local indices), one nearest each of m k-means centroids."""
    if m >= unit.shape[0]:
        return list(range(unit.shape[0]))
    assign = kmeans(unit, m, seed)
    out = []
    for j in range(m):
        members = torch.nonzero(assign == j).flatten()
        if members.numel():
            centroid = torch.nn.functional.normalize(unit[members].mean(dim=0), dim=0)
            out.append(int(members[torch.argmax(unit[members] @ centroid)]))
    # an empty cluster (rare: duplicate rows) leaves a gap: fill it with the rows farthest from
    # those picked, so the stratum still gives m distinct rows
    while len(out) < m:
        d = (unit @ unit[out].T).amax(dim=1)
        d[out] = float("inf")
        out.append(int(torch.argmin(d)))
    return out


def pick(c, k: int) -> list[int]:
    from spard.selection_quality import label_key

    rows = refusal_rows(c.refusals) if c.refusals is not None else list(range(c.n))
    if len(rows) < k:
        rows = list(range(c.n))
    unit = c.unit[torch.as_tensor(rows, device=c.unit.device)]
    if c.categories is not None:
        keys = [label_key(c.categories[i]) for i in rows]
        names = list(dict.fromkeys(keys))
        stratum = torch.as_tensor([names.index(key) for key in keys])
    else:
        names = list(range(min(k, N_HARM_CATEGORIES, len(rows))))
        stratum = kmeans(unit, len(names), c.seed).cpu()
    members = [torch.nonzero(stratum == s).flatten() for s in range(len(names))]
    picked = []
    for s, (idx, m) in enumerate(zip(members, quotas([len(i) for i in members], k))):
        if m:
            local = representatives(unit[idx.to(unit.device)], m, c.seed + s)
            picked += [rows[int(idx[j])] for j in local]
    return picked
