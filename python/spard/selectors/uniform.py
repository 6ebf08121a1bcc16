"""random: a seeded uniform sample of k pool rows (SafeInstr's choice; the usual ablation)."""

from __future__ import annotations

import torch

NAME = "random"
NEEDS = ()
SOURCE = "uniform sampling without replacement"


def pick(c, k: int) -> list[int]:
    gen = torch.Generator().manual_seed(c.seed)
    return torch.randperm(c.n, generator=gen)[:k].tolist()
