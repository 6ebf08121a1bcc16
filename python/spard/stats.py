"""Error bars and paired comparisons for the bench and the demo.

* ``mean_interval``: mean and a 95% Student-t interval over independent runs (seeds):
  ``mean ± t(0.975, n-1) * s / sqrt(n)``. With one run there is no interval (None).
* ``paired_bootstrap``: the mean difference ``a - b`` over matched cells (the same attack,
  harmful ratio and seed under two defenses) with a 95% percentile-bootstrap interval: the cells
  are resampled with replacement ``n_boot`` times (a fixed seed, so the summary is reproducible).
  A difference is flagged significant when its interval excludes 0; fewer than two cells give no
  interval and are never flagged.

Plain numpy; no scipy (the t quantiles below are the standard table).
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95

# Two-sided 95% Student-t critical values t(0.975, df) for df = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_critical(df: int) -> float:
    """t(0.975, df): the table up to 30, then the Cornish-Fisher expansion around z = 1.96
    (off by less than 1e-4 beyond 30)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df: expected an int >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def _finite(values) -> list[float]:
    return [float(v) for v in values
            if v is not None and not isinstance(v, bool) and math.isfinite(float(v))]


def mean_interval(values: Sequence) -> dict:
    """{"mean", "std", "n", "low", "high", "method"} over the finite values (None and NaN are
    left out); "low"/"high" are None with fewer than two values."""
    vals = _finite(values)
    if not vals:
        return {"mean": None, "std": None, "n": 0, "low": None, "high": None, "method": "t"}
    mean = statistics.fmean(vals)
    if len(vals) < 2:
        return {"mean": mean, "std": 0.0, "n": 1, "low": None, "high": None, "method": "t"}
    std = statistics.stdev(vals)
    half = t_critical(len(vals) - 1) * std / math.sqrt(len(vals))
    return {"mean": mean, "std": std, "n": len(vals), "low": mean - half, "high": mean + half, "method": "t"}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Mean of ``a[i] - b[i]`` with a 95% percentile-bootstrap interval over the pairs.

    Returns {"diff", "low", "high", "n", "significant"}; pairs with a missing (None/NaN) value on
    either side are left out first. ``significant`` is True only when there are at least two
    pairs and the interval excludes 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: a and b must pair up, got {len(a)} and {len(b)} values")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 100:
        raise ValueError(f"n_boot: expected an int >= 100, got {n_boot!r}")
    pairs = [(x, y) for x, y in zip(a, b) if _finite([x]) and _finite([y])]
    if not pairs:
        return {"diff": None, "low": None, "high": None, "n": 0, "significant": False}
    d = np.array([x - y for x, y in pairs], dtype=np.float64)
    diff = float(d.mean())
    if len(d) < 2:
        return {"diff": diff, "low": None, "high": None, "n": 1, "significant": False}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    alpha = (1 - LEVEL) / 2
    low, high = (float(q) for q in np.quantile(means, [alpha, 1 - alpha]))
    return {"diff": diff, "low": low, "high": high, "n": int(len(d)),
            "significant": bool(low > 0 or high < 0)}


def paired_cells(cells: Sequence[dict], defense: str, reference: str, metric: str) -> tuple[list, list, list]:
    """The (attack, ratio, seed) cells both defenses finished, with ``metric`` of each:
    (keys, values of ``defense``, values of ``reference``), in key order."""
    by: dict = {}
    for c in cells:
        k = c["cell"]
        by[(k["defense"], k["attack"], float(k["ratio"]), int(k["seed"]))] = c.get(metric)
    keys = sorted({key[1:] for key in by if key[0] == defense} & {key[1:] for key in by if key[0] == reference})
    return keys, [by[(defense, *k)] for k in keys], [by[(reference, *k)] for k in keys]


# The comparisons the bench summary makes: every defense against the undefended fine-tune, and
# SPARD against each of its ablations (every other selection method under the same SPAG included).
ABLATIONS = ("spard-official", "spard-random", "spard-relevance", "spard-dpp", "spard-k-center",
             "spard-behavior-aware", "spard-lr-cap")


def comparison_pairs(defenses: Sequence[str], reference: str = "sft", method: str = "spard") -> list[tuple[str, str]]:
    pairs = [(d, reference) for d in defenses if d != reference and reference in defenses]
    if method in defenses:
        pairs += [(method, a) for a in ABLATIONS if a in defenses and (method, a) not in pairs]
    # A composition (antibody+spard) against each of its members in the grid.
    pairs += [(d, m) for d in defenses if "+" in d for m in d.split("+") if m in defenses and (d, m) not in pairs]
    return pairs


def paired_comparisons(cells: Sequence[dict], defenses: Sequence[str], *, metrics=("asr", "accuracy"),
                       n_boot: int = 10_000, seed: int = 0) -> list[dict]:
    """One entry per (defense, reference) pair of ``comparison_pairs`` and metric: the paired
    bootstrap of defense minus reference over their shared (attack, ratio, seed) cells."""
    out = []
    for defense, reference in comparison_pairs(list(defenses)):
        for metric in metrics:
            _, a, b = paired_cells(cells, defense, reference, metric)
            out.append({"defense": defense, "reference": reference, "metric": metric,
                        **paired_bootstrap(a, b, n_boot=n_boot, seed=seed)})
    return out


def format_interval(s: dict, scale: float = 100.0, digits: int = 1, clip: Optional[tuple] = (0.0, 100.0)) -> str:
    """"mean [low, high]" (a 95% interval; just the mean with one run; "-" with none). Rates are
    clipped to 0..100 for display only."""
    if s.get("mean") is None:
        return "-"
    f = lambda v: f"{v:.{digits}f}"
    mean = scale * s["mean"]
    if s.get("low") is None:
        return f(mean)
    lo, hi = scale * s["low"], scale * s["high"]
    if clip is not None:
        lo, hi = max(clip[0], lo), min(clip[1], hi)
    return f"{f(mean)} [{f(lo)}, {f(hi)}]"
