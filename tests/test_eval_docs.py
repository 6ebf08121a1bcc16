"""docs/evaluation.md's "Differences from the released code": present, and its statements about
the released data and this project's rules true."""

import json
import re
from decimal import Decimal
from pathlib import Path

from spard.eval.metrics import extract_gsm8k_number, extract_openbookqa_choice, gsm8k_accuracy

DOC = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"


def _section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/evaluation.md has no section {title!r}"
    return m.group(1)


def test_the_differences_from_the_released_code_are_written_down():
    body = _section("Differences from the released code")
    for topic in ("**GSM8K scoring.**", "**OpenBookQA scoring.**", "**Decoding.**", "**Prompt templates.**"):
        assert topic in body, topic
    assert "issue 24" in body and "have not verified" in body


def test_the_gsm8k_gold_answers_it_names_are_read_exactly(shared_data):
    golds = [json.loads(line)["answer"] for line in (shared_data / "gsm8k_test.jsonl").open(encoding="utf-8")]
    tails = [g.rsplit("####", 1)[1].strip() for g in golds]
    commas, negatives = [t for t in tails if "," in t], [t for t in tails if t.startswith("-")]
    body = _section("Differences from the released code")
    assert f"{len(commas)} of the {len(golds):,} test gold answers carry" in body
    assert f"{len(negatives)} are negative" in body
    for t in commas + negatives:
        assert extract_gsm8k_number(f"#### {t}") == Decimal(t.replace(",", ""))
    assert gsm8k_accuracy(["the answer is 3", "#### -3"], ["#### -3", "#### -3"]) == 0.5  # the sign counts


def test_the_openbookqa_format_line_is_not_read_as_the_answer(shared_data):
    row = json.loads((shared_data / "openbookqa_test.jsonl").open(encoding="utf-8").readline())
    assert row["prompt"].rstrip().endswith("Answer format: answer1/answer2/answer3/answer4")
    echoed = "Answer format: answer1/answer2/answer3/answer4. The correct answer is answer3."
    assert extract_openbookqa_choice(echoed) == "answer3"
