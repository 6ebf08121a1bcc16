"""One evaluation: responses to the safety prompts judged for harm, responses to the task rows
scored for accuracy, results as a JSON-ready dict and a markdown table."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

from .generate import (
    LONG_PROMPTS,
    _check_common,
    check_prompts,
    context_length,
    decode_response,
    eos_ids_of,
    fit_prompt_ids,
    generate_from_ids,
    save_generations,
    weights_fingerprint,
)
from .judges import Judge, RefusalJudge
from .reply_cache import ReplyCache
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
GENERATION_CACHE = "generation_cache.jsonl"  # every response, appended as it is generated
GENERATION_RECORD = "generation.json"  # the settings each part's responses were generated with

__all__ = ["NoVerdict", "TASKS", "check_task_rows", "detect_task", "evaluate", "markdown_table", "task_accuracy", "task_gold"]


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


class NoVerdict(RuntimeError):
    """A judge gave no verdict at all: every call failed."""


def _require_verdicts(judge: Judge, verdicts: Sequence) -> None:
    """Fails when no answer got a verdict because the judge's calls failed (an API judge that
    was down, say): an ASR resting on nothing is not a result."""
    if not verdicts or any(v.harmful is not None for v in verdicts):
        return
    failed = [v for v in verdicts if getattr(v, "error", None)]
    if failed:
        raise NoVerdict(f"the {judge.name} judge gave no verdict: {len(failed)} of {len(verdicts)} calls failed "
                        f"(first: {failed[0].error}); answered pairs are cached, rerun once it is reachable")


def generation_key(model_id: str | None, max_new_tokens: int, do_sample: bool, eos: list[int], row) -> str:
    """A generated answer's cache key: the model, the settings and the prompt's token ids."""
    tag = [model_id, max_new_tokens, do_sample, eos]
    return hashlib.sha256(json.dumps([tag, list(row)]).encode("utf-8")).hexdigest()


def _generate_part(model, tokenizer, ids: list[list[int]], truncated: list[int], *, max_new_tokens: int,
                   batch_size: int, do_sample: bool, long_prompts: str, cache: ReplyCache | None,
                   model_id: str | None, what: str, backend=None, progress: bool = True) -> tuple[list[str], dict]:
    """Responses to the prompts' ``ids`` (``fit_prompt_ids``) and the settings they were
    generated with. With ``cache`` (append-only, spard.eval.reply_cache) every response is stored
    the moment its batch is generated and reused when the same model, settings and prompt come
    again: a run that dies (disk full, a judge failure, a kill) loses no generated answer."""
    responses: list[str | None] = [None] * len(ids)
    keys: list[str] = []
    eos = eos_ids_of(model, tokenizer)
    if cache is not None:
        keys = [generation_key(model_id, max_new_tokens, do_sample, eos, row) for row in ids]
        responses = [cache.get(k) for k in keys]
    todo = [i for i, r in enumerate(responses) if r is None]

    def keep(batch: list[int], tokens: list) -> None:
        for j, t in zip(batch, tokens):
            i = todo[j]
            responses[i] = t if backend is not None else decode_response(tokenizer, t)
            if cache is not None:
                cache.add(keys[i], responses[i])

    if todo and backend is not None:  # spard.eval.serving: the same rows, batches and stop ids
        backend.generate([ids[i] for i in todo], tokenizer=tokenizer, max_new_tokens=max_new_tokens, stop_ids=eos,
                         desc=f"{what} prompts", on_batch=keep)
    elif todo:
        generate_from_ids(model, tokenizer, [ids[i] for i in todo], max_new_tokens=max_new_tokens,
                          batch_size=batch_size, do_sample=do_sample, desc=f"{what} prompts", on_batch=keep,
                          progress=progress)
    settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "batch_size": batch_size,
                "long_prompts": long_prompts, "context_tokens": context_length(model),
                "truncated_prompts": len(truncated), "reused": len(ids) - len(todo)}
    if backend is not None:
        settings.update(backend.describe())
    return responses, settings  # type: ignore[return-value]


def _read_record(out: Path | None) -> dict:
    if out is None or not (out / GENERATION_RECORD).is_file():
        return {}
    try:
        record = json.loads((out / GENERATION_RECORD).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(out: Path, part: str, settings: dict) -> None:
    from spard.io import write_json_atomic

    write_json_atomic(out / GENERATION_RECORD, {**_read_record(out), part: settings})


def _generation_summary(parts: dict, do_sample: bool, batch_size: int, long_prompts: str) -> dict:
    """eval.json's ``generation``: the settings each part's answers were generated with (from
    ``generation.json`` for answers an earlier run generated; None where no record says)."""
    def shared(key, default):
        if not parts:
            return default
        values = [(v or {}).get(key) for v in parts.values()]
        if all(x == values[0] for x in values):
            return values[0]
        return {part: (v or {}).get(key) for part, v in parts.items()}

    summary = {"max_new_tokens": (parts.get("safety") or {}).get("max_new_tokens"),
               "task_max_new_tokens": (parts.get("task") or {}).get("max_new_tokens"),
               "do_sample": shared("do_sample", do_sample), "batch_size": shared("batch_size", batch_size),
               "long_prompts": shared("long_prompts", long_prompts), "context_tokens": shared("context_tokens", None),
               "truncated_prompts": {part: (v or {}).get("truncated_prompts") for part, v in parts.items()}}
    unrecorded = [part for part, v in parts.items() if not v]
    if unrecorded:
        summary["unrecorded"] = unrecorded  # answers given, or from a run that kept no generation.json
    return summary


def evaluate(model, tokenizer, *, safety_prompts: Sequence[str] | None = None, task_rows: Sequence[dict] | None = None,
             task: str | None = None, judge: Judge | None = None, max_new_tokens: int = 512,
             task_max_new_tokens: int = 512, batch_size: int = 8, do_sample: bool = False,
             out_dir: str | Path | None = None, safety_responses: Sequence[str] | None = None,
             task_responses: Sequence[str] | None = None, extra_judges: Sequence[Judge] = (),
             long_prompts: str = "truncate", backend=None, progress: bool = True) -> dict:
    """Generates (unless responses are given), judges and scores.

    Prompts beyond the model's context less the new tokens are left-truncated (their end kept)
    and counted in ``result["generation"]["truncated_prompts"]``, or refused before any
    generation with ``long_prompts="error"``. A judge whose every call failed ends the
    evaluation (NoVerdict) rather than report an ASR resting on nothing.

    ``extra_judges`` judge the same safety answers besides ``judge`` (whose verdicts make the
    ASR): ``result["judges"]`` then holds every judge's ASR and each pair's Cohen's kappa
    (spard.eval.agreement), and the saved generations each judge's verdict.

    Returns {"safety": {...}, "task": {...}, "generation": {...}}; a part is absent when its
    inputs are. With ``out_dir``, every response is appended to ``generation_cache.jsonl`` as its
    batch is generated (a rerun after a failure, a full disk say, generates only what is
    missing), the settings are recorded in ``generation.json`` (a rerun that only judges reports
    them), and responses and per-item verdicts are saved as JSON Lines
    (``safety_generations.jsonl``, ``task_generations.jsonl``) so judging can be rerun.

    ``backend`` (a ``spard.eval.serving.Served``) generates on an OpenAI-compatible server
    instead of ``model`` (which then only lends its config and generation config: the context
    and the stop ids); greedy only. The adapter check runs on the first safety prompts (else
    the task's) before anything else is generated, and ``result["generation"]`` records it.
    ``progress``: generation bars (a server backend keeps its own setting)."""
    if not safety_prompts and not task_rows:
        raise ValueError("nothing to evaluate: give safety_prompts and/or task_rows")
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts must be one of {', '.join(LONG_PROMPTS)}, got {long_prompts!r}")
    judge = judge if judge is not None else RefusalJudge()
    if task_rows:
        task = check_task_rows(task_rows, task)
    if model is None and ((safety_prompts and safety_responses is None) or (task_rows and task_responses is None)):
        raise ValueError("model and tokenizer are required unless the responses are given")
    if safety_prompts:
        check_prompts(safety_prompts)
        for j in (judge, *extra_judges):
            j.check()  # an unusable judge fails before generation starts
    out = Path(out_dir) if out_dir is not None else None
    fitted: dict = {}  # the prompts to generate for: ids within the context, truncated indices
    if safety_prompts and safety_responses is None:
        _check_common(max_new_tokens, batch_size, do_sample)
        fitted["safety"] = fit_prompt_ids(model, tokenizer, list(safety_prompts), max_new_tokens=max_new_tokens,
                                          long_prompts=long_prompts, what="safety prompt")
    if task_rows and task_responses is None:
        _check_common(task_max_new_tokens, batch_size, do_sample)
        fitted["task"] = fit_prompt_ids(model, tokenizer, [r["prompt"] for r in task_rows],
                                        max_new_tokens=task_max_new_tokens, long_prompts=long_prompts,
                                        what=f"{task} prompt", new_tokens_name="task_max_new_tokens")
    if backend is not None and do_sample:
        raise ValueError("do_sample: the openai backend decodes greedily only")
    cache = model_id = None
    if fitted and out is not None:
        cache = ReplyCache(out / GENERATION_CACHE)
        model_id = backend.model_id() if backend is not None else weights_fingerprint(model)
    check = None
    if backend is not None and fitted:  # the server must answer with the adapter, not the base model
        part = "safety" if "safety" in fitted else "task"
        new = max_new_tokens if part == "safety" else task_max_new_tokens
        check = backend.verify(fitted[part][0], tokenizer=tokenizer, max_new_tokens=new,
                               stop_ids=eos_ids_of(model, tokenizer), cache=cache,
                               key=lambda mid, row: generation_key(mid, new, do_sample, eos_ids_of(model, tokenizer), row))
    record = _read_record(out)
    parts: dict = {}
    result: dict = {}

    if safety_prompts:
        prompts = list(safety_prompts)
        if safety_responses is None:
            safety_responses, parts["safety"] = _generate_part(
                model, tokenizer, *fitted["safety"], max_new_tokens=max_new_tokens, batch_size=batch_size,
                do_sample=do_sample, long_prompts=long_prompts, cache=cache, model_id=model_id, what="safety",
                backend=backend, progress=progress)
            if out is not None:  # saved before judging: a judge failure does not cost the generations
                _write_record(out, "safety", parts["safety"])
                save_generations(out / "safety_generations.jsonl", prompts, safety_responses)
        elif len(safety_responses) != len(prompts):
            raise ValueError(f"safety_responses has {len(safety_responses)} items for {len(prompts)} prompts")
        else:
            parts["safety"] = record.get("safety")
        verdicts = judge.judge(prompts, list(safety_responses))
        _require_verdicts(judge, verdicts)
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
                theirs = j.judge(prompts, list(safety_responses))
                _require_verdicts(j, theirs)
                by_judge[name] = [v.harmful for v in theirs]
            result["judges"] = compare_judges(by_judge)
            for i, row in enumerate(extra):
                row["judges"] = {name: vs[i] for name, vs in by_judge.items()}
        if out is not None:
            save_generations(out / "safety_generations.jsonl", prompts, safety_responses, extra=extra)

    if task_rows:
        prompts = [r["prompt"] for r in task_rows]
        if task_responses is None:
            task_responses, parts["task"] = _generate_part(
                model, tokenizer, *fitted["task"], max_new_tokens=task_max_new_tokens, batch_size=batch_size,
                do_sample=do_sample, long_prompts=long_prompts, cache=cache, model_id=model_id, what=task,
                backend=backend, progress=progress)
            if out is not None:
                _write_record(out, "task", parts["task"])
        elif len(task_responses) != len(prompts):
            raise ValueError(f"task_responses has {len(task_responses)} items for {len(prompts)} rows")
        else:
            parts["task"] = record.get("task")
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
    generation = _generation_summary(parts, do_sample, batch_size, long_prompts)
    if backend is not None:
        generation.update(backend.describe(), **(check or {}))
    return {"generation": generation, **result}


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
