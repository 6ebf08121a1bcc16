"""Tuning the defenses before they are attacked (the first level of the bilevel pipeline).

Per defense, an Optuna study over the defense's own ``SEARCH_SPACE`` (spard.space, next to its
``Settings``) picks the settings with the lowest ASR under the grid's fixed attack (its first
attack at its first ratio, its first seed) whose task accuracy stays within ``max_acc_drop`` of
SFT's under the same attack. Everything is measured on the validation split
(``BenchData.validation()``: harmful prompts and problems disjoint from the test split the
tables report), so tuning never sees the test set. The first trial is the defense's current
settings, so tuning never picks something worse than them on validation; a trial over the
accuracy limit scores ``ASR + 1``, above every feasible one. The choice is written to
``tuned/<defense>.json`` and used by the grid and by the attacker.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import space as sp
from .training.claims import ClaimBoard
from .io import write_json_atomic, write_text_atomic
from .studies import once, open_study, require_optuna, run_slots, storage_for, study_name, trial_rows


def defense_space(name: str) -> dict:
    """The defense's search space (empty: nothing to tune); a composition's is its members',
    prefixed with their names (``spard.p``)."""
    from .defenses import make_defense
    return dict(make_defense(name).SEARCH_SPACE)


def base_settings(name: str, settings) -> dict:
    """The defense's settings as the grid would run them (preset, then the bench's overrides);
    a composition's as ``member.setting`` (its search space's names)."""
    from .defenses import make_defense
    from .defenses.composed import Composed
    d = make_defense(name, **settings.settings_of(name))
    return d.flat_settings() if isinstance(d, Composed) else dataclasses.asdict(d.settings)


def fixed_attack(data, settings) -> tuple[str, float, int]:
    """The grid's fixed attack: its first attack label, first ratio, first seed."""
    from .bench import attack_labels
    label = sorted(attack_labels(settings.attack_kinds, list(data.attacks)))[0]
    return label, float(settings.ratios[0]), int(settings.seeds[0])


def judge_asr(result: dict, judge: Optional[str]) -> Optional[float]:
    """The ASR of ``judge`` (a judge's name) in a cell result; None: the grid's first judge."""
    if judge is None:
        return result.get("asr")
    judges = (result.get("judges") or {}).get("asr") or {}
    if judge in judges:
        return judges[judge]["asr"]
    if ((result.get("evaluation") or {}).get("safety") or {}).get("judge", {}).get("name") == judge:
        return result.get("asr")
    if not judges and judge is not None and "evaluation" not in result:
        return result.get("asr")  # a result without judge details (a test's runner)
    raise ValueError(f"--objective-judge: no judge named {judge!r} in the cell's results "
                     f"(judges: {', '.join(judges) or 'the first only'})")


def tune_defenses(data, settings, out_dir, *, defenses: Sequence[str], trials: int, max_acc_drop: float = 0.05,
                  startup_trials: int = 10, storage: Optional[str] = None, judge: Optional[str] = None,
                  worker: Optional[str] = None, claim_timeout_s: float = 600.0, seed: int = 0,
                  cell_runner: Optional[Callable] = None, progress: bool = True, poll_s: float = 5.0) -> dict:
    """Tunes every defense of ``defenses`` that has a search space; returns {defense: the
    chosen settings} and writes ``tuned/<defense>.json``, ``tuning.json`` and ``tuning.md``."""
    from .bench import Cell, cell_fingerprint, run_cell
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"--tune-defenses: expected a number of trials >= 1, got {trials!r}")
    if not (isinstance(max_acc_drop, (int, float)) and 0 <= max_acc_drop <= 1):
        raise ValueError(f"--max-acc-drop: expected a share in [0, 1], got {max_acc_drop!r}")
    require_optuna("--tune-defenses")
    val = data.validation()
    out = Path(out_dir)
    root = out / "tuning"
    board = ClaimBoard(root / "claims", worker=worker, timeout_s=claim_timeout_s)
    runner = cell_runner or run_cell
    label, ratio, cell_seed = fixed_attack(data, settings)

    def measure(defense: str, s) -> dict:
        r = runner(Cell(label, ratio, cell_seed, defense), val, s)
        return {"asr": judge_asr(r, judge), "accuracy": r.get("accuracy")}

    # SFT under the fixed attack on validation: the accuracy every tuned defense must keep.
    made_under = cell_fingerprint(Cell(label, ratio, cell_seed, "sft"), settings, val.description)
    ref = once(root / "sft_reference.json", board, "sft_reference", lambda: measure("sft", settings),
               match={"attack": label, "ratio": ratio, "seed": cell_seed, "judge": judge, "fingerprint": made_under},
               poll_s=poll_s)
    if ref["accuracy"] is None:
        raise ValueError("--tune-defenses: SFT's validation accuracy is missing (no task answers scored)")
    limit = ref["accuracy"] - max_acc_drop
    chosen, report = {}, {}
    for d in defenses:
        sp.check_space(defense_space(d), f"{d} search space")

    def study_of(d: str):
        # What every trial depends on besides its own values: the bench's settings and this
        # defense's (the start), the validation data, the space, the judge and the limit.
        depends_on = {"bench": cell_fingerprint(Cell(label, ratio, cell_seed, d), settings, val.description),
                      "space": sp.describe(defense_space(d)), "judge": judge, "limit": round(limit, 9)}
        return open_study(study_name("tune", d, depends_on), storage_for(storage, root, d), direction="minimize",
                          seed=seed, startup_trials=min(startup_trials, trials))
    for wait in (False, True):  # first every study's free slots, then wait for the ones others hold
        for d in defenses:
            if defense_space(d):
                _tune_one(d, study_of(d), settings, trials, limit, measure,
                          cell_seed, board, progress, poll_s, wait)
    for d in defenses:
        space = defense_space(d)
        if not space:
            entry = {"defense": d, "settings": {}, "note": "no settings to tune", "space": {}}
            write_json_atomic(out / "tuned" / f"{d}.json", entry)
            chosen[d], report[d] = {}, entry
            continue
        study = study_of(d)
        rows = trial_rows(study, trials)
        ok = [r for r in rows if r.get("feasible")]
        best = min(ok, key=lambda r: (r["asr"], -r["accuracy"], r["number"])) if ok else None
        default = next((r for r in rows if r.get("enqueued_slot") == 0), None)
        failed = sum(t.state.name == "FAIL" for t in study.get_trials(deepcopy=False))
        entry = {"defense": d, "settings": best["settings"] if best else {},
                 "validation": {"asr": best["asr"], "accuracy": best["accuracy"]} if best else None,
                 "default": {"asr": default["asr"], "accuracy": default["accuracy"]} if default else None,
                 "note": None if best else "no setting kept the accuracy limit: the current settings stay",
                 "trials": len(rows), "feasible": len(ok), "failed": failed,
                 "space": sp.describe(space), "accuracy_limit": limit, "sft_validation_accuracy": ref["accuracy"],
                 "attack": label, "ratio": ratio, "seed": cell_seed, "judge": judge, "rows": rows}
        write_json_atomic(out / "tuned" / f"{d}.json", entry)
        chosen[d], report[d] = entry["settings"], entry
    summary = {"reference": ref, "max_acc_drop": max_acc_drop, "trials": trials, "defenses": report,
               "split": {"validation_prompts": len(val.eval_prompts), "validation_problems": len(val.task_test)}}
    write_json_atomic(out / "tuning.json", summary)
    write_text_atomic(out / "tuning.md", tuning_table(summary))
    return chosen


