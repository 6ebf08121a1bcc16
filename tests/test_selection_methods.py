"""The selection baselines (spard.selectors) and the selection-quality measures
(spard.selection_quality) on hand-built embeddings whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from spard.select import select_safe_data, unit_rows
from spard.selection_quality import category_coverage, coverage, label_set, redundancy, selection_quality, task_relevance
from spard.selectors import METHODS, Candidates
from spard.selectors.behavior_aware import quotas


def e(*v):
    return torch.tensor([float(x) for x in v])


class Fixed:
    """Embeds each text by a table lookup (texts not in the table are an error)."""

    cache_id = None

    def __init__(self, table):
        self.table, self.calls = table, 0

    def embed(self, texts):
        self.calls += 1
        return torch.stack([self.table[t] for t in texts])


def clusters(n_per=4, spread=0.05, dims=3):
    """n_per rows near each axis of R^dims: 3 tight, mutually orthogonal clusters."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.eye(dims)[a] + spread * torch.randn(dims, generator=g) for a in range(dims) for _ in range(n_per)]
    return unit_rows(torch.stack(rows))


# ----------------------------------------------------------------------------------------------
# Quality measures
# ----------------------------------------------------------------------------------------------
def test_coverage_redundancy_relevance_on_orthonormal_rows():
    pool = torch.stack([e(1, 0, 0), e(0, 1, 0), e(0, 0, 1), e(1, 0, 0)])
    # one pick on the first axis: distances 0, 1, 1, 0
    assert coverage(pool, [0]) == {"mean": pytest.approx(0.5), "max": pytest.approx(1.0)}
    assert coverage(pool, [0, 1, 2]) == {"mean": pytest.approx(0.0), "max": pytest.approx(0.0)}
    assert coverage(pool, [1], block=1)["mean"] == pytest.approx(0.75)  # blocks change nothing
    assert redundancy(pool[[0, 1, 2]]) == {"mean": pytest.approx(0.0), "max": pytest.approx(0.0)}
    # rows 0 and 3 are the same: the pairs (0,3), (3,0) have cosine 1, the 4 others 0
    assert redundancy(pool[[0, 1, 3]]) == {"mean": pytest.approx(2 / 6), "max": pytest.approx(1.0)}
    assert redundancy(pool[[0]]) == {"mean": None, "max": None}
    ref = torch.stack([e(1, 0, 0), e(0, 1, 0)])
    rel = task_relevance(pool[[0, 2]], ref, block=1)
    assert rel["nearest"] == pytest.approx(0.5)  # 1 for the first pick, 0 for the third axis
    assert rel["mean"] == pytest.approx(0.25)  # pairs: 1, 0, 0, 0
    diag = unit_rows(e(1, 1, 0).unsqueeze(0))
    assert task_relevance(diag, ref)["nearest"] == pytest.approx(math.sqrt(0.5))


def test_category_coverage_counts_labels_of_every_shape():
    labels = ["a", "a", "b", "c", None]
    assert category_coverage(labels, [0, 1]) == {"covered": 1, "of": 3, "missed": {"b": 1, "c": 1}}
    assert category_coverage(labels, [0, 2, 3, 4])["covered"] == 3
    # BeaverTails' multi-label mapping and lists: a row covers every category flagged
    multi = [{"animal_abuse": True, "privacy_violation": True, "self_harm": False}, ["self_harm"], {"x": False}]
    assert category_coverage(multi, [0]) == {"covered": 2, "of": 3, "missed": {"self_harm": 1}}
    assert label_set({"x": False}) == frozenset()
    with pytest.raises(ValueError, match="category: expected a string"):
        label_set(3)


def test_selection_quality_reports_what_its_inputs_allow():
    pool = torch.stack([e(1, 0), e(0, 1), e(1, 0)])
    q = selection_quality(pool, [0, 1], reference_unit=pool[:1], labels=["x", "y", "x"])
    assert q["coverage"]["mean"] == pytest.approx(0.0) and q["redundancy"]["max"] == pytest.approx(0.0)
    assert q["task_relevance"]["nearest"] == pytest.approx(0.5) and q["categories"]["covered"] == 2
    assert selection_quality(None, [0], labels=["x", "y", "x"]) == {
        "k": 1, "categories": {"covered": 1, "of": 2, "missed": {"y": 1}}}
    with pytest.raises(ValueError, match="picked: empty"):
        coverage(pool, [])


