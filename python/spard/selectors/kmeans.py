"""Spherical k-means on unit rows (k-means++ start, Lloyd steps), seeded and deterministic.

Small and in torch so it runs where the embeddings are (GPU included) without a new dependency."""

from __future__ import annotations

import torch


def kmeans(unit: torch.Tensor, m: int, seed: int, iters: int = 50) -> torch.Tensor:
    """Cluster index in [0, m) of each of the n unit rows (m <= n)."""
    n = unit.shape[0]
    gen = torch.Generator().manual_seed(seed)
    # k-means++: each next center drawn with probability proportional to its squared distance.
    centers = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (2.0 - 2.0 * unit @ unit[centers[0]]).clamp_min(0).cpu().double()
    for _ in range(m - 1):
        if float(d2.sum()) <= 0:  # fewer distinct rows than clusters: take unused rows in order
            unused = [i for i in range(n) if i not in set(centers)]
            centers.append(unused[0])
        else:
            centers.append(int(torch.multinomial(d2, 1, generator=gen)))
        d2 = torch.minimum(d2, (2.0 - 2.0 * unit @ unit[centers[-1]]).clamp_min(0).cpu().double())
    c = unit[centers].clone()
    assign = None
    for _ in range(iters):
        new = torch.argmax(unit @ c.T, dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(m):
            members = unit[assign == j]
            if members.shape[0]:
                c[j] = torch.nn.functional.normalize(members.mean(dim=0), dim=0)
    return assign
