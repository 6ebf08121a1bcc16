"""`spard select`: pick the safety subset for a fine-tuning run with RD-DPP (or a baseline).

Writes ``<out>/selected.jsonl`` (the picked pool rows, unchanged, in pick order) and
``<out>/select_report.json`` (k, method, relevance, log det, the pick's quality, timings, the
picked indices, and ``selected_sha256``, the hash of the selected.jsonl it goes with), and prints
the report as a table.

The output folder is locked for the run (``spard.training.runfolder.OutputLock``, as `spard train` does),
so a second `spard select` into it is refused; the pair is written report last (the old report
removed first, each file atomically), so a report always describes the selected.jsonl beside it.
The options (``--k`` or ``--p``, ``--cache-dir``) are checked before any pool row is embedded.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path

# Kept equal to spard.select.METHOD_ALIASES (a test checks it) so `spard --help` needs no torch.
METHOD_NAMES = ("rd-dpp", "random", "relevance", "dpp", "k-center", "behavior-aware", "relevance-only")
# The methods that read the task rows (spard.selectors: NEEDS "reference").
NEEDS_REFERENCE = ("rd-dpp", "relevance", "relevance-only")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "spard", "embeddings")
DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16"}
DEFAULT_P = 0.03


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("data")
    io.add_argument("--pool", required=True, help="safety pool: rows with prompt and safe (a refusal; unsafe is "
                    "optional); jsonl/json/parquet/save_to_disk folder/hub name")
    io.add_argument("--reference", default=None, help="the user's fine-tuning set as submitted (rows with a prompt); "
                    "needed by rd-dpp and relevance, and to derive k from --p")
    io.add_argument("--pool-split", default=None, help="split of a save_to_disk folder or hub dataset")
    io.add_argument("--reference-split", default=None, help="split of a save_to_disk folder or hub dataset")
    io.add_argument("--limit-pool", type=int, default=None, help="use only the first N pool rows")
    io.add_argument("--limit-reference", type=int, default=None, help="use only the first N reference rows")
    io.add_argument("--out", required=True, help="output folder (selected.jsonl, select_report.json)")

    sel = parser.add_argument_group("selection")
    # The same names as the Python API (spard.select.METHOD_ALIASES).
    sel.add_argument("--method", default="rd-dpp", choices=list(METHOD_NAMES))
    sel.add_argument("--k", type=int, default=None, help="subset size (default floor(p * |reference|))")
    sel.add_argument("--p", type=float, default=None, help=f"subset size as a fraction of the reference size "
                     f"(default {DEFAULT_P}; give --k or --p)")
    sel.add_argument("--beta", type=float, default=4.0, help="relevance exponent: r = clamp(q, 0)^beta")
    sel.add_argument("--seed", type=int, default=0, help="seed of the random, behavior-aware methods")
    sel.add_argument("--category-field", default=None, help="the pool rows' harm-category field, for the "
                     "behavior-aware method and the categories covered (default: category, when the rows have it)")

    emb = parser.add_argument_group("embedding")
    emb.add_argument("--model", default=None, help="the base LLM being fine-tuned (the default embedder)")
    emb.add_argument("--embedder", default=None, help="embedding model name/path instead of --model ('minilm' = bundled MiniLM)")
    emb.add_argument("--batch-size", type=int, default=64)
    emb.add_argument("--max-length", type=int, default=256, help="tokens per text (longer texts are cut)")
    emb.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="auto: bf16 where the GPU/CPU computes it natively, else float32")
    emb.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    emb.add_argument("--cache-dir", default=DEFAULT_CACHE, help=f"embedding cache (default {DEFAULT_CACHE})")
    emb.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")


def _table(report: dict) -> str:
    rows = [
        ("method", report["method"]),
        ("pool / reference", f"{report['n_pool']} / {report['n_reference']}"),
        ("k (selected)", f"{report['k']} ({report['k_selected']})"),
        ("embedder", report.get("embedder", "-")),
    ]
    if "relevance" in report:
        rel = report["relevance"]
        if rel["mean"] is not None:
            rows.append(("relevance mean / min", f"{rel['mean']:.4f} / {rel['min']:.4f}"))
        rows.append(("pool relevance mean", f"{report['pool_relevance']['mean']:.4f}"))
        rows.append(("log det L_Y", f"{report['logdet']:.3f}"))
    rows += _quality_rows(report.get("quality") or {})
    for stage, seconds in report["timings_s"].items():
        rows.append((f"time {stage}", f"{seconds:.2f} s"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _quality_rows(q: dict) -> list:
    """The pick's quality (spard.selection_quality) as table rows."""
    rows = []
    if "coverage" in q:
        rows.append(("coverage: pool-to-pick distance mean / max", f"{q['coverage']['mean']:.4f} / {q['coverage']['max']:.4f}"))
        red = q["redundancy"]
        if red["mean"] is not None:
            rows.append(("redundancy: pick-pick cosine mean / max", f"{red['mean']:.4f} / {red['max']:.4f}"))
    if "task_relevance" in q:
        rel = q["task_relevance"]
        rows.append(("task similarity: nearest / mean", f"{rel['nearest']:.4f} / {rel['mean']:.4f}"))
    if "categories" in q:
        cat = q["categories"]
        rows.append((f"categories covered ({q.get('category_field', 'category')})", f"{cat['covered']} of {cat['of']}"))
    return rows


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    embedder = args.embedder or args.model
    if embedder is None and args.method != "random":
        raise ValueError("--model / --embedder: give --model (the base LLM, the default embedder) or "
                         f"--embedder for --method {args.method}")
    if args.reference is None and args.method in NEEDS_REFERENCE:
        raise ValueError(f"--reference: the {args.method} method needs the task rows (the user's fine-tuning set)")
    if args.reference is None and args.k is None:
        raise ValueError("--k: give --k (without --reference there is nothing to derive k from --p)")
    return _select(args, embedder)


