"""How the attacker's trials become a verdict, as the field reports it: the worst case, the
worst case bounded by utility, the mean of the top n, and a capability guard that marks a
defense whose own accuracy is already too low to be worth attacking.

Trials are dicts with ``asr`` and ``accuracy`` (shares in [0, 1], None when missing). Pure
functions: the tests feed them hand-made trial lists.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence


def _ok(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def feasible(trials: Sequence[dict], accuracy_limit: float) -> list[dict]:
    """Trials with a score and an accuracy of at least ``accuracy_limit`` (the attacker's
    utility constraint: a model that no longer does the task is no attack)."""
    return [t for t in trials if _ok(t.get("asr")) and _ok(t.get("accuracy")) and t["accuracy"] >= accuracy_limit]


def worst_case(trials: Sequence[dict]) -> Optional[dict]:
    """The trial with the highest ASR (ties: the higher accuracy, then the earlier trial)."""
    scored = [t for t in trials if _ok(t.get("asr"))]
    if not scored:
        return None
    return max(scored, key=lambda t: (t["asr"], t.get("accuracy") or 0.0, -t.get("number", 0)))


def bounded_worst_case(trials: Sequence[dict], defended_accuracy: Optional[float], keep_pct: float) -> Optional[dict]:
    """The worst case among trials that keep at least ``keep_pct`` % of the defended model's
    own accuracy (its accuracy under the grid's fixed attack)."""
    check_keep_pct(keep_pct)
    if not _ok(defended_accuracy):
        return None
    bar = defended_accuracy * keep_pct / 100.0
    return worst_case([t for t in trials if _ok(t.get("accuracy")) and t["accuracy"] >= bar - 1e-12])


def top_n_mean(trials: Sequence[dict], n: int) -> Optional[float]:
    """The mean ASR of the ``n`` highest-ASR trials (fewer when fewer exist): less biased
    upward by one lucky trial than the maximum."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--top-n: expected an int >= 1, got {n!r}")
    asrs = sorted((t["asr"] for t in trials if _ok(t.get("asr"))), reverse=True)[:n]
    return statistics.fmean(asrs) if asrs else None


def check_keep_pct(keep_pct) -> None:
    if not _ok(keep_pct) or not 0 < keep_pct <= 100:
        raise ValueError(f"--bounded-keep: expected a percentage x in (0, 100], got {keep_pct!r}")


def capability(defense_accuracy: Optional[float], sft_accuracy: Optional[float], share: float) -> dict:
    """The capability guard: a defense whose accuracy is below ``share`` of SFT's has destroyed
    utility by itself; its attack is skipped and the row says why (reported, never hidden)."""
    if not _ok(share) or not 0 < share <= 1:
        raise ValueError(f"--capability-share: expected a share in (0, 1], got {share!r}")
    if not (_ok(defense_accuracy) and _ok(sft_accuracy)):
        return {"capable": True, "ratio": None, "share": share, "note": "accuracy unknown: not guarded"}
    ratio = defense_accuracy / sft_accuracy if sft_accuracy > 0 else math.inf
    capable = ratio >= share
    note = None if capable else (f"accuracy {100 * defense_accuracy:.1f}% is {100 * ratio:.0f}% of SFT's "
                                 f"{100 * sft_accuracy:.1f}% (< {100 * share:.0f}%): attack skipped")
    return {"capable": capable, "ratio": ratio, "share": share, "note": note}


def aggregate(trials: Sequence[dict], *, accuracy_limit: float, defended_accuracy: Optional[float],
              keep_pct: float = 90.0, top_n: int = 3) -> dict:
    """Every aggregate of one defense's trials: over the feasible ones (accuracy >= the
    attacker's limit) the worst case and the top-n mean, and the bounded worst case."""
    ok = feasible(trials, accuracy_limit)
    return {"feasible": len(ok), "completed": len(trials), "worst_case": worst_case(ok),
            "bounded_worst_case": bounded_worst_case(ok, defended_accuracy, keep_pct),
            "top_n_mean": top_n_mean(ok, top_n), "top_n": top_n, "keep_pct": keep_pct,
            "accuracy_limit": accuracy_limit, "defended_accuracy": defended_accuracy}


__all__ = ["aggregate", "bounded_worst_case", "capability", "check_keep_pct", "feasible", "top_n_mean",
           "worst_case"]
