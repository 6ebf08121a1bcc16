"""Harmful fine-tuning attacks: mixing (prompt -> harmful answer) rows into a clean task set.

``build_attack`` adds ``floor(ratio * |clean|)`` harmful rows to the clean rows and shuffles the
result with the seed. The harmful rows are drawn from a corpus that must be disjoint from the
evaluation prompts (compared after collapsing whitespace and case), de-duplicated first. The
manifest records which rows went in, from which source, in which order, so a run can be
reproduced and audited.
"""

from __future__ import annotations

import math
import os
import random
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from spard.io import write_json_atomic, write_jsonl_atomic


def _source_name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "rows"


def _eval_keys(eval_prompts) -> tuple[set[str], str | None]:
    from spard.data import load_records, normalise_prompt

    if eval_prompts is None:
        return set(), None
    name = None
    if isinstance(eval_prompts, (str, os.PathLike)):
        name = str(eval_prompts)
        eval_prompts = load_records(eval_prompts)
    keys = set()
    for i, item in enumerate(eval_prompts):
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ValueError(f"eval_prompts: item {i}: expected a string or a row with a string 'prompt'")
        keys.add(normalise_prompt(text))
    return keys, name or "rows"


def harmful_count(ratio: float, n_clean: int) -> int:
    """floor(ratio * n_clean), exact for decimal ratios (0.29 * 100 is 29, not 28)."""
    return math.floor(Fraction(repr(float(ratio))) * n_clean)


def build_attack(
    clean,
    harmful,
    *,
    ratio: float,
    seed: int,
    eval_prompts=None,
    on_overlap: str = "error",
) -> tuple[list[dict], dict]:
    """Clean rows plus ``floor(ratio * |clean|)`` rows ``{prompt, response: unsafe, source:
    "harmful"}``, shuffled with ``seed``.

    ``clean``: task rows or a path for `load_task`; ``harmful``: safety rows (prompt, safe,
    unsafe) or a path for `load_safety`; ``eval_prompts``: strings, rows with ``prompt`` or a
    path. Harmful prompts that occur among the evaluation prompts raise an error
    (``on_overlap="error"``) or are left out of the candidates (``on_overlap="drop"``).
    Returns ``(rows, manifest)``.
    """
    from spard.data import load_safety, load_task, normalise_prompt

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"ratio: expected a finite number >= 0 (0 = benign, 1 = as many harmful as clean rows), got {ratio!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if on_overlap not in ("error", "drop"):
        raise ValueError(f"on_overlap: expected 'error' or 'drop', got {on_overlap!r}")

    for arg, value in (("clean", clean), ("harmful", harmful)):
        if not isinstance(value, (str, os.PathLike)) and len(value) == 0:
            raise ValueError(f"{arg}: empty set of rows")
    clean_name, harmful_name = _source_name(clean), _source_name(harmful)
    clean_rows = load_task(clean)
    harmful_rows = load_safety(harmful)
    eval_keys, eval_name = _eval_keys(eval_prompts)

    # Candidates: first occurrence of each harmful prompt, minus the evaluation prompts.
    seen: set[str] = set()
    candidates: list[int] = []
    duplicates, overlapping = 0, []
    for j, row in enumerate(harmful_rows):
        key = normalise_prompt(row["prompt"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if key in eval_keys:
            overlapping.append(j)
            continue
        candidates.append(j)
    if overlapping and on_overlap == "error":
        raise ValueError(
            f"harmful ({harmful_name}): {len(overlapping)} prompt(s) also occur among the evaluation "
            f"prompts ({eval_name}), e.g. row {overlapping[0]}; attack samples must come from a split "
            "disjoint from evaluation. Use a disjoint split or on_overlap='drop'."
        )

    n_harmful = harmful_count(ratio, len(clean_rows))
    if n_harmful > len(candidates):
        raise ValueError(
            f"ratio: {ratio} of {len(clean_rows)} clean rows needs {n_harmful} harmful rows, but "
            f"{harmful_name} has only {len(candidates)} usable (unique, not in evaluation) prompts"
        )

    rng = random.Random(seed)
    picked = rng.sample(candidates, n_harmful)
    order = [("clean", i) for i in range(len(clean_rows))] + [("harmful", j) for j in picked]
    rng.shuffle(order)

    rows = []
    for kind, i in order:
        if kind == "clean":
            row = dict(clean_rows[i])
            row.setdefault("source", "clean")
        else:
            h = harmful_rows[i]
            row = {"prompt": h["prompt"], "response": h["unsafe"], "source": "harmful"}
        rows.append(row)

    manifest = {
        "ratio": ratio,
        "seed": seed,
        "n_clean": len(clean_rows),
        "n_harmful": n_harmful,
        "n_total": len(rows),
        "clean_source": clean_name,
        "harmful_source": harmful_name,
        "eval_source": eval_name,
        "n_eval_prompts": len(eval_keys),
        "harmful_rows_available": len(harmful_rows),
        "harmful_duplicates_dropped": duplicates,
        "harmful_eval_overlap_dropped": len(overlapping),
        # Row indices into the clean / harmful sources, in the order of the output rows.
        "order": [[kind, i] for kind, i in order],
    }
    return rows, manifest


def write_attack(out_dir: str | os.PathLike, rows: Sequence[dict], manifest: dict) -> dict[str, Path]:
    """Writes ``train.jsonl`` and ``attack_manifest.json`` (atomically) under ``out_dir``."""
    out = Path(out_dir)
    paths = {"rows": out / "train.jsonl", "manifest": out / "attack_manifest.json"}
    write_jsonl_atomic(paths["rows"], rows)
    write_json_atomic(paths["manifest"], manifest)
    return paths
