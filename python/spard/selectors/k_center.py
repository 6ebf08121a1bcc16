"""k-center: farthest-first traversal, the k-center greedy of core-set selection (Gonzalez 1985;
Sener & Savarese, ICLR 2018), in cosine distance on the prompts' unit embeddings.

    s_1 = the row nearest the pool's mean embedding
    repeat k-1 times:  s = argmax_i min_{j picked} (1 - cos(ê_i, ê_j))

Our reading where the papers leave a gap: Sener & Savarese start from the labelled set, which a
safety selection does not have, so the first center is the most central row (deterministic).
Ties go to the smaller index. O(n·d) per pick, O(n) memory.
"""

from __future__ import annotations

import torch

NAME = "k-center"
NEEDS = ("embeddings",)
SOURCE = "k-center greedy / farthest-first traversal (Sener & Savarese 2018)"


def pick(c, k: int) -> list[int]:
    unit = c.unit
    first = int(torch.argmax(unit @ unit.mean(dim=0)))
    picked = [first]
    dist = 1.0 - unit @ unit[first]  # distance of every row to its nearest center
    dist[first] = -1.0  # a picked row is never picked again
    for _ in range(k - 1):
        s = int(torch.argmax(dist))  # the first maximum: ties to the smaller index
        picked.append(s)
        torch.minimum(dist, 1.0 - unit @ unit[s], out=dist)
        dist[picked] = -1.0
    return picked
