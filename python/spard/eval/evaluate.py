"""One evaluation: responses to the safety prompts judged for harm, responses to the task rows
scored for accuracy, results as a JSON-ready dict and a markdown table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .generate import generate, save_generations
from .judges import Judge, RefusalJudge
from .metrics import (
    Rate,
    extract_gsm8k_number,
    extract_openbookqa_choice,
    gsm8k_accuracy,
    openbookqa_accuracy,
    safety_metrics,
)

TASKS = ("gsm8k", "openbookqa")
OBQA_CHOICES = ("answer1", "answer2", "answer3", "answer4")

__all__ = ["TASKS", "check_task_rows", "detect_task", "evaluate", "markdown_table", "task_accuracy", "task_gold"]


def detect_task(rows: Sequence[dict]) -> str:
    """OpenBookQA rows carry ``target_answer``; anything else is scored as GSM8K."""
    return "openbookqa" if rows and "target_answer" in rows[0] else "gsm8k"


def task_gold(task: str, row: dict, index: int = 0) -> str:
    """The gold answer of a task row (GSM8K: ``answer``, else ``response``; OpenBookQA:
    ``target_answer``)."""
    field = ("answer" if "answer" in row else "response") if task == "gsm8k" else "target_answer"
    if field not in row:
        raise ValueError(f"task row {index} has no {field!r} field (task {task!r}); fields: {sorted(row)}")
    return row[field]


def check_task_rows(task_rows: Sequence[dict], task: str | None = None) -> str:
    """Checks that every task row can be scored (a prompt and a valid gold answer), before any
    generation; returns the task (detected when None)."""
    task = task or detect_task(task_rows)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    for i, row in enumerate(task_rows):
        if not isinstance(row.get("prompt"), str):
            raise ValueError(f"task row {i} needs a string 'prompt'")
        gold = task_gold(task, row, i)
        if task == "openbookqa" and str(gold).strip().lower().replace(" ", "") not in OBQA_CHOICES:
            raise ValueError(f"task row {i}: target_answer must be answer1..answer4, got {gold!r}")
    return task


def task_accuracy(task: str, responses: Sequence[str], rows: Sequence[dict]) -> Rate:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    gold = [task_gold(task, r, i) for i, r in enumerate(rows)]
    return gsm8k_accuracy(responses, gold) if task == "gsm8k" else openbookqa_accuracy(responses, gold)


def _value(x: float | None):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def evaluate(model, tokenizer, *, safety_prompts: Sequence[str] | None = None, task_rows: Sequence[dict] | None = None,
             task: str | None = None, judge: Judge | None = None, max_new_tokens: int = 512,
             task_max_new_tokens: int = 512, batch_size: int = 8, do_sample: bool = False,
             out_dir: str | Path | None = None, safety_responses: Sequence[str] | None = None,
             task_responses: Sequence[str] | None = None, extra_judges: Sequence[Judge] = ()) -> dict:
    """Generates (unless responses are given), judges and scores.

    ``extra_judges`` judge the same safety answers besides ``judge`` (whose verdicts make the
    ASR): ``result["judges"]`` then holds every judge's ASR and each pair's Cohen's kappa
    (spard.eval.agreement), and the saved generations each judge's verdict.

    Returns {"safety": {...}, "task": {...}, "generation": {...}}; a part is absent when its
    inputs are. With ``out_dir``, responses and per-item verdicts are saved as JSON Lines
    (``safety_generations.jsonl``, ``task_generations.jsonl``) so judging can be rerun."""
    if not safety_prompts and not task_rows:
        raise ValueError("nothing to evaluate: give safety_prompts and/or task_rows")
    judge = judge if judge is not None else RefusalJudge()
    if task_rows:
        task = check_task_rows(task_rows, task)
    if model is None and ((safety_prompts and safety_responses is None) or (task_rows and task_responses is None)):
        raise ValueError("model and tokenizer are required unless the responses are given")
    if safety_prompts:
        for j in (judge, *extra_judges):
            j.check()  # an unusable judge fails before generation starts
    result: dict = {"generation": {"max_new_tokens": max_new_tokens, "task_max_new_tokens": task_max_new_tokens,
                                   "do_sample": do_sample, "batch_size": batch_size}}
    out = Path(out_dir) if out_dir is not None else None

    if safety_prompts:
        prompts = list(safety_prompts)
        if safety_responses is None:
            safety_responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, do_sample=do_sample, desc="safety prompts")
            if out is not None:  # saved before judging: a judge failure does not cost the generations
                save_generations(out / "safety_generations.jsonl", prompts, safety_responses)
        elif len(safety_responses) != len(prompts):
            raise ValueError(f"safety_responses has {len(safety_responses)} items for {len(prompts)} prompts")
        verdicts = judge.judge(prompts, list(safety_responses))
        m = safety_metrics(verdicts, list(safety_responses), hs=judge.hs_kind)
        asr: Rate = m["asr"]
        result["safety"] = {"judge": judge.describe(), "n": m["n"], "asr": _value(asr), "harmful": asr.hits,
                            "hs": _value(m.get("hs")), "unparseable": m["unparseable"],
                            "failed_calls": m["failed_calls"], "empty_responses": m["empty_responses"],
                            "degenerate_responses": m["degenerate_responses"]}
        extra = [v.to_dict() for v in verdicts]
        if extra_judges:
            from .agreement import compare_judges
            by_judge = {judge.name: [v.harmful for v in verdicts]}
            for j in extra_judges:
                name = j.name
                while name in by_judge:  # two judges of one kind (two moderation models, say)
                    name += "'"
                by_judge[name] = [v.harmful for v in j.judge(prompts, list(safety_responses))]
            result["judges"] = compare_judges(by_judge)
            for i, row in enumerate(extra):
                row["judges"] = {name: vs[i] for name, vs in by_judge.items()}
        if out is not None:
            save_generations(out / "safety_generations.jsonl", prompts, safety_responses, extra=extra)

    if task_rows:
        prompts = [r["prompt"] for r in task_rows]
        if task_responses is None:
            task_responses = generate(model, tokenizer, prompts, max_new_tokens=task_max_new_tokens,
                                      batch_size=batch_size, do_sample=do_sample, desc=f"{task} prompts")
        elif len(task_responses) != len(prompts):
            raise ValueError(f"task_responses has {len(task_responses)} items for {len(prompts)} rows")
        acc = task_accuracy(task, task_responses, task_rows)
        result["task"] = {"task": task, "n": acc.n, "accuracy": _value(acc), "correct": acc.hits,
                          "unparseable": acc.extra.get("no_number", acc.extra.get("no_choice", 0))}
        if out is not None:
            extract = extract_gsm8k_number if task == "gsm8k" else extract_openbookqa_choice
            extra = []
            for i, (row, resp) in enumerate(zip(task_rows, task_responses)):
                pred = extract(resp)
                extra.append({"gold": str(task_gold(task, row, i)) if task == "openbookqa"
                              else str(extract_gsm8k_number(str(task_gold(task, row, i)))),
                              "extracted": None if pred is None else str(pred)})
            save_generations(out / "task_generations.jsonl", prompts, task_responses, extra=extra)
    return result


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def markdown_table(result: dict, title: str | None = None) -> str:
    """A readable summary of ``evaluate``'s result."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| metric | value | n | notes |", "| --- | --- | --- | --- |"]
    s = result.get("safety")
    if s:
        judge = s["judge"].get("name", "?")
        notes = (f"judge {judge}; unparseable {s['unparseable']}; failed calls {s['failed_calls']}; "
                 f"empty or degenerate {s.get('degenerate_responses', s['empty_responses'])} (not scored)")
        lines.append(f"| ASR (%) | {_pct(s['asr'])} | {s['n']} | {notes} |")
        if s.get("hs") is not None:
            hs = f"{s['hs']:.2f}" if s["judge"].get("name") == "rubric" else f"{s['hs']:.1f}"
            kind = "mean rubric score 1-5" if s["judge"].get("name") == "rubric" else "% flagged"
            lines.append(f"| HS | {hs} | {s['n']} | {kind} |")
    t = result.get("task")
    if t:
        lines.append(f"| {t['task']} accuracy (%) | {_pct(t['accuracy'])} | {t['n']} | unparseable {t['unparseable']} |")
    if result.get("judges"):
        from .agreement import judges_table
        lines += ["", "Judges side by side on the same answers:", "", judges_table(result["judges"])]
    return "\n".join(lines) + "\n"
