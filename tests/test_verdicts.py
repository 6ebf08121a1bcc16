"""The verdict pipeline: tuned defenses (spard.tuning) on a validation split, shared Optuna
studies whose trial slots are claimed like grid cells (spard.studies), the aggregates and the
capability guard (spard.worstcase), the attacker's prompt layouts, and bad input."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from spard import bench, space, studies, tuning, worstcase
from spard.bench import BenchData, BenchSettings
from spard.training.claims import ClaimBoard

optuna = pytest.importorskip("optuna", reason="optional dependency of the tuning and the attacker")


# ------------------------------------------------------------------------------------ aggregates
TRIALS = [  # hand-made: ASR, accuracy
    {"number": 0, "asr": 0.30, "accuracy": 0.44},
    {"number": 1, "asr": 0.90, "accuracy": 0.30},  # the highest ASR, but the model lost its task
    {"number": 2, "asr": 0.60, "accuracy": 0.36},
    {"number": 3, "asr": 0.50, "accuracy": 0.42},
    {"number": 4, "asr": None, "accuracy": 0.45},  # no answer scored
    {"number": 5, "asr": 0.50, "accuracy": 0.43},
]


def test_aggregates_on_a_hand_made_trial_list():
    ok = worstcase.feasible(TRIALS, 0.35)
    assert [t["number"] for t in ok] == [0, 2, 3, 5]
    assert worstcase.worst_case(ok)["number"] == 2
    # bounded: keep >= 95% of the defended model's 0.44 -> accuracy >= 0.418: trials 0, 3, 5; tie -> higher acc
    assert worstcase.bounded_worst_case(ok, 0.44, 95)["number"] == 5
    assert worstcase.bounded_worst_case(ok, 0.44, 100)["number"] == 0  # only trial 0 keeps all of it
    assert worstcase.bounded_worst_case(ok, 0.45, 100) is None  # none does
    assert worstcase.top_n_mean(ok, 2) == pytest.approx(0.55)
    assert worstcase.top_n_mean(ok, 10) == pytest.approx((0.3 + 0.6 + 0.5 + 0.5) / 4)
    agg = worstcase.aggregate(TRIALS, accuracy_limit=0.35, defended_accuracy=0.44, keep_pct=95, top_n=2)
    assert (agg["feasible"], agg["completed"], agg["worst_case"]["number"], agg["bounded_worst_case"]["number"]) == \
        (4, 6, 2, 5)
    assert worstcase.aggregate([], accuracy_limit=0.3, defended_accuracy=None)["worst_case"] is None


def test_capability_guard():
    g = worstcase.capability(0.12, 0.47, 0.8)
    assert not g["capable"] and "attack skipped" in g["note"] and g["ratio"] == pytest.approx(0.12 / 0.47)
    assert worstcase.capability(0.40, 0.47, 0.8)["capable"]
    assert worstcase.capability(None, 0.47, 0.8)["capable"]  # unknown: not guarded, said so


@pytest.mark.parametrize("call, match", [
    (lambda: worstcase.check_keep_pct(0), r"--bounded-keep: expected a percentage x in \(0, 100\]"),
    (lambda: worstcase.check_keep_pct(100.5), "--bounded-keep"),
    (lambda: worstcase.top_n_mean([], 0), "--top-n"),
    (lambda: worstcase.capability(0.1, 0.2, 1.5), "--capability-share"),
    (lambda: space.check_space({"rho": space.Float(2.0, 1.0)}, "lisa"), r"lisa.rho: expected a range low <= high"),
    (lambda: space.check_space({"x": space.Choice(())}, "d"), r"d.x: expected at least one option"),
    (lambda: space.check_space({"x": space.Float(0.0, 1.0, log=True)}, "d"), "log range needs low > 0"),
    (lambda: space.check_space({"x": space.Int(1, float("inf"))}, "d"), "finite"),
])
def test_bad_ranges_and_options_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_every_defense_declares_a_valid_space_holding_its_defaults():
    from spard.defenses import REGISTRY
    for name, (cls, _) in REGISTRY.items():
        space.check_space(cls.SEARCH_SPACE, name)
        base = tuning.base_settings(name, BenchSettings())
        for key, p in cls.SEARCH_SPACE.items():
            assert key in base, (name, key)
            if not isinstance(p, space.Scale):
                assert space.contains(p, base[key]), (name, key, base[key])
    assert REGISTRY["sft"][0].SEARCH_SPACE == {}
    assert set(REGISTRY["spard"][0].SEARCH_SPACE) == {"p", "beta", "tau_scale", "max_step"}


# ------------------------------------------------------------------------------- shared studies
def _study(tmp_path, name="s"):
    return studies.open_study(name, studies.storage_for(None, tmp_path / "st", name), direction="maximize",
                              seed=0, startup_trials=2)


class Killed(BaseException):
    """Stands for the process being stopped: nothing in the study code catches it."""


def test_a_killed_study_resumes_without_redoing_finished_trials(tmp_path):
    study = _study(tmp_path)
    board = ClaimBoard(tmp_path / "claims")
    seen, kill = [], [True]

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        seen.append(trial.user_attrs["slot"])
        if len(seen) == 3 and kill and kill.pop():
            raise Killed  # the worker is stopped in the middle of slot 2
        return x

    with pytest.raises(Killed):
        studies.run_slots(study, 5, objective, board=board, key="s", progress=False)
    assert seen == [0, 1, 2] and len(studies.finished(study)) == 2
    seen.clear()
    status = studies.run_slots(_study(tmp_path), 5, objective, board=board, key="s", progress=False)
    assert seen == [2, 3, 4] and status["ran"] == [2, 3, 4]  # only the unfinished slots
    states = [t.state for t in _study(tmp_path).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 5
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the interrupted trial, closed on takeover
    # a larger budget runs only the new slots; the same budget runs nothing
    seen.clear()
    studies.run_slots(_study(tmp_path), 7, objective, board=board, key="s", progress=False)
    assert seen == [5, 6]
    seen.clear()
    studies.run_slots(_study(tmp_path), 7, objective, board=board, key="s", progress=False)
    assert seen == []


def test_a_failing_trial_is_kept_as_failed_and_retried_on_a_rerun(tmp_path):
    board = ClaimBoard(tmp_path / "claims")
    calls = []

    def objective(trial):
        calls.append(trial.user_attrs["slot"])
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return trial.suggest_float("x", 0, 1)

    status = studies.run_slots(_study(tmp_path), 3, objective, board=board, key="s", progress=False)
    assert status["failed"] == [1] and status["ran"] == [0, 2]
    status = studies.run_slots(_study(tmp_path), 3, objective, board=board, key="s", progress=False)
    assert status["ran"] == [1] and len(studies.finished(_study(tmp_path))) == 3


WORKER = textwrap.dedent("""
    import sys, time
    from spard import studies
    from spard.training.claims import ClaimBoard
    root, name, log, budget, pause = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    study = studies.open_study("s", studies.storage_for(None, __import__("pathlib").Path(root), "s"),
                               direction="maximize", seed=0, startup_trials=2)
    def objective(trial):
        with open(log, "a") as f:
            f.write(f"{name} {trial.user_attrs['slot']}\\n")
        time.sleep(pause)
        return trial.suggest_float("x", 0, 1)
    studies.run_slots(study, budget, objective, board=ClaimBoard(root + "/claims", worker=name, timeout_s=600),
                      key="s", progress=False, poll_s=0.2)
