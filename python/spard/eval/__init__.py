"""Evaluation: generate responses, judge their safety, score task accuracy.

    from spard.eval import load_model, generate, RefusalJudge, evaluate
    model, tok = load_model("path/to/base", adapter="runs/x/adapter")
    result = evaluate(model, tok, safety_prompts=prompts, task_rows=rows, task="gsm8k",
                      judge=RefusalJudge())
"""

from .evaluate import NoVerdict, evaluate, markdown_table, task_accuracy
from .generate import (
    AdapterError,
    check_adapter,
    generate,
    generate_from_ids,
    load_generations,
    load_model,
    save_generations,
    write_base_fingerprint,
)
from .factory import JUDGES, make_judge
from .judges import REFUSAL_PHRASES, GuardJudge, Judge, ModerationJudge, RefusalJudge, Verdict
from .metrics import (
    Rate,
    extract_gsm8k_number,
    extract_openbookqa_choice,
    gsm8k_accuracy,
    openbookqa_accuracy,
    refusal_asr,
    safety_metrics,
)
from .rubric import JudgeAPIError, JudgeUnavailable, RubricJudge, parse_rubric_score

__all__ = [
    "AdapterError", "GuardJudge", "JUDGES", "Judge", "JudgeAPIError", "JudgeUnavailable", "ModerationJudge",
    "NoVerdict", "REFUSAL_PHRASES", "Rate", "RefusalJudge", "RubricJudge", "Verdict", "check_adapter", "evaluate",
    "extract_gsm8k_number", "extract_openbookqa_choice", "generate", "generate_from_ids",
    "gsm8k_accuracy", "load_generations", "load_model", "make_judge", "markdown_table",
    "openbookqa_accuracy", "parse_rubric_score", "refusal_asr", "safety_metrics", "save_generations",
    "task_accuracy", "write_base_fingerprint",
]
