"""A grid's cells ``(attack, ratio, seed, defense)``: their order, shards, paths and the
fingerprints that tell a finished cell made under other settings."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .settings import BenchSettings


CELL_VERSION = 2  # 2: empty or degenerate answers are left out of the ASR and counted


@dataclass(frozen=True)
class Cell:
    attack: str
    ratio: float
    seed: int
    defense: str

    @property
    def key(self) -> str:
        return f"{self.attack}/ph{self.ratio:g}/seed{self.seed}/{self.defense}"

    def path(self, out_dir) -> Path:
        return Path(out_dir) / "cells" / f"{self.key}.json"

    def error_path(self, out_dir) -> Path:
        return Path(out_dir) / "cells" / f"{self.key}.error.json"

    def run_dir(self, out_dir) -> Path:
        """The cell's training checkpoints while it runs (removed once its result is written)."""
        return Path(out_dir) / "runs" / self.key


def shard_of(cells: Sequence[Cell], shard: Optional[tuple[int, int]]) -> list[Cell]:
    """Shard K of N (1-based): every N-th cell from the K-th, a fixed share of the grid."""
    if shard is None:
        return list(cells)
    k, n = shard
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
        raise ValueError(f"shard: expected K/N with 1 <= K <= N, got {k}/{n}")
    return [c for i, c in enumerate(cells) if i % n == k - 1]


def grid(settings: BenchSettings, attacks: Sequence[str]) -> list[Cell]:
    """Seed-major order, so a grid cut short still covers every ratio and defense."""
    return [Cell(a, float(r), s, d) for s in settings.seeds for a in attacks for r in settings.ratios
            for d in settings.defenses]


def cell_fingerprint(cell: Cell, settings: BenchSettings, data_description: dict) -> str:
    """What a cell's result depends on besides its coordinates: training, evaluation and this
    defense's settings, and the data/model description. A finished cell made under another
    fingerprint is stale and runs again (adding seeds or defenses leaves the others valid)."""
    payload = {"optim": asdict(settings.optim), "lora": asdict(settings.lora), "max_length": settings.max_length,
               "max_new_tokens": settings.max_new_tokens, "task_max_new_tokens": settings.task_max_new_tokens,
               "judge": [settings.judge, settings.judge_model], "defense": settings.settings_of(cell.defense),
               "data": data_description, "version": CELL_VERSION}
    if settings.extra_judges:  # only when set, so grids without them keep their fingerprints
        payload["extra_judges"] = list(settings.extra_judges)
    if settings.prompt_layout != "chat":
        payload["prompt_layout"] = settings.prompt_layout
    if settings.on_overlap != "error":  # other attack rows than the default's (which refuses an overlap)
        payload["on_overlap"] = settings.on_overlap
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def answers_fingerprint(cell: Cell, settings: BenchSettings, data_description: dict) -> str:
    """The cell's fingerprint without its judges: what its answers depend on (`--rejudge` judges
    again only answers made under the current settings)."""
    bare = copy.copy(settings)
    bare.judge, bare.judge_model, bare.extra_judges = None, None, []
    return cell_fingerprint(cell, bare, data_description)


def cell_done(cell: Cell, out_dir, fingerprint: Optional[str] = None) -> bool:
    p = cell.path(out_dir)
    if not p.is_file():
        return False
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # a damaged result is recomputed
    return result.get("version") == CELL_VERSION and (fingerprint is None or result.get("fingerprint") == fingerprint)