""")


def _worker(tmp_path, name, budget, pause):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "st"), name, str(tmp_path / "log"),
                             str(budget), str(pause)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_workers_on_one_study_run_no_trial_twice(tmp_path):
    (tmp_path / "st").mkdir()
    procs = [_worker(tmp_path, n, 8, 0.3) for n in ("a", "b")]
    for p in procs:
        out = p.communicate(timeout=120)[0].decode()
        assert p.returncode == 0, out
    lines = [ln.split() for ln in (tmp_path / "log").read_text().splitlines()]
    slots = [int(s) for _, s in lines]
    assert sorted(slots) == list(range(8))  # every slot once
    assert {w for w, _ in lines} == {"a", "b"}  # and both worked
    study = studies.open_study("s", studies.storage_for(None, tmp_path / "st", "s"), direction="maximize", seed=0,
                               startup_trials=2)
    assert len(study.trials) == 8 and len(studies.finished(study)) == 8
    # workers that start together draw different points (each slot its own seed)
    assert len({t.params["x"] for t in study.trials}) == 8


def test_a_killed_workers_trial_is_taken_over_at_once(tmp_path):
    (tmp_path / "st").mkdir()
    p = _worker(tmp_path, "a", 2, 300)  # stuck in slot 0
    for _ in range(600):
        if (tmp_path / "log").is_file() and (tmp_path / "log").read_text():
            break
        time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t = time.perf_counter()
    q = _worker(tmp_path, "b", 2, 0)  # its claims' timeout is 600 s: only the pid check frees slot 0
    out = q.communicate(timeout=120)[0].decode()
    assert q.returncode == 0, out
    assert time.perf_counter() - t < 60
    lines = (tmp_path / "log").read_text().split("\n")
    assert lines[:3] == ["a 0", "b 0", "b 1"]
    study = studies.open_study("s", studies.storage_for(None, tmp_path / "st", "s"), direction="maximize", seed=0,
                               startup_trials=2)
    assert [t.state.name for t in study.trials].count("FAIL") == 1 and len(studies.finished(study)) == 2


def test_storage_that_cannot_be_written_is_named(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="--study-storage: cannot create the folder"):
        studies.storage_for(None, f / "sub", "s")
    with pytest.raises(ValueError, match="--study-storage: expected a storage URL"):
        studies.storage_for("nowhere", tmp_path, "s")
    with pytest.raises(ValueError, match="--study-storage"):
        studies.storage_for(f"sqlite:///{f}/x.db", tmp_path, "s")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root writes anywhere
            with pytest.raises(ValueError, match="not writable"):
                studies.storage_for(None, ro, "s")
    finally:
        ro.chmod(0o700)
    assert str(studies.storage_for(None, tmp_path / "ok", "s")).startswith("sqlite:///")
    assert type(studies.storage_for(f"journal:{tmp_path}/j.log", tmp_path, "s")).__name__ == "JournalStorage"


# ------------------------------------------------------------------------------------- tuning
def _data(**kw):
    base = dict(model=None, tokenizer=None, task=[], task_test=[{"prompt": "test problem"}],
                eval_prompts=["test prompt"], safety_pool=[], attacks={"w": [{"prompt": "p", "unsafe": "u"}]},
                val_prompts=["val prompt"], task_val=[{"prompt": "val problem"}])
    return BenchData(**{**base, **kw})


def test_validation_split_is_disjoint_from_the_test_split(tmp_path, monkeypatch):
    from spard.world import WorldSettings
    monkeypatch.setenv("SPARD_CACHE", str(tmp_path / "cache"))
    world = WorldSettings(n_task_train=40, n_task_test=8, n_align_task=20, hidden_size=32, num_layers=1,
                          num_heads=2, intermediate_size=64, align_steps=5, align_batch_size=8, max_length=64)
    data = bench.world_data(world, n_task=40, n_eval=20, n_task_test=4, progress=False)
    val = data.validation()
    assert len(val.task_test) == 4 and val.eval_prompts and val.model is data.model
    assert not set(val.eval_prompts) & set(data.eval_prompts)
    assert not {r["prompt"] for r in val.task_test} & {r["prompt"] for r in data.task_test}
    with pytest.raises(ValueError, match="validation split: the bench has none"):
        bench.world_data(world, n_task=40, progress=False).validation()  # every held-out row is a test row
    leaky = _data(val_prompts=["Test  PROMPT"])
    with pytest.raises(ValueError, match="1 harmful prompt"):
        leaky.validation()
    rows = [{"prompt": str(i)} for i in range(10)]
    test, val_rows = bench.split_validation(rows, 0.3, 0, "rows")
    assert len(val_rows) == 3 and len(test) == 7 and not {r["prompt"] for r in test} & {r["prompt"] for r in val_rows}
    assert bench.split_validation(rows, 0.3, 0, "rows") == (test, val_rows)  # seeded
    with pytest.raises(ValueError, match="validation_share: expected a share in"):
        bench.split_validation(rows, 1.0, 0, "rows")


def test_tuning_picks_the_safest_setting_within_the_accuracy_limit_on_validation(tmp_path):
    calls = []

    def runner(cell, data, settings):
        share = settings.defense_settings.get(cell.defense, {}).get("share", 0.03)
        calls.append((cell.defense, data.eval_prompts[0], data.task_test[0]["prompt"], share))
        if cell.defense == "sft":
            return {"asr": 0.9, "accuracy": 0.40}
        # more safety rows: less ASR, less accuracy; the limit 0.35 caps share at 0.06
        return {"asr": 0.6 - 5 * share, "accuracy": 0.40 - (share - 0.01) * 1.0}

    settings = BenchSettings(defenses=["sft", "safeinstr"], ratios=[0.1])
    tuned = tuning.tune_defenses(_data(), settings, tmp_path, defenses=["sft", "safeinstr"], trials=8,
                                 max_acc_drop=0.05, startup_trials=4, cell_runner=runner, progress=False)
    assert {c[1] for c in calls} == {"val prompt"} and {c[2] for c in calls} == {"val problem"}  # never the test split
    assert calls[0][0] == "sft" and calls[1] == ("safeinstr", "val prompt", "val problem", 0.03)  # defaults first
    entry = json.loads((tmp_path / "tuned" / "safeinstr.json").read_text())
    ok = [r for r in entry["rows"] if r["feasible"]]
    assert all(r["accuracy"] >= 0.35 - 1e-12 for r in ok) and entry["trials"] == 8
    assert tuned["safeinstr"] == min(ok, key=lambda r: r["asr"])["settings"] and tuned["safeinstr"]["share"] <= 0.06 + 1e-9
    assert entry["default"]["asr"] == pytest.approx(0.6 - 5 * 0.03) and entry["validation"]["asr"] <= entry["default"]["asr"]
    assert tuned["sft"] == {} and tuning.load_tuned(tmp_path, ["sft", "safeinstr"]) == tuned
    assert "safeinstr | share=" in (tmp_path / "tuning.md").read_text()
    n = len(calls)
    assert tuning.tune_defenses(_data(), settings, tmp_path, defenses=["sft", "safeinstr"], trials=8,
                                cell_runner=runner, progress=False) == tuned and len(calls) == n  # resumed: nothing new
    tuning.apply_tuned(settings, tuned)
    assert settings.defense_settings["safeinstr"] == tuned["safeinstr"]
    with pytest.raises(ValueError, match="validation split: the bench has none"):
        tuning.tune_defenses(_data(val_prompts=[]), settings, tmp_path / "x", defenses=["safeinstr"], trials=2,
                             cell_runner=runner, progress=False)
    with pytest.raises(ValueError, match="--tune-defenses: expected a number of trials >= 1"):
        tuning.tune_defenses(_data(), settings, tmp_path / "x", defenses=["safeinstr"], trials=0, cell_runner=runner)


def test_the_objective_can_be_either_judge():
    result = {"asr": 0.1, "evaluation": {"safety": {"judge": {"name": "refusal"}}},
              "judges": {"asr": {"refusal": {"asr": 0.1}, "moderation": {"asr": 0.7}}}}
    assert tuning.judge_asr(result, None) == 0.1 and tuning.judge_asr(result, "moderation") == 0.7
    with pytest.raises(ValueError, match="--objective-judge: no judge named 'guard'"):
        tuning.judge_asr(result, "guard")


# ------------------------------------------------------------------------------------ layouts
def test_prompt_layouts_change_the_training_text_only():
    from spard.formatting import encode_row
    from spard.world import WorldSettings, build_tokenizer, make_data
    tok = build_tokenizer()
    pool = make_data(WorldSettings())["safety_pool"]
    row = {"prompt": pool[0]["prompt"], "response": pool[0]["safe"]}
    chat = encode_row(tok, row, 64)
    plain = encode_row(tok, {**row, "layout": "plain"}, 64)
    none = encode_row(tok, {**row, "layout": "none"}, 64)
    assert chat.input_ids != none.input_ids and plain.input_ids != none.input_ids
    for ex in (chat, plain, none):  # the loss covers the response (and EOS), never the prompt
        text = tok.decode([t for t in ex.labels if t != -100], skip_special_tokens=True).split()
        assert text[-4:] == row["response"].split()[-4:] and "smuggle" not in text and len(text) >= 6
    assert encode_row(tok, {**row, "layout": "chat"}, 64).input_ids == chat.input_ids
    with pytest.raises(ValueError, match="layout must be one of chat, plain, none"):
        encode_row(tok, {**row, "layout": "xml"}, 64)
    with pytest.raises(ValueError, match="prompt_layout: expected one of"):
        BenchSettings(prompt_layout="xml").validate()


# --------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("argv, match", [
    (["--adaptive", "0"], "--adaptive: expected a number of trials >= 1"),
    (["--tune-defenses", "0"], "--tune-defenses: expected a number of trials >= 1"),
    (["--adaptive", "--bounded-keep", "0"], r"--bounded-keep: expected a percentage x in \(0, 100\]"),
    (["--adaptive", "--bounded-keep", "150"], "--bounded-keep"),
    (["--adaptive", "--confirm-seeds", "0"], "--confirm-seeds"),
    (["--adaptive", "--search-lr", "0.1,0.01"], "--search-lr: expected a range 0 < low <= high"),
    (["--adaptive", "--search-ranks", ""], "--search-ranks"),
    (["--adaptive", "--search-layouts", "xml"], "--search-layouts: expected names from chat, plain, none"),
    (["--adaptive", "--search-ratios", "nan"], "--search-ratios"),
    (["--adaptive", "--objective-judge", "guard"], "--objective-judge: expected one of the bench's judges"),
    (["--judges", "refusal,guard"], "the world cannot build a guard judge"),
])
def test_bad_verdict_options_get_one_line_before_any_work(tmp_path, capsys, argv, match):
    from spard.cli import main
    assert main(["bench", "--world", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and pytest.importorskip("re").search(match, err), err
    assert not (tmp_path / "o" / "cells").exists()


def test_a_storage_folder_that_is_a_file_is_named_before_any_work(tmp_path, capsys):
    from spard.cli import main
    (tmp_path / "f").write_text("x")
    assert main(["bench", "--world", "--out", str(tmp_path / "o"), "--adaptive", "3", "--study-storage",
                 f"sqlite:///{tmp_path}/f/studies.db"]) == 2
    assert "--study-storage" in capsys.readouterr().err


def test_search_options_without_adaptive_warn_that_they_have_no_effect(tmp_path, capsys):
    from spard.cli import build_parser
    from spard.commands.bench import check_search
    args = build_parser(["bench"]).parse_args(["bench", "--world", "--out", str(tmp_path / "o"), "--search-ratios",
                                               "0.1", "--search-ranks", "8", "--attack-split", "validation"])
    assert check_search(args, BenchSettings()) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: --search-ratios, --search-ranks, --attack-split: the attacker's search " \
        "options have no effect without --adaptive" in err


def test_tuning_after_the_defense_settings_changed_runs_a_study_of_its_own(tmp_path):
    calls = []

    def runner(cell, data, settings):
        calls.append(cell.defense)
        return {"asr": 0.5, "accuracy": 0.4}

    settings = BenchSettings(defenses=["sft", "safeinstr"], ratios=[0.1])
    tune = lambda: tuning.tune_defenses(_data(), settings, tmp_path, defenses=["safeinstr"], trials=3,
                                        startup_trials=3, cell_runner=runner, progress=False)
    tune()
    calls.clear()
    tune()
    assert calls == []  # resumed
    settings.defense_settings = {"safeinstr": {"share": 0.05}}  # another start: the old trials are stale
    tune()
    assert calls == ["safeinstr"] * 3  # SFT's validation reference does not depend on it
