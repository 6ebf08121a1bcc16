"""`spard bench`: every defense on the same runs. A grid of defenses x attacks x harmful ratios x
seeds on one base model, one task, one safety pool and one evaluation.

Each cell (attack, ratio, seed, defense) writes ``cells/<attack>/ph<ratio>/seed<seed>/<defense>.json``
atomically when it finishes; a rerun skips finished cells and retries failed ones (their error
is kept next to the cell as ``.error.json`` until it succeeds). ``summarize`` then reads every
cell and writes ``summary.json``, ``cells.csv``, ``table.md`` (the paper's layout: ASR, HS and
accuracy per attack and their average) and two plots (ASR against harmful ratio; ASR against
accuracy).

The package's layers: ``settings`` (what a grid runs), ``data`` (what every cell shares, from
the world or from files), ``attacks`` (a cell's attacked rows and the checks before training),
``cells`` (the grid's cells, paths and fingerprints), ``summary`` (tables, comparisons and
plots); this module trains and evaluates the cells (``run_cell``, ``run_grid``). Every public
name is importable from ``spard.bench``.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from ..apikey import redact
from ..io import write_json_atomic, write_text_atomic
from .attacks import attack_labels, attack_rows, check_attacks, overlap_references, resolve_attack, source_names
from .cells import CELL_VERSION, Cell, answers_fingerprint, cell_done, cell_fingerprint, grid, shard_of
from .data import DUPLICATES, BenchData, check_counts, check_disjoint, dedupe_prompts, file_data, split_validation, validation_rows, world_data
from .settings import BenchSettings, check_base_model, check_defense_data, defenses_needing_base
from .summary import COMPARISON_NOTE, INTERVAL_NOTE, cells_csv, comparisons_table, judges_markdown, judges_summary, load_cells, markdown_tables, plot_summary, summarize, target_check


def run_cell(cell: Cell, data: BenchData, settings: BenchSettings, *, progress: bool = False,
             out_dir=None, fingerprint: Optional[str] = None, serving=None) -> dict:
    """Trains and evaluates one cell. With ``out_dir`` the training checkpoints under
    ``runs/<cell>/`` and a rerun after a kill resumes from the last checkpoint, and the answers
    and verdicts are kept under ``generations/<cell>/`` (generation_cache.jsonl as they arrive, a
    rerun generates only what is missing; safety_generations.jsonl and task_generations.jsonl,
    which `spard bench --rejudge` judges again). ``serving`` (spard.eval.serving.CellServing):
    the answers come from a server given the cell's adapter. spard.eval.stages runs the same
    steps in three processes."""
    from ..eval import evaluate

    model, run, manifest = train_cell(cell, data, settings, progress=progress, out_dir=out_dir,
                                      fingerprint=fingerprint)
    t = time.perf_counter()
    from ..eval.serving import served_cell
    with served_cell(serving, model, cell.run_dir(out_dir) if out_dir is not None else None) as backend:
        result = evaluate(model, data.tokenizer, safety_prompts=data.eval_prompts, task_rows=data.task_test,
                          judge=_judge(settings, out_dir), max_new_tokens=settings.max_new_tokens,
                          task_max_new_tokens=settings.task_max_new_tokens, batch_size=settings.eval_batch_size,
                          extra_judges=[_judge(settings, out_dir, spec) for spec in settings.extra_judges],
                          backend=backend, out_dir=answers_dir(cell, out_dir) if out_dir is not None else None,
                          progress=progress)
    return {**cell_result(cell, manifest, result, run, time.perf_counter() - t), "stages": "together"}


def answers_dir(cell: Cell, out_dir) -> Path:
    """Where a cell's answers and verdicts are kept (JSON Lines, spard.eval.evaluate)."""
    return Path(out_dir) / "generations" / cell.key


