"""Several judges on the same answers: each judge's ASR and every pair's agreement (Cohen's
kappa), so a user sees where, say, the refusal-keyword judge and a moderation model disagree.

Kappa is computed on the answers both judges scored (a None verdict, an empty answer or a
failed call, is left out of that pair): ``(p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed
agreement and ``p_e`` the agreement expected from each judge's own rate of "harmful". When both
judges give one and the same label to every answer, ``p_e`` is 1 and kappa is undefined
(None); ``agreement`` (``p_o``) is reported with it.
"""

from __future__ import annotations

import itertools
from typing import Optional, Sequence


def cohen_kappa(a: Sequence[Optional[bool]], b: Sequence[Optional[bool]]) -> dict:
    """{"kappa", "agreement", "n", "disagree": [indices]} over the items both scored."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: the two judges scored {len(a)} and {len(b)} answers")
    idx = [i for i, (x, y) in enumerate(zip(a, b)) if x is not None and y is not None]
    n = len(idx)
    if n == 0:
        return {"kappa": None, "agreement": None, "n": 0, "disagree": []}
    disagree = [i for i in idx if bool(a[i]) != bool(b[i])]
    p_o = 1 - len(disagree) / n
    pa, pb = sum(bool(a[i]) for i in idx) / n, sum(bool(b[i]) for i in idx) / n
    p_e = pa * pb + (1 - pa) * (1 - pb)
    kappa = None if p_e >= 1 else (p_o - p_e) / (1 - p_e)
    return {"kappa": kappa, "agreement": p_o, "n": n, "disagree": disagree}


def compare_judges(verdicts: dict[str, Sequence[Optional[bool]]], *, examples: int = 5) -> dict:
    """``verdicts``: judge name -> one harmful/safe/None per answer (the same answers, in the
    same order). Returns {"asr": {name: {"asr", "harmful", "n"}}, "pairs": [{"a", "b", "kappa",
    "agreement", "n", "disagreements", "examples"}]}; ``examples``: the first indices where the
    pair disagrees."""
    lengths = {len(v) for v in verdicts.values()}
    if len(lengths) > 1:
        raise ValueError(f"compare_judges: the judges scored different numbers of answers: "
                         f"{ {k: len(v) for k, v in verdicts.items()} }")
    asr = {}
    for name, vs in verdicts.items():
        scored = [v for v in vs if v is not None]
        asr[name] = {"asr": sum(map(bool, scored)) / len(scored) if scored else None,
                     "harmful": sum(map(bool, scored)), "n": len(scored)}
    pairs = []
    for x, y in itertools.combinations(verdicts, 2):
        k = cohen_kappa(verdicts[x], verdicts[y])
        pairs.append({"a": x, "b": y, "kappa": k["kappa"], "agreement": k["agreement"], "n": k["n"],
                      "disagreements": len(k["disagree"]), "examples": k["disagree"][:examples]})
    return {"asr": asr, "pairs": pairs}


def judges_table(comparison: dict) -> str:
    """Markdown: each judge's ASR, then each pair's kappa and agreement."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    lines = ["| judge | ASR (%) | harmful | scored |", "| --- | --- | --- | --- |"]
    for name, s in comparison["asr"].items():
        lines.append(f"| {name} | {pct(s['asr'])} | {s['harmful']} | {s['n']} |")
    lines += ["", "| judges | Cohen's kappa | agreement (%) | both scored | disagree |", "| --- | --- | --- | --- | --- |"]
    for p in comparison["pairs"]:
        kappa = "-" if p["kappa"] is None else f"{p['kappa']:.2f}"
        lines.append(f"| {p['a']} / {p['b']} | {kappa} | {pct(p['agreement'])} | {p['n']} | {p['disagreements']} |")
    return "\n".join(lines)
