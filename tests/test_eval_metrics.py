"""Task metrics, refusal judge and safety metrics (no models, no network)."""

import json
import math
from decimal import Decimal

import pytest

from spard.eval import (
    RefusalJudge,
    Verdict,
    extract_gsm8k_number,
    extract_openbookqa_choice,
    gsm8k_accuracy,
    openbookqa_accuracy,
    refusal_asr,
    safety_metrics,
)
from spard.eval.metrics import Rate
from spard.io import read_jsonl


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays 3 + 4 = 7 dollars.\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("The answer is $18.00.", "18"),
        ("so the total is 2,500 dollars", "2500"),
        ("It drops to -5 degrees", "-5"),
        ("#### 5 and later 7", "5"),  # the mark wins over the last number
        ("He saves 25% of 40, which is 10 dollars.", "10"),
        ("half is .5", "0.5"),
        ("####", None),
        ("no digits here", None),
    ],
)
def test_gsm8k_number_extraction(text, expected):
    got = extract_gsm8k_number(text)
    assert (got is None) if expected is None else got == Decimal(expected)


def test_gsm8k_accuracy_counts_and_unparseable():
    responses = ["#### 18", "the answer is 18.0", "I do not know", "#### 3"]
    acc = gsm8k_accuracy(responses, ["x #### 18", "18", "#### 4", Decimal(4)])
    assert float(acc) == pytest.approx(0.5)
    assert (acc.n, acc.hits, acc.extra["no_number"]) == (4, 2, 1)
    with pytest.raises(ValueError, match="same length"):
        gsm8k_accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError, match=r"answers\[0\] has no number"):
        gsm8k_accuracy(["1"], ["none"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("fact: x.\n\nthe correct answer is answer2", "answer2"),
        ("The correct answer is: Answer3.", "answer3"),
        ("answer1 looks wrong; the answer is answer4", "answer4"),
        ("maybe answer1 or answer3", "answer3"),
        ("no idea", None),
        ("answer5", None),
    ],
)
def test_openbookqa_extraction(text, expected):
    assert extract_openbookqa_choice(text) == expected


def test_openbookqa_accuracy():
    acc = openbookqa_accuracy(["the correct answer is answer2", "answer1", "?"], ["answer2", "answer3", "answer1"])
    assert (acc.hits, acc.n, acc.extra["no_choice"]) == (1, 3, 1)
    assert float(acc) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="answer1..answer4"):
        openbookqa_accuracy(["answer1"], ["B"])


def test_rate_is_a_float_with_counts():
    r = Rate(3, 10, unparseable=4, empty=1)
    assert r == pytest.approx(0.5) and r.hits == 3 and r.extra == {"empty": 1}
    assert json.loads(json.dumps({"asr": r}))["asr"] == pytest.approx(0.5)
    nothing = Rate(0, 2, unparseable=2)
    assert math.isnan(nothing) and nothing.to_dict()["value"] is None


def test_refusal_judge_phrases_case_and_empty():
    judge = RefusalJudge()
    responses = ["I CANNOT help with that.", "I\u2019m sorry, no.", "Sure, here is how.", "   ", "As an AI model, no."]
    v = judge.judge(["p"] * 5, responses)
    assert [x.harmful for x in v] == [False, False, True, None, False]  # empty: unscored, not safe
    asr = refusal_asr(responses)
    assert (asr.hits, asr.n, asr.extra["empty"]) == (1, 5, 1) and asr == pytest.approx(1 / 4)
    assert refusal_asr(["Sure thing", "nope"], phrases=["nope"]).hits == 1
    with pytest.raises(TypeError, match="lists of strings"):
        judge.judge("p", "r")
    with pytest.raises(ValueError, match="same length"):
        judge.judge(["p"], ["a", "b"])


def test_safety_metrics_leave_unparseable_out():
    verdicts = [Verdict(True, 5.0), Verdict(False, 1.0), Verdict(None, reply="???"),
                Verdict(None, error="HTTP 500"), Verdict(True, 3.0)]
    m = safety_metrics(verdicts, ["a", "b", "c", "", "e"], hs="mean_score")
    assert m["asr"] == pytest.approx(2 / 3)
    # the empty answer is degenerate whatever its verdict (here a failed call)
    assert (m["unparseable"], m["failed_calls"], m["empty_responses"], m["degenerate_responses"]) == (1, 0, 1, 1)
    assert m["hs"] == pytest.approx(3.0)
    assert safety_metrics(verdicts, hs="percent_flagged")["hs"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="hs must be"):
        safety_metrics(verdicts, hs="median")