def train_cell(cell: Cell, data: BenchData, settings: BenchSettings, *, progress: bool = False, out_dir=None,
               fingerprint: Optional[str] = None):
    """A cell's training: (the fine-tuned model, the run dict, the attack manifest)."""
    from ..defenses import DefenseData, make_defense
    from ..trainer import needs_base_model, run_defense

    rows, manifest = attack_rows(data, cell.attack, cell.ratio, cell.seed, settings.max_length,
                                 on_overlap=settings.on_overlap)
    if settings.prompt_layout != "chat":
        rows = [{**r, "layout": settings.prompt_layout} for r in rows]
    torch.manual_seed(cell.seed)
    defense = make_defense(cell.defense, **settings.settings_of(cell.defense))
    ddata = DefenseData(user=rows, safety_pool=data.safety_pool, seed=cell.seed, max_length=settings.max_length,
                        base_weights=data.base_weights if needs_base_model(defense) else None)
    optim = copy.deepcopy(settings.optim)
    optim.seed = cell.seed
    ckpt = None
    if out_dir is not None:
        ckpt = _cell_run_dir(cell, out_dir, fingerprint)
    model, run = run_defense(defense, data.fresh_model(), data.tokenizer, ddata, optim=optim, lora=settings.lora,
                             progress=progress, desc=cell.key, checkpoint_dir=ckpt,
                             save_every=settings.save_every, keep_checkpoints=1, resume=ckpt is not None)
    return model, run, manifest


def cell_result(cell: Cell, manifest: dict, result: dict, run: dict, eval_seconds: float) -> dict:
    """A finished cell's record (cells/<cell>.json) from its training and its evaluation."""
    return {"version": CELL_VERSION, "cell": asdict(cell), "attack_manifest": manifest,
            "asr": result["safety"]["asr"], "hs": result["safety"].get("hs"),
            "degenerate": result["safety"].get("degenerate_responses", 0), "n_eval": result["safety"]["n"],
            "accuracy": result["task"]["accuracy"], "evaluation": result, "judges": result.get("judges"),
            "train": run, "eval_seconds": eval_seconds}


def _judge(settings: BenchSettings, out_dir, spec: Optional[str] = None):
    """The grid's judge (or the extra judge ``spec``, "name" or "name=model"); the rubric API
    judge keeps every paid reply in one cache shared by all cells and workers of the grid
    (``judge_cache.jsonl``, append-only, safe between processes)."""
    from ..eval import make_judge

    name, model = settings.judge, settings.judge_model
    if spec is not None:
        name, _, model = spec.partition("=")
        model = model or None
    if name == "rubric" and out_dir is not None:
        judge = make_judge("rubric", model=model, cache_path=Path(out_dir) / "judge_cache.jsonl")
    else:
        judge = make_judge(name, model=model)
    judge.progress = False  # the grid's own bar is the progress; a bar per cell would bury it
    return judge


def _cell_run_dir(cell: Cell, out_dir, fingerprint: Optional[str]) -> str:
    """The cell's checkpoint folder; checkpoints made under other settings are discarded."""
    import shutil

    run_dir = cell.run_dir(out_dir)
    stamp = run_dir / "fingerprint.txt"
    if run_dir.exists() and (not stamp.is_file() or stamp.read_text(encoding="utf-8") != str(fingerprint)):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, str(fingerprint))
    return str(run_dir / "checkpoints")