def _tune_one(d, study, settings, trials, limit, measure, cell_seed, board, progress, poll_s, wait) -> dict:
    """This worker's share of defense ``d``'s tuning study."""
    space = defense_space(d)
    base = base_settings(d, settings)

    def objective(trial, d=d, space=space, base=base):
        values = {name: sp.suggest(trial, name, p, base.get(name)) for name, p in space.items()}
        s = copy.deepcopy(settings)
        s.defense_settings = {**s.defense_settings, d: {**s.defense_settings.get(d, {}), **values}}
        m = measure(d, s)
        ok = m["asr"] is not None and m["accuracy"] is not None and m["accuracy"] >= limit
        for k, v in {**m, "feasible": ok, "settings": values, "seed": cell_seed}.items():
            trial.set_user_attr(k, v)
        return (m["asr"] if m["asr"] is not None else 1.0) + (0.0 if ok else 1.0)

    # The first trial: the defense's current settings (Scale ranges at 1x), when in the space.
    start = {(f"{n}_scale" if isinstance(p, sp.Scale) else n): (1.0 if isinstance(p, sp.Scale) else base.get(n))
             for n, p in space.items()}
    in_space = all(p.low <= 1.0 <= p.high if isinstance(p, sp.Scale) else sp.contains(p, base.get(n))
                   for n, p in space.items())
    return run_slots(study, trials, objective, board=board, key=study.study_name, enqueue=[start] if in_space else [],
                     progress=progress, desc=f"tune {d}", poll_s=poll_s, wait=wait)


def load_tuned(out_dir, defenses: Sequence[str]) -> dict:
    """{defense: settings} from ``tuned/<defense>.json`` for those that have one."""
    import json
    out = {}
    for d in defenses:
        p = Path(out_dir) / "tuned" / f"{d}.json"
        if p.is_file():
            out[d] = json.loads(p.read_text(encoding="utf-8")).get("settings") or {}
    return out


def apply_tuned(settings, tuned: dict) -> None:
    """Merges the tuned settings into the grid's per-defense overrides (in place)."""
    settings.defense_settings = {**settings.defense_settings,
                                 **{d: {**settings.defense_settings.get(d, {}), **v} for d, v in tuned.items() if v}}


def format_settings(values: dict) -> str:
    def one(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    return ", ".join(f"{k}={one(v)}" for k, v in values.items()) or "-"


def tuning_table(summary: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    ref = summary["reference"]
    lines = [f"### Tuned defenses (validation split, {summary['trials']} trials each; accuracy at least "
             f"SFT's {pct(ref['accuracy'])}% minus {100 * summary['max_acc_drop']:.0f} points)", "",
             "| defense | tuned settings | val ASR (%) | val accuracy (%) | default's val ASR (%) | feasible / trials |",
             "| --- | --- | --- | --- | --- | --- |"]
    for d, e in summary["defenses"].items():
        v, dflt = e.get("validation") or {}, e.get("default") or {}
        lines.append(f"| {d} | {format_settings(e['settings'])} | {pct(v.get('asr'))} | {pct(v.get('accuracy'))} | "
                     f"{pct(dflt.get('asr'))} | {e.get('feasible', '-')} / {e.get('trials', '-')} |")
    return "\n".join(lines) + "\n"


__all__ = ["apply_tuned", "base_settings", "defense_space", "fixed_attack", "format_settings", "judge_asr",
           "load_tuned", "tune_defenses", "tuning_table"]