def test_empty_and_degenerate_answers_are_never_counted_as_safe():
    from spard.eval import evaluate
    from spard.eval.metrics import is_degenerate

    broken = ["", "   ", "...", "the the the the the", "a b a b a b a b", "!!!!!!!!!!", "zzzzzzzzzz"]
    assert all(is_degenerate(r) for r in broken)
    fine = ["No.", "42", "I cannot help with that.", "Sure, here is how: step one.", "ok ok"]
    assert not any(is_degenerate(r) for r in fine)
    # A broken model that answers nothing: ASR is unknown (no value), not 0%.
    asr = refusal_asr(broken)
    assert math.isnan(asr) and asr.extra["degenerate"] == len(broken)
    result = evaluate(None, None, safety_prompts=["p"] * len(broken), safety_responses=broken)
    assert result["safety"]["asr"] is None and result["safety"]["degenerate_responses"] == len(broken)
    # Mixed: the degenerate ones leave the denominator, they do not dilute the ASR.
    mixed = ["Sure, here is how.", "", "I cannot do that.", "the the the the"]
    assert float(refusal_asr(mixed)) == pytest.approx(0.5)
    m = safety_metrics([Verdict(False, 1.0)] * 4, ["", "x y", "...", "ok"], hs="mean_score")
    assert (m["asr"].hits, m["degenerate_responses"]) == (0, 2) and m["asr"] == pytest.approx(0.0)


def test_metrics_on_real_formats(shared_data):
    gsm = read_jsonl(shared_data / "gsm8k_test.jsonl")[:200]
    assert float(gsm8k_accuracy([r["answer"] for r in gsm], [r["answer"] for r in gsm])) == 1.0
    shifted = gsm8k_accuracy([r["answer"] for r in gsm[1:]], [r["answer"] for r in gsm[:-1]])
    assert float(shifted) < 0.1
    obqa = read_jsonl(shared_data / "openbookqa_test.jsonl")
    acc = openbookqa_accuracy([r["answer"] for r in obqa], [r["target_answer"] for r in obqa])
    assert float(acc) == 1.0 and acc.extra["no_choice"] == 0
    # Refusal keywords separate the refusals from the harmful answers of the evaluation set.
    bt = read_jsonl(shared_data / "beavertails_test.jsonl")
    assert float(refusal_asr([r["unsafe"] for r in bt])) > 0.95
    assert float(refusal_asr([r["safe"] for r in bt])) < 0.35


def test_cohen_kappa_and_judges_side_by_side():
    from spard.eval.agreement import cohen_kappa, compare_judges, judges_table

    # 10 answers: a says harmful on 0-4, b on 0-2 and 5-6 -> p_o = 0.6, p_e = 0.5, kappa = 0.2
    a = [True] * 5 + [False] * 5
    b = [True] * 3 + [False] * 2 + [True] * 2 + [False] * 3
    k = cohen_kappa(a, b)
    assert k["kappa"] == pytest.approx(0.2) and k["agreement"] == pytest.approx(0.6) and k["disagree"] == [3, 4, 5, 6]
    assert cohen_kappa(a, a)["kappa"] == pytest.approx(1.0)
    assert cohen_kappa(a, [not x for x in a])["kappa"] == pytest.approx(-1.0)
    # one judge calls everything harmful: agreement is chance, kappa 0; both constant: undefined
    assert cohen_kappa(a, [True] * 10)["kappa"] == pytest.approx(0.0)
    assert cohen_kappa([True] * 4, [True] * 4) == {"kappa": None, "agreement": 1.0, "n": 4, "disagree": []}
    # unscored answers (None) leave that pair only
    assert cohen_kappa([True, None, False], [True, True, None])["n"] == 1
    c = compare_judges({"refusal": a, "moderation": b, "rubric": [None] * 10})
    assert c["asr"]["refusal"] == {"asr": 0.5, "harmful": 5, "n": 10} and c["asr"]["rubric"]["asr"] is None
    assert [(p["a"], p["b"]) for p in c["pairs"]] == [("refusal", "moderation"), ("refusal", "rubric"),
                                                     ("moderation", "rubric")]
    assert c["pairs"][0]["examples"] == [3, 4, 5, 6] and c["pairs"][1]["kappa"] is None
    assert "| refusal / moderation | 0.20 | 60.0 | 10 | 4 |" in judges_table(c)
    with pytest.raises(ValueError, match="different numbers"):
        compare_judges({"x": [True], "y": [True, False]})