def _select(args: argparse.Namespace, embedder) -> int:
    from spard.embed import MINILM
    from spard.training.preflight import check_device, check_model_source
    from spard.training.runfolder import check_output_dir

    out = check_output_dir(args.out, "--out", files=("selected.jsonl", "select_report.json"))
    for name in ("limit_pool", "limit_reference", "k"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "k" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: expected an int >= {0 if name == 'k' else 1}, got {value}")
    if args.batch_size < 1 or args.max_length < 1:
        raise ValueError(f"--batch-size / --max-length: expected ints >= 1, got {args.batch_size} / {args.max_length}")
    if args.k is not None and args.p is not None:
        raise ValueError("--k / --p: give one of them (--k is the subset size, --p derives it from the reference size)")
    p = DEFAULT_P if args.p is None else args.p
    check_device(args.device, "--device")
    if args.method != "random" and embedder != MINILM:  # run() made sure one is given
        check_model_source(embedder, "--embedder" if args.embedder else "--model")
    if embedder is not None and not args.no_cache:  # the cache is written after the pool is embedded
        check_output_dir(args.cache_dir, "--cache-dir")
    with _locked(out):
        return _select_into(args, embedder, out, p)


@contextlib.contextmanager
def _locked(out: Path):
    """Holds ``out``'s OutputLock (created for it when missing) and removes a killed run's temporary
    files. A run that fails leaves the folders it created as they were: absent."""
    from spard.training.runfolder import LOCK_FILE, OutputLock, remove_stale_temps

    created = [d for d in (out, *out.parents) if not d.exists()]  # the deepest first
    lock = OutputLock(out, "--out").acquire()
    try:
        remove_stale_temps(out)
        yield
    except BaseException:
        lock.release()
        if created:
            with contextlib.suppress(OSError):
                (out / LOCK_FILE).unlink()
                for folder in created:
                    folder.rmdir()  # only when nothing else was written there
        raise
    lock.release()


def _select_into(args: argparse.Namespace, embedder, out: Path, p: float) -> int:
    import hashlib

    from spard.data import POOL_FIELDS, load_safety, load_task
    from spard.io import write_json_atomic, write_jsonl_atomic
    from spard.training.preflight import input_named
    from spard.select import select_safe_data

    with input_named("--pool"):  # the safe set is the pool's refusals: every row needs one
        pool = load_safety(args.pool, split=args.pool_split, limit=args.limit_pool, fields=POOL_FIELDS)
    if args.category_field is not None and not any(r.get(args.category_field) is not None for r in pool):
        raise ValueError(f"--category-field: no row of {args.pool} has a {args.category_field!r} field")
    reference = None
    if args.reference is not None:
        with input_named("--reference"):
            reference = load_task(args.reference, split=args.reference_split, limit=args.limit_reference,
                                  require_response=False)

    settings = {"batch_size": args.batch_size, "max_length": args.max_length, "device": args.device}
    if DTYPES[args.dtype] is not None:
        import torch

        settings["dtype"] = getattr(torch, DTYPES[args.dtype])
    with input_named("--k / --p", source="k:"):
        indices, report = select_safe_data(
            pool,
            reference,
            method=args.method,
            k=args.k,
            p=p,
            beta=args.beta,
            embedder=embedder,
            seed=args.seed,
            cache_dir=None if args.no_cache else args.cache_dir,
            device=args.device,
            embedder_settings=settings,
            category_field=args.category_field,
        )

    selected_path, report_path = out / "selected.jsonl", out / "select_report.json"
    report_path.unlink(missing_ok=True)  # never an old report beside a new selection
    write_jsonl_atomic(selected_path, [pool[i] for i in indices])
    digest = hashlib.sha256(selected_path.read_bytes()).hexdigest()
    report.update(pool_source=args.pool, reference_source=args.reference, selected=str(selected_path), indices=indices,
                  selected_sha256=digest)
    write_json_atomic(report_path, report)  # last: a report always describes the selected.jsonl beside it
    print(_table(report))
    print(f"wrote {selected_path} and {report_path}")
    return 0