# ----------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------
def test_registry_names_match_the_defense_presets_and_the_cli():
    from spard.commands.select import METHOD_NAMES, NEEDS_REFERENCE
    from spard.defenses.spard import SELECTION_METHODS
    from spard.select import METHOD_ALIASES

    assert SELECTION_METHODS == tuple(METHODS)
    assert set(METHOD_NAMES) == set(METHOD_ALIASES)
    assert {m for m in METHOD_NAMES if "reference" in METHODS[METHOD_ALIASES[m]].needs} == set(NEEDS_REFERENCE)


def test_k_center_is_farthest_first():
    # unit vectors at 0°, 10°, 20°, 100° and 180°: the mean points near 60°, so 20° starts; then
    # the farthest from it (180°), then the farthest from both (100° at 80° from 20°... vs 0° at
    # 20°): 100°; then 0° (20° from its nearest pick) before 10° (10°)
    angles = [0, 10, 20, 100, 180]
    unit = torch.stack([e(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in angles])
    c = Candidates(n=5, unit=unit)
    assert METHODS["k-center"].pick(c, 5) == [2, 4, 3, 0, 1]
    unit3 = clusters()
    picks = METHODS["k-center"].pick(Candidates(n=12, unit=unit3), 3)
    assert sorted(i // 4 for i in picks) == [0, 1, 2]  # one per cluster


def test_k_center_matches_its_definition():
    g = torch.Generator().manual_seed(3)
    unit = unit_rows(torch.randn(40, 5, generator=g))
    picks = METHODS["k-center"].pick(Candidates(n=40, unit=unit), 8)
    sims = unit @ unit.T
    expected = [int(torch.argmax(unit @ unit.mean(dim=0)))]
    while len(expected) < 8:
        d = 1 - sims[:, expected].amax(dim=1)
        d[expected] = -1
        expected.append(int(torch.argmax(d)))
    assert picks == expected


def test_dpp_is_the_similarity_kernel_greedy_and_spreads_over_clusters():
    from spard_ext import reference

    g = torch.Generator().manual_seed(1)
    unit = unit_rows(torch.randn(30, 6, generator=g))
    kernel = (unit @ unit.T).double() + 1e-6 * torch.eye(30, dtype=torch.float64)
    expected, _ = reference.dpp_greedy(kernel, k=5)
    picks = METHODS["dpp"].pick(Candidates(n=30, unit=unit), 5)
    # every diagonal entry is 1 + ε up to rounding, so the first pick is a tie: compare the sets
    # and the log det the greedy reaches
    assert set(picks) == set(expected.tolist())
    logdet = lambda idx: float(torch.linalg.slogdet(kernel[idx][:, idx]).logabsdet)
    assert logdet(picks) == pytest.approx(logdet(expected.tolist()), rel=1e-9)
    picks = METHODS["dpp"].pick(Candidates(n=12, unit=clusters()), 3)
    assert sorted(i // 4 for i in picks) == [0, 1, 2]


def test_relevance_takes_one_cluster_and_rd_dpp_trades_it_for_diversity():
    unit = clusters()
    q = unit @ unit_rows(e(1, 0.3, 0).unsqueeze(0))[0]  # the task sits near the first axis
    top = METHODS["relevance"].pick(Candidates(n=12, unit=unit, q=q), 3)
    assert [i // 4 for i in top] == [0, 0, 0]
    rd = METHODS["rd-dpp"].pick(Candidates(n=12, unit=unit, q=q, beta=1.0), 2)
    assert sorted(i // 4 for i in rd) == [0, 1]  # the most relevant row, then the 2nd cluster


def test_behavior_aware_takes_refusals_and_spreads_over_categories():
    assert quotas([20, 3, 1], 6) == [3, 2, 1]
    assert quotas([5, 5], 3) == [2, 1]
    unit = clusters(n_per=8)  # 24 rows
    refusals = ["I'm sorry, I cannot help." if i % 2 else "Here is why that is wrong." for i in range(24)]
    # skewed categories: 20 rows of "big", 3 of "mid", 1 of "small"
    labels = ["big"] * 20 + ["mid"] * 3 + ["small"]
    labels[1] = "small"  # a refusal in "small" (row 23 is not one)
    c = Candidates(n=24, unit=unit, refusals=refusals, categories=labels, seed=0)
    picks = METHODS["behavior-aware"].pick(c, 5)
    assert len(set(picks)) == 5 and all(i % 2 for i in picks)  # refusals only
    assert {labels[i] for i in picks} == {"big", "mid", "small"}
    assert picks == METHODS["behavior-aware"].pick(c, 5)  # seeded: the same picks again
    # without labels the strata are k-means clusters: one pick per cluster
    c = Candidates(n=24, unit=unit, refusals=["I cannot."] * 24, seed=0)
    assert sorted(i // 8 for i in METHODS["behavior-aware"].pick(c, 3)) == [0, 1, 2]
    # fewer refusals than k: every row is a candidate
    c = Candidates(n=24, unit=unit, refusals=["no refusal here"] * 23 + ["I cannot."], seed=0)
    assert len(set(METHODS["behavior-aware"].pick(c, 4))) == 4


# ----------------------------------------------------------------------------------------------
# select_safe_data: needs checked first, quality in the report
# ----------------------------------------------------------------------------------------------
def pool_and_table():
    unit = clusters()
    pool = [{"prompt": f"p{i}", "safe": "I'm sorry, I can't.", "category": f"c{i // 4}"} for i in range(12)]
    ref = [{"prompt": "r0"}]
    table = {f"p{i}": unit[i] for i in range(12)} | {"r0": unit_rows(e(1, 0.3, 0).unsqueeze(0))[0]}
    return pool, ref, table


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_reports_its_quality(method):
    pool, ref, table = pool_and_table()
    idx, rep = select_safe_data(pool, ref, method=method, k=3, embedder=Fixed(table), device="cpu")
    q = rep["quality"]
    assert rep["method"] == method and len(set(idx)) == 3 and q["k"] == 3
    assert q["category_field"] == "category" and q["categories"]["of"] == 3
    assert 0 <= q["coverage"]["mean"] <= q["coverage"]["max"] <= 2
    assert q["task_relevance"]["nearest"] >= q["task_relevance"]["mean"]
    if method in ("dpp", "k-center", "behavior-aware"):
        assert q["categories"]["covered"] == 3  # one pick in each cluster
    if method == "relevance":
        assert q["categories"]["covered"] == 1 and q["redundancy"]["mean"] > 0.9


def test_needs_are_checked_before_any_work():
    pool, _, table = pool_and_table()
    never = Fixed({})  # any call would fail with a KeyError
    with pytest.raises(ValueError, match=r"^reference: the relevance method needs the task rows"):
        select_safe_data(pool, None, method="relevance-only", k=2, embedder=never)
    with pytest.raises(ValueError, match=r"^reference: the rd-dpp method needs the task rows"):
        select_safe_data(pool, [], method="rd-dpp", k=2, embedder=never)
    with pytest.raises(ValueError, match=r"^embedder: required for k-center"):
        select_safe_data(pool, None, method="k-center", k=2)
    with pytest.raises(ValueError, match=r"^k: give k \(there are no task rows"):
        select_safe_data(pool, None, method="dpp", embedder=never)
    with pytest.raises(ValueError, match=r"^category_field: no pool row has a 'topic' field"):
        select_safe_data(pool, None, method="dpp", k=2, embedder=never, category_field="topic")
    assert never.calls == 0
    # without task rows, the methods that do not need them run, and report no task relevance
    idx, rep = select_safe_data(pool, None, method="k-center", k=3, embedder=Fixed(table), device="cpu")
    assert "task_relevance" not in rep["quality"] and "relevance" not in rep and len(idx) == 3
    idx, rep = select_safe_data(pool, None, method="random", k=3)
    assert set(rep["quality"]) == {"k", "categories", "category_field"}
