"""spard.stats: t-intervals over seeds and the paired bootstrap over cells."""

import math

import pytest

from spard import stats


def test_t_interval_matches_the_textbook():
    # mean 0.7, s = 0.1414, n = 2: half width 12.706 * 0.1414 / sqrt(2) = 1.2706
    s = stats.mean_interval([0.8, 0.6])
    assert s["mean"] == pytest.approx(0.7) and s["n"] == 2
    assert s["high"] - s["mean"] == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    s = stats.mean_interval([1, 2, 3, 4, 5])  # s = 1.5811, t(4) = 2.7764
    assert (s["low"], s["high"]) == pytest.approx((3 - 2.7764 * 1.5811 / math.sqrt(5),
                                                   3 + 2.7764 * 1.5811 / math.sqrt(5)), rel=1e-4)
    assert stats.mean_interval([0.3, None, float("nan")])["low"] is None  # one value: no interval
    assert stats.mean_interval([None])["mean"] is None
    # beyond the table the expansion continues it smoothly
    assert stats.t_critical(30) > stats.t_critical(31) > stats.t_critical(1000) > 1.96
    assert stats.t_critical(31) == pytest.approx(2.0395, abs=2e-4)
    assert stats.t_critical(60) == pytest.approx(2.0003, abs=2e-4)
    with pytest.raises(ValueError, match="df"):
        stats.t_critical(0)


def test_paired_bootstrap_flags_only_intervals_that_exclude_zero():
    # a consistent gain on every cell: significant, interval inside the range of the differences
    a, b = [0.1, 0.2, 0.15, 0.05], [0.5, 0.6, 0.45, 0.4]
    r = stats.paired_bootstrap(a, b)
    assert r["diff"] == pytest.approx(-0.3625) and r["n"] == 4 and r["significant"]
    assert -0.4 <= r["low"] <= r["diff"] <= r["high"] <= -0.3
    assert stats.paired_bootstrap(a, b) == r  # a fixed seed: reproducible
    # two means that differ, but the per-cell differences change sign: not significant
    r = stats.paired_bootstrap([0.007, 0.053, 0.073], [0.027, 0.087, 0.053])
    assert r["diff"] < 0 and r["low"] < 0 < r["high"] and not r["significant"]
    # the pairing matters: the same values unpaired-shuffled would not be tested
    assert stats.paired_bootstrap([0.5, None], [0.1, 0.2])["n"] == 1
    assert not stats.paired_bootstrap([0.5], [0.1])["significant"]
    with pytest.raises(ValueError, match="pair up"):
        stats.paired_bootstrap([1, 2], [1])
    with pytest.raises(ValueError, match="n_boot"):
        stats.paired_bootstrap([1, 2], [1, 2], n_boot=5)


def test_comparisons_pair_cells_by_attack_ratio_and_seed():
    def cell(d, a, seed, asr):
        return {"cell": {"defense": d, "attack": a, "ratio": 0.1, "seed": seed}, "asr": asr, "accuracy": 0.3}
    cells = [cell("sft", "x", 0, 0.9), cell("sft", "x", 1, 0.8), cell("sft", "y", 0, 0.7),
             cell("spard", "x", 0, 0.1), cell("spard", "x", 1, 0.2),  # no (y, seed 0) cell for spard
             cell("spard-random", "x", 0, 0.3), cell("spard-random", "x", 1, 0.2)]
    keys, a, b = stats.paired_cells(cells, "spard", "sft", "asr")
    assert keys == [("x", 0.1, 0), ("x", 0.1, 1)] and a == [0.1, 0.2] and b == [0.9, 0.8]
    assert stats.comparison_pairs(["sft", "spard", "lisa", "spard-random"]) == [
        ("spard", "sft"), ("lisa", "sft"), ("spard-random", "sft"), ("spard", "spard-random")]
    comps = stats.paired_comparisons(cells, ["sft", "spard", "spard-random"], n_boot=1000)
    c = next(c for c in comps if (c["defense"], c["reference"], c["metric"]) == ("spard", "sft", "asr"))
    assert c["diff"] == pytest.approx(-0.7) and c["n"] == 2 and c["significant"]
    acc = next(c for c in comps if (c["defense"], c["metric"]) == ("spard", "accuracy"))
    assert acc["diff"] == 0 and not acc["significant"]


def test_format_interval():
    assert stats.format_interval(stats.mean_interval([0.8, 0.6])) == "70.0 [0.0, 100.0]"  # clipped
    assert stats.format_interval(stats.mean_interval([0.31, 0.33, 0.32])) == "32.0 [29.5, 34.5]"
    assert stats.format_interval(stats.mean_interval([0.3])) == "30.0"
    assert stats.format_interval(stats.mean_interval([])) == "-"
