"""SafeInstr (Bianchi et al., 2024): mix a few safety samples (prompt -> refusal) into the
user's data, about 3% of it."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from spard.space import Float

from .base import Defense, DefenseData


class SafeInstr(Defense):
    NAME = "safeinstr"
    STAGE = "fine-tuning"
    NEEDS = ("user", "alignment")
    # Tuning space: 1% to 10% safety rows (the paper adds 100 to 2,000 to its 20k rows).
    SEARCH_SPACE = {"share": Float(0.01, 0.10)}

    @dataclass
    class Settings:
        share: float = 0.03
        """Safety samples added, as a share of the user's data: floor(share · |D_ft|) (>= 1)."""

    def validate(self) -> None:
        if not 0 < self.settings.share <= 1:
            raise ValueError(f"safeinstr share must be in (0, 1], got {self.settings.share!r}")

    def training_rows(self, data: DefenseData) -> list[dict]:
        self.check_data(data)
        k = min(max(1, math.floor(self.settings.share * len(data.user))), len(data.alignment))
        rng = random.Random(data.seed)
        picked = rng.sample(range(len(data.alignment)), k)
        rows = list(data.user) + [dict(data.alignment[i], source="safety") for i in picked]
        rng.shuffle(rows)
        self.added = k
        return rows

    def summary(self) -> dict:
        return {"safety_rows_added": getattr(self, "added", 0)}
