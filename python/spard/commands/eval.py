"""`spard eval`: generate on safety prompts and task rows, judge, score; JSON + markdown table.

    spard eval --model BASE --adapter runs/x/adapter \
        --safety-data beavertails_test.jsonl --n-safety 500 \
        --task-data gsm8k_test.jsonl --n-task 500 --judge refusal --out runs/x/eval

Everything that can fail cheaply (data, judge reachability, adapter fit) is checked before the
first token is generated. ``--rejudge`` reuses the responses saved by an earlier run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path



def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", help="base model: Hugging Face name or local folder (not needed with --rejudge)")
    m.add_argument("--adapter", help="LoRA adapter folder (PEFT) fine-tuned on top of --model")
    m.add_argument("--device", help="cuda / cpu (default: cuda when present)")
    m.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32 (default: auto)")
    d = p.add_argument_group("data")
    d.add_argument("--safety-data", help="harmful prompts (jsonl/json/parquet/datasets folder/hub name) with a 'prompt' field")
    d.add_argument("--safety-split", help="split to read when --safety-data is a hub name or a multi-split folder")
    d.add_argument("--n-safety", type=int, default=500, help="first N safety prompts (default 500; 0 = all)")
    d.add_argument("--task-data", help="task test set (GSM8K: prompt + answer; OpenBookQA: prompt + target_answer)")
    d.add_argument("--task", choices=["auto", "gsm8k", "openbookqa"], default="auto",
                   help="how to score --task-data (default: auto, from its fields)")
    d.add_argument("--task-split", help="split to read when --task-data is a hub name or a multi-split folder")
    d.add_argument("--n-task", type=int, default=500, help="first N task rows (default 500; 0 = all)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=512, help="new tokens per safety response (default 512)")
    g.add_argument("--task-max-new-tokens", type=int, default=512, help="new tokens per task response (default 512)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--long-prompts", choices=["truncate", "error"], default="truncate",
                   help="prompts longer than the model's context less the new tokens: truncate (default: keep "
                        "their end, counted in eval.json) or error (refuse them before generating)")
    j = p.add_argument_group("judge")
    j.add_argument("--judge", choices=["refusal", "moderation", "guard", "rubric"], default="refusal",
                   help="refusal keywords (offline, default), moderation classifier, generative guard, API rubric")
    j.add_argument("--judges", metavar="NAME[=MODEL],...",
                   help="several judges on the same answers, e.g. refusal,moderation=path/to/classifier: each "
                        "one's ASR and their pairwise Cohen's kappa (the first one's ASR is the headline ASR; "
                        "MODEL defaults to --judge-model)")
    j.add_argument("--judge-model", help="moderation/guard: model name or folder; rubric: the API's model name")
    j.add_argument("--judge-base-url", default="https://api.openai.com/v1", help="rubric: OpenAI-compatible base URL")
    j.add_argument("--judge-api-key-env", default="OPENAI_API_KEY",
                   help="rubric: environment variable holding the API key ('' for a server without auth)")
    j.add_argument("--judge-concurrency", type=int, default=8, help="rubric: requests in flight")
    j.add_argument("--judge-timeout", type=float, default=60.0, help="rubric: seconds per request")
    j.add_argument("--judge-retries", type=int, default=5, help="rubric: retries on 429/5xx/timeouts")
    j.add_argument("--judge-cache", help="rubric: cache file of judged pairs (default: OUT/rubric_cache.jsonl)")
    j.add_argument("--judge-threshold", type=float, default=0.5, help="moderation: flagged above this probability")
    j.add_argument("--judge-batch-size", type=int, default=8, help="moderation/guard batch size")
    from spard.commands.generation import add_backend_arguments
    add_backend_arguments(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", required=True, help="output folder: eval.json, eval.md, *_generations.jsonl")
    o.add_argument("--rejudge", action="store_true",
                   help="judge and score the responses saved in --out by an earlier run, without generating")
    o.add_argument("--no-progress", action="store_true", help="no progress bars (generation, judges)")


def _limit(n: int, name: str) -> int | None:
    if n < 0:
        raise ValueError(f"{name} must be >= 0 (0 = all), got {n}")
    return n or None


DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")


def _check_numbers(args) -> None:
    for name in ("max_new_tokens", "task_max_new_tokens", "batch_size", "judge_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if not 0.0 < args.judge_threshold < 1.0:
        raise ValueError(f"--judge-threshold: expected a probability in (0, 1), got {args.judge_threshold}")


def parse_judges(text: str | None, default_model: str | None = None) -> list[tuple[str, str | None]]:
    """'refusal,moderation=path' -> [("refusal", None), ("moderation", "path")]; each name
    checked, each model-backed judge given a model (its own or ``default_model``)."""
    from spard.eval import JUDGES

    if text is None:
        return []
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, model = item.partition("=")
        name = name.strip()
        if name not in JUDGES:
            raise ValueError(f"--judges: unknown judge {name!r}; known: {', '.join(JUDGES)}")
        model = model.strip() or (default_model if name != "refusal" else None)
        if name != "refusal" and not model:
            raise ValueError(f"--judges: the {name} judge needs a model ({name}=MODEL or --judge-model)")
        out.append((name, model))
    if len(out) < 2:
        raise ValueError(f"--judges: expected at least two judges separated by commas, got {text!r}")
    return out


def _build_judge(args, out: Path, name: str | None = None, model: str | None = None):
    from spard.eval import make_judge

    if name is None:  # the single --judge
        name, model = args.judge, args.judge_model
    if name == "refusal":
        return make_judge("refusal")
    if name == "rubric":
        return make_judge("rubric", model=model, base_url=args.judge_base_url,
                          api_key_env=args.judge_api_key_env or None, concurrency=args.judge_concurrency,
                          timeout=args.judge_timeout, max_retries=args.judge_retries,
                          cache_path=args.judge_cache or out / "rubric_cache.jsonl")
    kwargs = {"batch_size": args.judge_batch_size, "device": args.device}
    if name == "moderation":
        kwargs["threshold"] = args.judge_threshold
    return make_judge(name, model=model, **kwargs)


def run(args) -> int:
    from spard.data import load_task
    from spard.eval import evaluate, load_generations, load_model, markdown_table
    from spard.eval.evaluate import check_task_rows
    from spard.io import write_json_atomic, write_text_atomic
    from spard.training.preflight import check_device, check_model_source, input_named
    from spard.training.runfolder import check_output_dir

    out = Path(args.out)
    if not args.safety_data and not args.task_data:
        raise ValueError("--safety-data / --task-data: give at least one of them")
    if not args.rejudge and not args.model:
        raise ValueError("--model: required (unless --rejudge)")
    _check_numbers(args)
    from spard.eval import serving
    client = serving.client_from_args(args, batch_size=args.batch_size, progress=not args.no_progress)
    if client is not None:
        if args.do_sample:
            raise ValueError("--do-sample: the openai backend decodes greedily only (--gen-backend hf samples)")
        if args.adapter:
            serving.check_servable(_trained_defenses(args.adapter))
    check_device(args.device, "--device")
    check_output_dir(out, "--out", files=("eval.json", "eval.md"))  # before anything is generated
    if not args.rejudge:
        check_model_source(args.model, "--model")
    # Data, judge and adapter are all checked before generation starts.
    safety_rows = task_rows = None
    if args.safety_data:
        safety_rows = load_task(args.safety_data, split=args.safety_split,
                                limit=_limit(args.n_safety, "--n-safety"), require_response=False)
    if args.task_data:
        task_rows = load_task(args.task_data, split=args.task_split, limit=_limit(args.n_task, "--n-task"))
        with input_named("--task-data"):  # every row scorable, before the model loads
            check_task_rows(task_rows, None if args.task == "auto" else args.task)
    safety_responses = task_responses = None
    if args.rejudge:
        safety_responses, task_responses = _saved_responses(out, safety_rows, task_rows, load_generations)
    judges = parse_judges(args.judges, args.judge_model)
    judge, extra_judges = None, []
    if safety_rows and judges:
        built = [_build_judge(args, out, name, model) for name, model in judges]
        judge, extra_judges = built[0], built[1:]
    elif safety_rows:
        judge = _build_judge(args, out)
    for j in ([judge] if judge else []) + extra_judges:
        j.check()
        j.progress = not args.no_progress
    model = tokenizer = served = None
    if not args.rejudge and client is not None:  # the weights stay on the server
        model, tokenizer = serving.load_for_serving(args.model, args.adapter)
        served = _served(args, client, serving)
    elif not args.rejudge:
        model, tokenizer = load_model(args.model, args.adapter, device=args.device, dtype=args.dtype)
    result = evaluate(
        model, tokenizer,
        safety_prompts=[r["prompt"] for r in safety_rows] if safety_rows else None,
        task_rows=task_rows, task=None if args.task == "auto" else args.task, judge=judge,
        max_new_tokens=args.max_new_tokens, task_max_new_tokens=args.task_max_new_tokens,
        batch_size=args.batch_size, do_sample=args.do_sample, out_dir=out,
        safety_responses=safety_responses, task_responses=task_responses, extra_judges=extra_judges,
        long_prompts=args.long_prompts, backend=served, progress=not args.no_progress,
    )
    failed = (result.get("safety") or {}).get("failed_calls", 0)
    if failed:
        print(f"spard eval: warning: {failed} of {result['safety']['n']} {result['safety']['judge'].get('name')} "
              "judge calls failed; those answers are not scored (rerun to retry them)", file=sys.stderr)
    result["inputs"] = {"model": args.model, "adapter": args.adapter, "safety_data": args.safety_data,
                        "task_data": args.task_data, "rejudge": args.rejudge, "gen_backend": args.gen_backend}
    write_json_atomic(out / "eval.json", result)
    table = markdown_table(result, title=f"spard eval: {args.adapter or args.model or out}")
    write_text_atomic(out / "eval.md", table)
    print(table)
    print(f"results: {out / 'eval.json'}")
    return 0


def _trained_defenses(adapter: str) -> list:
    """The defense `spard train` recorded next to the adapter (run.json), when there is one."""
    import json

    from spard.defenses import REGISTRY, make_defense

    run_file = Path(adapter).parent / "run.json"
    try:
        described = json.loads(run_file.read_text(encoding="utf-8")).get("defense") or {}
    except (OSError, ValueError, AttributeError):
        return []
    if described.get("name") not in REGISTRY:
        return []
    try:
        return [make_defense(described["name"], **(described.get("settings") or {}))]
    except (TypeError, ValueError):
        return []


def _served(args, client, serving):
    """The base model and the adapter by their served names: the adapter registered with the
    server unless --gen-adapter-name names one it already serves."""
    base = args.gen_model or args.model
    client.check(base)
    name = args.gen_adapter_name
    if name is not None:
        client.check(name)
    elif args.adapter:
        name = client.register_adapter(args.adapter)
    return serving.Served(client, base=base, adapter=name,
                          adapter_id=serving.adapter_name(args.adapter) if args.adapter else name,
                          check=not args.no_adapter_check, probes=args.adapter_probes)


def _saved_responses(out: Path, safety_rows, task_rows, load_generations):
    """Responses from an earlier run's files, matched to the requested prompts."""
    found = []
    for rows, name in ((safety_rows, "safety_generations.jsonl"), (task_rows, "task_generations.jsonl")):
        if not rows:
            found.append(None)
            continue
        path = out / name
        if not path.is_file():
            raise FileNotFoundError(f"--rejudge: {path} not found (run without --rejudge first)")
        saved = load_generations(path)
        if [r["prompt"] for r in saved] != [r["prompt"] for r in rows]:
            raise ValueError(f"--rejudge: {path} holds responses to other prompts ({len(saved)} saved, "
                             f"{len(rows)} requested); use the same data and --n-* as the first run")
        found.append([r["response"] for r in saved])
    return found[0], found[1]