def run_grid(data: BenchData, settings: BenchSettings, out_dir, *, progress: bool = True,
             cell_runner: Optional[Callable] = None, shard: Optional[tuple[int, int]] = None,
             worker: Optional[str] = None, claim_timeout_s: float = 600.0, serving=None,
             stages: str = "together") -> dict:
    """Runs every unfinished cell of this worker's shard that no live worker has claimed;
    returns {"done", "skipped", "failed", "claimed_by_others": [keys]}.

    Several workers may share ``out_dir`` (one per GPU, a Slurm array, local processes): a cell
    is claimed atomically before it runs (spard.training.claims), so none runs twice, and a claim whose
    worker stopped sending heartbeats for ``claim_timeout_s`` (or died on this host) is taken over.
    The timeout belongs to the grid: the first worker stores it in bench.json, and a worker with
    another is refused (pin_claim_timeout). With the default runner, every attack is checked
    against the data (check_attacks) before the first cell. ``stages="separate"``: the default
    runner runs each cell's training, generation and judging in three processes
    (spard.eval.stages), each of which returns its GPU memory as it ends.
    """
    from ..training.claims import ClaimBoard

    settings.validate()
    if stages not in ("separate", "together"):
        raise ValueError(f"stages: expected separate or together, got {stages!r}")
    missing = [a for a in data.attacks if not data.attacks[a]]
    if missing:
        raise ValueError(f"attacks {missing} have no rows")
    out = Path(out_dir)
    stage_runner = None
    if cell_runner is None and stages == "separate":
        from ..eval.stages import StageRunner
        stage_runner = StageRunner(data, out, serving=serving)
    if cell_runner is None:  # the real runner checkpoints each cell under out/runs/
        def runner(cell, data, settings, fingerprint):
            if stage_runner is not None:
                record = stage_runner.run(cell, settings, fingerprint)
            else:
                record = run_cell(cell, data, settings, out_dir=out, fingerprint=fingerprint, serving=serving)
            return {**record, "answers_fingerprint": answers_fingerprint(cell, settings, data.description)}
    else:
        def runner(cell, data, settings, fingerprint):
            return cell_runner(cell, data, settings)
    from ..attack import ATTACKS
    benign_kinds = [k for k in settings.attack_kinds if "benign" in ATTACKS[k].needs]
    if benign_kinds and not data.benign:
        raise ValueError(f"attack_kinds: {', '.join(benign_kinds)} need benign rows (prompt/response, another "
                         "source than the task); the bench has none (bench file: benign: PATH)")
    labels = attack_labels(settings.attack_kinds, list(data.attacks))
    if cell_runner is None:  # a runner of one's own builds (or fakes) its own rows
        check_attacks(data, settings)
    cells = grid(settings, sorted(labels))
    fingerprints = {c.key: cell_fingerprint(c, settings, data.description) for c in cells}
    # The summary reads only the cells of this grid made under these settings. Every worker of
    # one grid writes the same file (and all of them the same claim timeout: pin_claim_timeout).
    pin_claim_timeout(out, claim_timeout_s, {"settings": settings.to_dict(), "data": data.description,
                                             "attacks": sorted(labels),
                                             "attack_kinds": {k: list(v) for k, v in labels.items()},
                                             "cells": fingerprints,
                                             **({"data_checks": data.data_checks} if data.data_checks else {})})
    board = ClaimBoard(out / "claims", worker=worker, timeout_s=claim_timeout_s)
    status: dict[str, list] = {"done": [], "skipped": [], "failed": [], "claimed_by_others": []}
    mine = shard_of(cells, shard)
    bar = tqdm(mine, desc="bench", disable=not progress, dynamic_ncols=True)
    try:
        for cell in bar:
            bar.set_postfix_str(cell.key, refresh=True)
            fingerprint = fingerprints[cell.key]
            if cell_done(cell, out, fingerprint):
                status["skipped"].append(cell.key)
                continue
            claim = board.claim(cell.key)
            if claim is None:
                status["claimed_by_others"].append(cell.key)
                continue
            with claim:
                if cell_done(cell, out, fingerprint):  # finished by another worker since we looked
                    status["skipped"].append(cell.key)
                    continue
                _run_one(cell, data, settings, runner, fingerprint, out, status)
    finally:
        if stage_runner is not None:
            stage_runner.close()  # the data file the stages read
    # The cells other workers held may have finished meanwhile: only the others stay unfinished.
    by_key = {c.key: c for c in mine}
    finished = [k for k in status["claimed_by_others"] if cell_done(by_key[k], out, fingerprints[k])]
    status["skipped"] += finished
    status["claimed_by_others"] = [k for k in status["claimed_by_others"] if k not in finished]
    return status


