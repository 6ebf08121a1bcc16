"""Harmful fine-tuning attacks: mixing (prompt -> harmful answer) rows into a clean task set.

``build_attack`` adds ``floor(ratio * |clean|)`` harmful rows to the clean rows and shuffles the
result with the seed. The harmful rows are drawn from a corpus (rows with ``prompt`` and
``unsafe``) de-duplicated first, and must be disjoint from the evaluation items and from the
safety pool: a row overlaps when its prompt equals one of theirs, or its harmful answer equals
one of their harmful answers (a rephrased prompt with the evaluation item's own answer), both
compared after collapsing whitespace and case. Answers shorter than ``MIN_ANSWER_WORDS`` words
are not compared (stock phrases such as "Sorry, I can't help with that." recur in unrelated
rows). The manifest records which rows went in, from which source, in which order, so a run can
be reproduced and audited.
"""

from __future__ import annotations

import math
import os
import random
from fractions import Fraction
from pathlib import Path
from typing import Sequence

from spard.io import write_json_atomic, write_jsonl_atomic

MIN_ANSWER_WORDS = 16
ANSWER_FIELDS = ("unsafe", "response")  # the harmful answer of an evaluation item or pool row


def _source_name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "rows"


class _Reference:
    """Normalised prompts and answers of the evaluation items or the safety pool."""

    def __init__(self, source, what: str, name: str | None = None):
        from spard.data import load_records, normalise_text, prompt_text

        self.prompts: set[str] = set()
        self.answers: set[str] = set()
        self.name = name or _source_name(source)
        self.what = what
        if source is None:
            self.name = None
            return
        rows = load_records(source) if isinstance(source, (str, os.PathLike)) else source
        for i, item in enumerate(rows):
            if isinstance(item, str):
                self.prompts.add(normalise_text(item))
                continue
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f"{what} ({self.name}): item {i}: expected a string or a row with a string 'prompt'")
            self.prompts.add(normalise_text(prompt_text(item)))
            for field in ANSWER_FIELDS:
                answer = item.get(field)
                if isinstance(answer, str) and len(answer.split()) >= MIN_ANSWER_WORDS:
                    self.answers.add(normalise_text(answer))

    def __len__(self) -> int:
        return len(self.prompts)

    def overlaps(self, prompt_key: str, answer_key: str) -> bool:
        return prompt_key in self.prompts or answer_key in self.answers


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
    safety_pool=None,
    on_overlap: str = "error",
    source_names: dict | None = None,
) -> tuple[list[dict], dict]:
    """Clean rows plus ``floor(ratio * |clean|)`` rows ``{prompt, response: unsafe, source:
    "harmful"}``, shuffled with ``seed``.

    ``clean``: task rows or a path for `load_task`; ``harmful``: rows with ``prompt`` and
    ``unsafe`` or a path; ``eval_prompts``: the evaluation items (strings, rows with ``prompt``
    and optionally ``unsafe``, or a path); ``safety_pool``: the pool rows or a path. Harmful rows
    that overlap the evaluation items or the pool (see the module docstring) raise an error
    (``on_overlap="error"``) or are left out of the candidates (``on_overlap="drop"``).
    ``source_names`` names sources given as rows in messages and the manifest (keys ``clean``,
    ``harmful``, ``eval``, ``pool``). Returns ``(rows, manifest)``.
    """
    from spard.data import ATTACK_FIELDS, load_task, normalise_text, safety_records

    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"ratio: expected a finite number >= 0 (0 = benign, 1 = as many harmful as clean rows), got {ratio!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if on_overlap not in ("error", "drop"):
        raise ValueError(f"on_overlap: expected 'error' or 'drop', got {on_overlap!r}")

    for arg, value in (("clean", clean), ("harmful", harmful)):
        if not isinstance(value, (str, os.PathLike)) and len(value) == 0:
            raise ValueError(f"{arg}: empty set of rows")
    names = dict(source_names or {})
    clean_name = names.get("clean") or _source_name(clean)
    harmful_name = names.get("harmful") or _source_name(harmful)
    clean_rows = load_task(clean)
    harmful_rec = safety_records(harmful, fields=ATTACK_FIELDS)
    harmful_rows = harmful_rec.rows
    evaluation = _Reference(eval_prompts, "eval_prompts", names.get("eval"))
    pool = _Reference(safety_pool, "safety_pool", names.get("pool"))

    # Candidates: first occurrence of each harmful prompt, minus those overlapping evaluation / pool.
    seen: set[str] = set()
    candidates: list[int] = []
    duplicates, eval_overlap, pool_overlap = 0, [], []
    for j, row in enumerate(harmful_rows):
        key = normalise_text(row["prompt"])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        answer = normalise_text(row["unsafe"])
        if evaluation.overlaps(key, answer):
            eval_overlap.append(j)
        elif pool.overlaps(key, answer):
            pool_overlap.append(j)
        else:
            candidates.append(j)
    if (eval_overlap or pool_overlap) and on_overlap == "error":
        parts = []
        if eval_overlap:
            parts.append(f"{len(eval_overlap)} row(s) overlap the evaluation items ({evaluation.name}), e.g. "
                         f"{_where(harmful_rec, harmful_name, eval_overlap[0])}")
        if pool_overlap:
            parts.append(f"{len(pool_overlap)} row(s) overlap the safety pool ({pool.name}), e.g. "
                         f"{_where(harmful_rec, harmful_name, pool_overlap[0])}")
        raise ValueError(
            f"attack corpus ({harmful_name}): {' and '.join(parts)} (same prompt, or same harmful answer) of "
            "the corpus; attack rows must come from data disjoint from both. Use disjoint files, or leave "
            "the overlapping rows out with on_overlap='drop' (spard train: --set attack.on_overlap=drop)."
        )

    n_harmful = harmful_count(ratio, len(clean_rows))
    if n_harmful > len(candidates):
        raise ValueError(
            f"ratio: {ratio} of {len(clean_rows)} clean rows needs {n_harmful} harmful rows, but "
            f"{harmful_name} has only {len(candidates)} usable (unique, not in evaluation or pool) prompts"
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
        "eval_source": evaluation.name,
        "n_eval_prompts": len(evaluation),
        "pool_source": pool.name,
        "harmful_rows_available": len(harmful_rows),
        "harmful_duplicates_dropped": duplicates,
        "harmful_eval_overlap_dropped": len(eval_overlap),
        "harmful_pool_overlap_dropped": len(pool_overlap),
        # Row indices into the clean / harmful sources, in the order of the output rows.
        "order": [[kind, i] for kind, i in order],
    }
    return rows, manifest


def _where(rec, name: str, index: int) -> str:
    """file:line of a harmful row; for rows given in memory, the name they were given."""
    return rec.where(index) if rec.name != "rows" or name == "rows" else f"{name}: row {index}"


def write_attack(out_dir: str | os.PathLike, rows: Sequence[dict], manifest: dict) -> dict[str, Path]:
    """Writes ``train.jsonl`` and ``attack_manifest.json`` (atomically) under ``out_dir``."""
    out = Path(out_dir)
    paths = {"rows": out / "train.jsonl", "manifest": out / "attack_manifest.json"}
    write_jsonl_atomic(paths["rows"], rows)
    write_json_atomic(paths["manifest"], manifest)
    return paths
