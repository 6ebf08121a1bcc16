"""Generation backends on the world's model on the CPU, in one run: answers per second and new
tokens per second of ``hf`` (in-process ``generate``) and ``openai`` (the same rows through
``/v1/completions`` of spard.eval.mini_server, a separate process on 127.0.0.1).

    .venv/bin/python -m pytest benchmarks/bench_serving.py -q -s     # table on stdout
    SPARD_BENCH_ROUNDS=5 ...                                          # more rounds (default 3)

Both backends decode the same rows (100 harmful prompts and 100 task problems of the world,
40 new tokens, 16 rows per batch / request, greedy) with one torch thread each; the openai
backend is run with 1 and 2 requests in flight. The server is the project's reference server,
not an engine: the ratio measures what HTTP, JSON and a second process cost on top of the same
``generate``, not what vLLM would gain. Medians over rounds go to benchmarks/results/serving.json.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from spard.io import write_json_atomic

ROUNDS = int(os.environ.get("SPARD_BENCH_ROUNDS", "3"))
OUT = Path(__file__).parent / "results" / "serving.json"
NEW, BATCH = 40, 16


def _world(tmp: Path):
    from spard.world import WorldSettings, build_world

    w = build_world(WorldSettings(), progress=False)
    w.model.save_pretrained(tmp / "model")
    w.tokenizer.save_pretrained(tmp / "model")
    prompts = [r["prompt"] for r in w.data["harmful_test"][:100]] + [r["prompt"] for r in w.data["task_test"][:100]]
    return w, prompts


def _median(xs):
    return statistics.median(xs)


def test_generation_backends(tmp_path):
    from spard.eval.generate import eos_ids_of, fit_prompt_ids, generate_from_ids
    from spard.eval.serving import OpenAIGenerator

    torch.set_num_threads(1)
    w, prompts = _world(tmp_path)
    model, tok = w.model.eval(), w.tokenizer
    ids, _ = fit_prompt_ids(model, tok, prompts, max_new_tokens=NEW)
    eos = eos_ids_of(model, tok)
    proc = subprocess.Popen([sys.executable, "-m", "spard.eval.mini_server", "--model", str(tmp_path / "model"),
                             "--served-model-name", "world", "--port", "0", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().split(" on ")[1].strip()
        runs: dict[str, list[tuple[float, int, list[str]]]] = {"hf": [], "openai x1": [], "openai x2": []}
        for _ in range(ROUNDS):
            t = time.perf_counter()
            new = generate_from_ids(model, tok, ids, max_new_tokens=NEW, batch_size=BATCH, progress=False)
            answers = [tok.decode(x, skip_special_tokens=True).strip() for x in new]
            runs["hf"].append((time.perf_counter() - t, sum(len(x) for x in new), answers))
            for conc in (1, 2):
                client = OpenAIGenerator(url, concurrency=conc, batch_size=BATCH, progress=False)
                t = time.perf_counter()
                answers = client.generate_from_ids("world", ids, tokenizer=tok, max_new_tokens=NEW, stop_ids=eos)
                runs[f"openai x{conc}"].append((time.perf_counter() - t, client.stats["completion_tokens"], answers))
    finally:
        proc.kill()
        proc.wait()
    reference = runs["hf"][0][2]
    results = {}
    for name, rs in runs.items():
        secs = _median([r[0] for r in rs])
        tokens = rs[0][1]
        results[name] = {"seconds": secs, "answers": len(ids), "new_tokens": tokens,
                         "answers_per_s": len(ids) / secs, "tokens_per_s": tokens / secs,
                         "same_answers_as_hf": all(r[2] == reference for r in rs)}
    base = results["hf"]["seconds"]
    print(f"\n| backend | median s | answers/s | new tokens/s | x hf time | same answers as hf |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.2f} | {r['answers_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['seconds'] / base:.2f} | {r['same_answers_as_hf']} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(OUT, {"rounds": ROUNDS, "max_new_tokens": NEW, "batch": BATCH, "results": results})
    assert all(r["same_answers_as_hf"] for r in results.values())