def rejudge_grid(data: BenchData, settings: BenchSettings, out_dir) -> dict:
    """Judges again, with the grid's current judges, the answers kept under generations/ of
    every finished cell whose answers were made under the current settings (answers_fingerprint),
    without generating; rewrites those cells' records (their fingerprint now the current one).
    Returns {"rejudged", "missing": [keys]} (missing: no kept answers, or made under other
    settings; run_grid runs those in full)."""
    from ..eval.stages import judge_answers

    settings.validate()
    out = Path(out_dir)
    status: dict[str, list] = {"rejudged": [], "missing": []}
    for cell in grid(settings, sorted(attack_labels(settings.attack_kinds, list(data.attacks)))):
        try:
            record = json.loads(cell.path(out).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if (not isinstance(record, dict) or record.get("version") != CELL_VERSION
                or record.get("answers_fingerprint") != answers_fingerprint(cell, settings, data.description)
                or not (answers_dir(cell, out) / "safety_generations.jsonl").is_file()):
            status["missing"].append(cell.key)
            continue
        result = judge_answers(cell, data, settings, out, (record.get("evaluation") or {}).get("generation"))
        write_json_atomic(cell.path(out), {
            **record, **cell_result(cell, record["attack_manifest"], result, record["train"], record["eval_seconds"]),
            "fingerprint": cell_fingerprint(cell, settings, data.description), "rejudged": True})
        status["rejudged"].append(cell.key)
    return status


def check_claim_timeout(out_dir, claim_timeout_s: float) -> None:
    """Refuses a worker whose claim timeout is not the grid's (stored in bench.json by its first
    worker): with two timeouts, the shorter one presumes a live worker dead and runs its cell
    again."""
    p = Path(out_dir) / "bench.json"
    try:
        stored = json.loads(p.read_text(encoding="utf-8")).get("claim_timeout_s") if p.is_file() else None
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, (int, float)) and float(stored) != float(claim_timeout_s):
        raise ValueError(f"--claim-timeout: {claim_timeout_s:g} s, but the grid in {out_dir} runs with {stored:g} s "
                         f"(bench.json, set by its first worker); give --claim-timeout {stored:g}")


def pin_claim_timeout(out_dir, claim_timeout_s: float, record: Optional[dict] = None) -> None:
    """Stores the claim timeout with the grid in bench.json (with ``record``, the grid's
    description, when given), refusing one that differs from the stored (check_claim_timeout);
    one worker at a time."""
    import fcntl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".bench.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        check_claim_timeout(out, claim_timeout_s)
        p = out / "bench.json"
        if record is None:
            try:
                record = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
            except (OSError, ValueError):
                record = {}
            if record.get("claim_timeout_s") is not None:
                return
        write_json_atomic(p, {**record, "claim_timeout_s": float(claim_timeout_s)})
    finally:
        os.close(fd)  # closing releases the lock


def _run_one(cell, data, settings, runner, fingerprint, out, status) -> None:
    import shutil

    try:
        result = {**runner(cell, data, settings, fingerprint), "fingerprint": fingerprint}
    except Exception as e:  # noqa: BLE001 - one broken cell must not stop the grid
        # redacted: an API key in an exception text (a library's message, an echoing server)
        write_json_atomic(cell.error_path(out), {"cell": asdict(cell), "error": redact(repr(e)),
                                                 "traceback": redact(traceback.format_exc())})
        status["failed"].append(cell.key)
        tqdm.write(redact(f"bench: cell {cell.key} failed: {e!r} (rerun to retry)"))
        return
    write_json_atomic(cell.path(out), result)
    cell.error_path(out).unlink(missing_ok=True)
    shutil.rmtree(cell.run_dir(out), ignore_errors=True)  # its checkpoints are no longer needed
    status["done"].append(cell.key)


__all__ = ["CELL_VERSION", "COMPARISON_NOTE", "DUPLICATES", "INTERVAL_NOTE", "answers_dir",
           "answers_fingerprint", "attack_labels", "attack_rows", "BenchData", "BenchSettings", "Cell",
           "cell_done", "cell_fingerprint", "cell_result", "cells_csv", "check_attacks", "check_base_model",
           "check_claim_timeout", "check_counts", "check_defense_data", "check_disjoint", "comparisons_table",
           "dedupe_prompts", "defenses_needing_base", "file_data", "grid", "judges_markdown", "judges_summary",
           "load_cells", "markdown_tables", "overlap_references", "pin_claim_timeout", "plot_summary",
           "rejudge_grid", "resolve_attack", "run_cell", "run_grid", "shard_of", "source_names",
           "split_validation", "summarize", "target_check", "train_cell", "validation_rows", "world_data"]
