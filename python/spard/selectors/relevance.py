"""relevance: the k pool rows most similar to the task (RD-DPP without its diversity term).

    q_i = max_z cos(ê_i, ê_z) over the task rows z;  pick the top k by q.
"""

from __future__ import annotations

import torch

NAME = "relevance"
NEEDS = ("embeddings", "reference")
SOURCE = "top-k by relevance q (the relevance-only ablation of RD-DPP)"


def pick(c, k: int) -> list[int]:
    # Stable sort: equal relevance goes to the smaller index.
    return torch.sort(c.q.cpu(), descending=True, stable=True).indices[:k].tolist()
