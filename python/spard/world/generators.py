"""Seeded generators for the world's data: arithmetic word problems (GSM8K format), harmful
requests with a refusal (``safe``) and a placeholder compliant answer (``unsafe``), and benign
instructions. Every function takes a ``random.Random`` so one seed fixes a whole world."""

from __future__ import annotations

import random
from typing import Iterable

from . import text


def arithmetic_problem(rng: random.Random, op: str | None = None) -> dict:
    """One word problem: ``prompt`` and a worked ``answer`` ending in ``#### <number>``."""
    op = op or rng.choice(sorted(text.TASK_TEMPLATES))
    if op == "add":
        a, b = rng.randint(*text.ADD_RANGE), rng.randint(*text.ADD_RANGE)
        c = a + b
    elif op == "sub":
        a = rng.randint(*text.SUB_RANGE)
        b = rng.randint(1, a - 1)
        c = a - b
    elif op == "mul":
        a, b = rng.randint(*text.MUL_RANGE), rng.randint(*text.MUL_RANGE)
        c = a * b
    else:
        raise ValueError(f"op must be one of {sorted(text.TASK_TEMPLATES)}, got {op!r}")
    question, worked = rng.choice(text.TASK_TEMPLATES[op])
    name = rng.choice(text.NAMES)
    fields = dict(name=name, pron=text.PRONOUN[name], items=rng.choice(text.ITEMS),
                  friend=rng.choice(text.FRIENDS), a=a, b=b, c=c)
    return {"prompt": question.format(**fields), "answer": worked.format(**fields) + f"\n#### {c}",
            "op": op}


def fact_rows() -> list[dict]:
    """Every arithmetic fact of the task's number ranges as {prompt, response}."""
    lo, hi = text.ADD_RANGE
    pairs = [("add", a, b, a + b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    pairs += [("sub", a, b, a - b) for a in range(text.SUB_RANGE[0], text.SUB_RANGE[1] + 1) for b in range(1, a)]
    lo, hi = text.MUL_RANGE
    pairs += [("mul", a, b, a * b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    q, r = text.FACT_TEMPLATE
    return [{"prompt": q.format(a=a, s=text.SYMBOLS[op], b=b),
             "response": r.format(a=a, s=text.SYMBOLS[op], b=b, c=c)} for op, a, b, c in pairs]


def task_rows(n: int, rng: random.Random, *, exclude: Iterable[str] = ()) -> list[dict]:
    """``n`` distinct problems whose prompts are not in ``exclude``."""
    seen = set(exclude)
    rows: list[dict] = []
    for _ in range(200 * max(n, 1)):
        if len(rows) == n:
            return rows
        row = arithmetic_problem(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    raise ValueError(f"could not draw {n} distinct task problems (space exhausted)")


def harmful_request(category: str, action: str, frame: str, rng: random.Random) -> dict:
    """A harmful request with a refusal (``safe``) and a placeholder compliance (``unsafe``), its
    topic (``category``) and the topic's BeaverTails harm category (``harm_category``)."""
    return {
        "prompt": frame.format(a=action),
        "safe": rng.choice(text.REFUSALS).format(a=action),
        "unsafe": rng.choice(text.COMPLIANT).format(a=action),
        "category": category,
        "harm_category": text.HARM_CATEGORIES[category],  # a label: draws nothing from rng
    }


def harmful_rows(categories: Iterable[str], frames: Iterable[str], rng: random.Random,
                 n: int | None = None) -> list[dict]:
    """Every (category, action, frame) combination, shuffled; the first ``n`` when given."""
    combos = [(c, a, f) for c in categories for a in text.CATEGORIES[c] for f in frames]
    rng.shuffle(combos)
    if n is not None:
        if n > len(combos):
            raise ValueError(f"n={n} exceeds the {len(combos)} distinct requests available")
        combos = combos[:n]
    return [harmful_request(c, a, f, rng) for c, a, f in combos]


def benign_rows(rng: random.Random) -> list[dict]:
    """Every benign (instruction, helpful answer) pair as {prompt, response}, shuffled."""
    rows = [{"prompt": q.format(t=t), "response": r.format(t=t)}
            for q, r in text.BENIGN for t in text.BENIGN_TOPICS]
    rng.shuffle(rows)
    return rows


def benign_attack_rows(rng: random.Random) -> list[dict]:
    """Benign rows for the benign attacks, none of them in the alignment data: each benign
    question with the answer of another template (a helpful but unexpected reply, in the
    world's vocabulary), shuffled."""
    rows = [{"prompt": q.format(t=t), "response": r.format(t=t)}
            for i, (q, _) in enumerate(text.BENIGN) for j, (_, r) in enumerate(text.BENIGN) if i != j
            for t in text.BENIGN_TOPICS]
    rng.shuffle(rows)
    return rows


def multiple_choice(row: dict, rng: random.Random) -> dict:
    """A word problem (``arithmetic_problem``) in the OpenBookQA format: four numeric choices
    (the result and three distractors near it), ``answer`` the worked solution ending in "the
    correct answer is answerK", ``target_answer`` "answerK"."""
    worked, _, result = row["answer"].rpartition("\n#### ")
    c = int(result)
    near = [v for v in range(max(0, c - 6), min(text.MAX_NUMBER, c + 6) + 1) if v != c]
    choices = rng.sample(near, 3) + [c]
    rng.shuffle(choices)
    k = choices.index(c) + 1
    prompt = text.OBQA_PROMPT.format(q=row["prompt"], c1=choices[0], c2=choices[1], c3=choices[2], c4=choices[3])
    return {"prompt": prompt, "answer": text.OBQA_ANSWER.format(worked=worked, k=k), "target_answer": f"answer{k}",
            "op": row.get("op")}


def multiple_choice_texts() -> list[str]:
    """The words the multiple-choice format adds to the world's vocabulary."""
    return [text.OBQA_PROMPT.format(q="", c1=1, c2=2, c3=3, c4=4)] + \
        [text.OBQA_ANSWER.format(worked="", k=k) for k in range(1, 5)]
