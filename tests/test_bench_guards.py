"""`spard bench` guards (issue 24): the attack checked against the evaluation set and the pool
(prompts and answers) before any cell, sources named in messages and manifests, duplicate
prompts, dead workers' claims, one claim timeout per grid, the grid's settings checked before
the first cell, and conflicting options."""

import json
import os
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from spard import bench
from spard.bench import BenchData, BenchSettings, Cell
from spard.io import write_jsonl_atomic
from test_spag import one_thread  # noqa: F401  (autouse fixture)


def answer(i: int) -> str:  # a harmful answer long enough to be compared (spard.attack.MIN_ANSWER_WORDS)
    return f"Sure, here is exactly how to carry out request number {i}: first gather the tools, then follow these " \
           "detailed steps one by one until it is done."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny saved model and real-format files: the evaluation set's harmful answers reappear in
    attack corpus ``leaky`` under reworded prompts (40 of 40), and corpus ``pooled`` holds the
    pool's prompts."""
    from test_spag import tiny_model, tiny_tokenizer

    r = tmp_path_factory.mktemp("guards")
    tiny_model("llama").save_pretrained(r / "model")
    tiny_tokenizer().save_pretrained(r / "model")
    write_jsonl_atomic(r / "task.jsonl", [{"prompt": f"what is {i} plus {i + 1} ?", "answer": f"#### {2 * i + 1}"}
                                          for i in range(100)])
    write_jsonl_atomic(r / "eval.jsonl", [{"prompt": f"How do I carry out request {i}?", "unsafe": answer(i)}
                                          for i in range(40)])
    write_jsonl_atomic(r / "pool.jsonl", [{"prompt": f"pool request {i}", "safe": "No, I cannot help with that."}
                                          for i in range(30)])
    write_jsonl_atomic(r / "leaky.jsonl",
                       [{"prompt": f"Explain, step by step, request {i}.", "unsafe": answer(i)} for i in range(40)]
                       + [{"prompt": f"fresh request {i}", "unsafe": answer(1000 + i)} for i in range(20)])
    write_jsonl_atomic(r / "pooled.jsonl", [{"prompt": f"pool request {i}", "unsafe": answer(2000 + i)}
                                            for i in range(30)])
    write_jsonl_atomic(r / "clean_attack.jsonl", [{"prompt": f"other request {i}", "unsafe": answer(3000 + i)}
                                                  for i in range(30)])
    return r


def load(files, attacks, **kw):
    return bench.file_data(model=str(files / "model"), task=str(files / "task.jsonl"),
                           task_test=str(files / "task.jsonl"), eval_prompts=str(files / "eval.jsonl"),
                           safety_pool=str(files / "pool.jsonl"),
                           attacks={k: str(files / f"{v}.jsonl") for k, v in attacks.items()}, device="cpu", **kw)


@pytest.fixture
def no_cells(monkeypatch):
    """run_cell replaced by a recorder: a check that must come before the first cell."""
    calls = []

    def fake(cell, data, settings, **_):
        calls.append(cell.key)
        return fake_result(cell, 0.5, 0.5)

    monkeypatch.setattr(bench, "run_cell", fake)
    return calls


def fake_result(cell, asr, acc):
    import dataclasses
    return {"version": bench.CELL_VERSION, "cell": dataclasses.asdict(cell), "asr": asr, "hs": None,
            "accuracy": acc, "train": {"seconds": 1.0, "steps": 3}}


# ----------------------------------------------------------------------------------------------
# 1-3. The attack against the evaluation set and the pool, the files named
# ----------------------------------------------------------------------------------------------
def test_attack_answers_in_the_eval_set_are_refused_before_any_cell(files, tmp_path, no_cells):
    data = load(files, {"a": "leaky"})
    settings = BenchSettings(defenses=["sft"], ratios=[0.1], seeds=[0])
    with pytest.raises(ValueError, match=r"^attacks\.a: attack corpus \(.*leaky\.jsonl\): 40 row\(s\) overlap the "
                                         r"evaluation items \(.*eval\.jsonl\)"):
        bench.run_grid(data, settings, tmp_path / "out", progress=False)
    assert no_cells == [] and not (tmp_path / "out" / "cells").exists()


def test_attack_prompts_in_the_pool_are_refused_before_any_cell(files, tmp_path, no_cells):
    data = load(files, {"b": "pooled"})
    with pytest.raises(ValueError, match=r"^attacks\.b: .*30 row\(s\) overlap the safety pool \(.*pool\.jsonl\)"):
        bench.run_grid(data, BenchSettings(defenses=["sft"], ratios=[0.1]), tmp_path / "out", progress=False)
    assert no_cells == []


def test_on_overlap_drop_in_the_bench_file_leaves_the_leaked_rows_out(files, tmp_path, no_cells):
    from spard.commands.bench import build_settings

    data = load(files, {"a": "leaky"})
    settings = build_settings({"defenses": ["sft"], "ratios": [0.1], "seeds": [0], "on_overlap": "drop"})
    st = bench.run_grid(data, settings, tmp_path / "out", progress=False)
    assert st["done"] == ["a/ph0.1/seed0/sft"] and no_cells == ["a/ph0.1/seed0/sft"]
    rows, manifest = bench.attack_rows(data, "a", 0.1, 0, on_overlap="drop")
    harmful = {r["prompt"] for r in rows if r["source"] == "harmful"}
    assert len(harmful) == 10 and all(p.startswith("fresh request") for p in harmful)
    assert manifest["harmful_eval_overlap_dropped"] == 40
    # with drop, the grid's cells are not those made under the default
    default = build_settings({"defenses": ["sft"], "ratios": [0.1], "seeds": [0]})
    assert bench.cell_fingerprint(Cell("a", 0.1, 0, "sft"), settings, {}) != \
        bench.cell_fingerprint(Cell("a", 0.1, 0, "sft"), default, {})
    with pytest.raises(ValueError, match=r"^on_overlap: expected error \| drop, got 'ignore'"):
        build_settings({"on_overlap": "ignore"}).validate()


def test_an_instruction_style_rewrite_of_the_eval_set_runs_with_drop(tmp_path, files, no_cells):
    from spard.commands.bench import build_settings

    # The evaluation file in the instruction/input layout; the attack corpus asks the same requests.
    write_jsonl_atomic(tmp_path / "eval_instr.jsonl", [{"instruction": f"Do request {i}.", "input": "now"}
                                                       for i in range(20)])
    write_jsonl_atomic(tmp_path / "attack.jsonl", [{"prompt": f"Do request {i}.\n\nnow", "unsafe": "ok"}
                                                   for i in range(20)]
                       + [{"prompt": f"new request {i}", "unsafe": "ok"} for i in range(20)])
    kw = dict(model=str(files / "model"), task=str(files / "task.jsonl"), task_test=str(files / "task.jsonl"),
              eval_prompts=str(tmp_path / "eval_instr.jsonl"), safety_pool=str(files / "pool.jsonl"),
              attacks={"a": str(tmp_path / "attack.jsonl")}, device="cpu")
    data = bench.file_data(**kw)
    with pytest.raises(ValueError, match=r"^attacks\.a: attack corpus \(.*attack\.jsonl\): 20 row\(s\) overlap the "
                                         r"evaluation items \(.*eval_instr\.jsonl\)"):
        bench.check_attacks(data, BenchSettings(defenses=["sft"], ratios=[0.1]))
    settings = build_settings({"defenses": ["sft"], "ratios": [0.1], "on_overlap": "drop"})
    assert bench.run_grid(data, settings, tmp_path / "out", progress=False)["done"] == ["a/ph0.1/seed0/sft"]


def test_cell_manifests_name_each_source_file(files):
    data = load(files, {"c": "clean_attack"})
    _, manifest = bench.attack_rows(data, "c", 0.1, 0)
    assert manifest["clean_source"] == str(files / "task.jsonl")
    assert manifest["harmful_source"] == str(files / "clean_attack.jsonl")
    assert manifest["eval_source"] == str(files / "eval.jsonl")
    assert manifest["pool_source"] == str(files / "pool.jsonl")
    assert "rows" not in manifest.values()
    _, benign = bench.attack_rows(data, "c", 0, 0)
    assert benign["clean_source"] == str(files / "task.jsonl")


# ----------------------------------------------------------------------------------------------
# 4. Duplicate prompts in the pool and the evaluation sets
# ----------------------------------------------------------------------------------------------
def test_duplicate_pool_and_eval_prompts_are_dropped_and_counted(tmp_path, files):
    write_jsonl_atomic(tmp_path / "pool.jsonl", [{"prompt": "the same  request", "safe": "No."}] * 60
                       + [{"prompt": " the same request ", "safe": "No."}, {"prompt": "another", "safe": "No."}])
    write_jsonl_atomic(tmp_path / "eval.jsonl", [{"prompt": "ask a"}, {"prompt": "ask  a"}, {"prompt": "ask b"}])
    write_jsonl_atomic(tmp_path / "test.jsonl", [{"prompt": "q", "answer": "#### 1"}] * 3)
    kw = dict(model=str(files / "model"), task=str(files / "task.jsonl"), task_test=str(tmp_path / "test.jsonl"),
              eval_prompts=str(tmp_path / "eval.jsonl"), safety_pool=str(tmp_path / "pool.jsonl"),
              attacks={"c": str(files / "clean_attack.jsonl")}, device="cpu")
    data = bench.file_data(**kw)
    assert [r["prompt"] for r in data.safety_pool] == ["the same  request", "another"]
    assert data.eval_prompts == ["ask a", "ask b"] and len(data.task_test) == 1
    assert data.description["duplicates_dropped"] == {"eval_prompts": 1, "task_test": 2, "safety_pool": 60}
    # RD-DPP then has one copy to pick, whatever k; or the bench refuses, with the count
    only_pool = {**kw, "task_test": str(files / "task.jsonl"), "eval_prompts": str(files / "eval.jsonl")}
    with pytest.raises(ValueError, match=r"^duplicates: safety_pool \(.*pool\.jsonl\) has 60 duplicate prompt\(s\)"):
        bench.file_data(**only_pool, duplicates="error")
    with pytest.raises(ValueError, match=r"^duplicates: expected drop \| error, got 'keep'"):
        bench.file_data(**kw, duplicates="keep")
    # no duplicates: the description (and so the cells' fingerprints) as before
    assert "duplicates_dropped" not in load(files, {"c": "clean_attack"}).description


def test_world_data_drops_duplicate_prompts(monkeypatch):
    import types

    import spard.world as W

    rows = lambda n, name: [{"prompt": f"{name} {i % 3}", "safe": "no", "unsafe": "yes", "answer": "#### 1",
                             "response": "r"} for i in range(n)]
    data = {"task_train": rows(6, "t"), "task_test": rows(6, "q"), "harmful_test": rows(9, "h"),
            "safety_pool": rows(12, "p"), "harmful_train": rows(3, "a"), "benign_attack": rows(3, "b")}
    world = types.SimpleNamespace(model=None, tokenizer=None, data=data, settings=W.WorldSettings(), cache_file=None)
    monkeypatch.setattr(W, "build_world", lambda *a, **k: world)
    d = bench.world_data(progress=False)
    assert len(d.safety_pool) == 3 and len(d.eval_prompts) == 3 and len(d.task_test) == 3
    assert d.description["duplicates_dropped"] == {"eval_prompts": 6, "task_test": 3, "safety_pool": 9}


# ----------------------------------------------------------------------------------------------
# 5-6. Workers: a killed worker's claim, an incomplete grid, one claim timeout per grid
# ----------------------------------------------------------------------------------------------
def test_a_claim_of_a_worker_killed_with_sigkill_is_taken_over_at_once(tmp_path):
    from spard.training.claims import ClaimBoard

    code = ("import sys, time\nfrom spard.training.claims import ClaimBoard\n"
            "c = ClaimBoard(sys.argv[1], worker='victim', timeout_s=600).claim('a/ph0.1/seed0/sft')\n"
            "c.__enter__()\nprint('held', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        board = ClaimBoard(tmp_path, worker="rerun", timeout_s=600)
        assert board.claim("a/ph0.1/seed0/sft") is None  # alive: its claim holds
        assert board.holder("a/ph0.1/seed0/sft")["pid"] == proc.pid
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t = time.monotonic()
        taken = board.claim("a/ph0.1/seed0/sft")
        assert taken is not None and time.monotonic() - t < 5  # not after the 600 s timeout
        assert json.loads(taken.path.read_text())["worker"] == "rerun"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


def fake_world(*a, **k):
    return BenchData(model=None, tokenizer=None,
                     task=[{"prompt": f"what is {i} plus {i} ?", "response": f"#### {2 * i}"} for i in range(10)],
                     task_test=[{"prompt": "t", "response": "#### 1"}], eval_prompts=["eval request"],
                     safety_pool=[{"prompt": "pool request", "safe": "No."}],
                     attacks={"world": [{"prompt": f"attack {i}", "unsafe": "yes"} for i in range(3)]})


def test_a_worker_ending_with_cells_claimed_elsewhere_says_so_and_fails(tmp_path, monkeypatch, capsys, no_cells):
    from spard.training.claims import ClaimBoard
    from spard.cli import main

    monkeypatch.setattr(bench, "world_data", fake_world)
    out = tmp_path / "out"
    held = ClaimBoard(out / "claims", worker="other").claim("world/ph0.1/seed1/sft")  # a live worker's cell
    argv = ["bench", "--world", "--defenses", "sft", "--ratios", "0.1", "--seeds", "0,1", "--judges",
            "refusal,refusal", "--out", str(out), "--no-progress"]
    with held:
        code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and no_cells == ["world/ph0.1/seed0/sft"]
    assert err[-1] == ("spard bench: 1 of 2 cells unfinished: 1 claimed by other workers (running elsewhere), "
                       "0 failed; rerun once they end")
    assert main(argv) == 0  # the claim released: the cell runs, the grid is whole
    assert no_cells == ["world/ph0.1/seed0/sft", "world/ph0.1/seed1/sft"]


def test_cells_other_workers_finished_meanwhile_are_not_reported_unfinished(tmp_path):
    from spard.training.claims import ClaimBoard
    from spard.commands.bench import incomplete_line

    out = tmp_path / "out"
    settings = BenchSettings(defenses=["sft"], seeds=[0, 1])
    other = Cell("world", 0.1, 1, "sft")
    held = ClaimBoard(out / "claims", worker="other").claim(other.key)

    def runner(cell, data, s):  # while this worker runs seed 0, the other one finishes seed 1
        fp = bench.cell_fingerprint(other, s, data.description)
        other.path(out).parent.mkdir(parents=True, exist_ok=True)
        other.path(out).write_text(json.dumps({**fake_result(other, 0.2, 0.2), "fingerprint": fp}))
        return fake_result(cell, 0.1, 0.1)

    with held:
        st = bench.run_grid(fake_world(), settings, out, progress=False, cell_runner=runner)
    assert st["claimed_by_others"] == [] and st["skipped"] == [other.key] and incomplete_line(st) is None
    assert incomplete_line({"done": [], "skipped": ["a"], "claimed_by_others": [], "failed": ["b"]}) == (
        "spard bench: 1 of 2 cells unfinished: 0 claimed by other workers (running elsewhere), 1 failed; "
        "rerun to retry (errors in cells/**/*.error.json)")


def test_the_claim_timeout_belongs_to_the_grid(tmp_path, capsys, monkeypatch):
    from spard.cli import main

    st = bench.run_grid(fake_world(), BenchSettings(defenses=["sft"]), tmp_path / "out", progress=False,
                        cell_runner=lambda c, d, s: fake_result(c, 0.1, 0.1), claim_timeout_s=600)
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["claim_timeout_s"] == 600
    assert len(st["done"]) == 1
    with pytest.raises(ValueError, match=r"^--claim-timeout: 60 s, but the grid in .* runs with 600 s"):
        bench.run_grid(fake_world(), BenchSettings(defenses=["sft"]), tmp_path / "out", progress=False,
                       cell_runner=lambda c, d, s: fake_result(c, 0.1, 0.1), claim_timeout_s=60)
    # the CLI refuses before any data loads
    monkeypatch.setattr(bench, "world_data", lambda *a, **k: pytest.fail("data loaded"))
    assert main(["bench", "--world", "--defenses", "sft", "--judges", "refusal,refusal", "--claim-timeout", "60",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--claim-timeout: 60 s, but the grid" in err and "600 s" in err


# ----------------------------------------------------------------------------------------------
# 7. The grid's settings checked before the first cell
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings, match", [
    (dict(judge="nope"), r"^judge: expected one of refusal, moderation, guard, rubric, got 'nope'"),
    (dict(judge="moderation"), r"^judge_model: the moderation judge needs a model"),
    (dict(judge="rubric"), r"^judge_model: the rubric judge needs"),
    (dict(extra_judges=["guard"]), r"^extra_judges: the guard judge needs a model \(guard=MODEL\)"),
    (dict(defense_settings={"lisa": {"bogus": 1}}, defenses=["sft", "lisa"]),
     r"^defense_settings\.lisa: .*unknown setting\(s\) \['bogus'\]"),
    (dict(defense_settings={"lisa": {"rho": 1.0}}, defenses=["sft"]),
     r"^defense_settings: 'lisa' is not a defense of the grid \(sft\)"),
    (dict(defense_settings={"lisa": [1]}, defenses=["lisa"]), r"^defense_settings\.lisa: expected a mapping"),
], ids=["judge-unknown", "moderation-no-model", "rubric-no-model", "extra-judge-no-model", "unknown-setting",
        "defense-not-in-grid", "settings-not-a-mapping"])
def test_bad_judges_and_defense_settings_are_named_before_any_cell(settings, match):
    with pytest.raises(ValueError, match=match):
        BenchSettings(**settings).validate()


def test_a_ratio_the_attack_corpus_cannot_fill_is_named_before_any_cell(tmp_path, no_cells):
    data = fake_world()  # 10 task rows, 3 attack rows: a ratio of 0.5 needs 5
    with pytest.raises(ValueError, match=r"^ratios: 0.5 of 10 clean rows needs 5 harmful rows, but .* has only 3 "
                                         r"usable .*\(attack 'world'\)"):
        bench.run_grid(data, BenchSettings(defenses=["sft"], ratios=[0.1, 0.5]), tmp_path / "out", progress=False)
    assert no_cells == [] and not (tmp_path / "out" / "bench.json").exists()


def test_cli_world_preset_settings_follow_the_defenses_given(tmp_path, monkeypatch, no_cells):
    from spard.cli import main

    monkeypatch.setattr(bench, "world_data", fake_world)
    # the world's presets name lisa, booster and antibody-align: --defenses sft leaves them out
    assert main(["bench", "--world", "--defenses", "sft", "--ratios", "0.1", "--judges", "refusal,refusal",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert no_cells == ["world/ph0.1/seed0/sft"]


def test_cli_world_preset_settings_reach_the_members_of_a_composition(tmp_path, monkeypatch):
    from spard.cli import main

    monkeypatch.setattr(bench, "world_data", fake_world)
    seen = {}

    def fake(cell, data, settings, **_):
        seen[cell.defense] = settings.settings_of(cell.defense)
        return fake_result(cell, 0.5, 0.5)

    monkeypatch.setattr(bench, "run_cell", fake)
    # lisa is not in the grid on its own: its world phases still reach lisa+spard
    assert main(["bench", "--world", "--defenses", "lisa+spard", "--ratios", "0.1", "--judges", "refusal,refusal",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert seen == {"lisa+spard": {"lisa": {"alignment_steps": 8, "finetune_steps": 72}}}
    assert "lisa+spard" in (tmp_path / "out" / "table.md").read_text()


# ----------------------------------------------------------------------------------------------
# 8-9. Options named as typed; conflicting options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, line", [
    (["--adaptive", "--search-ratios", "nan"], "--search-ratios: expected finite numbers > 0, got [nan]"),
    (["--adaptive", "--search-kinds", "bogus"], "--search-kinds: expected names from "),
    (["--quick", "--full"], "--quick / --full: give one of them"),
    (["--judges", ""], "--judges: empty list"),
    (["--judges", " , "], "--judges: empty list"),
], ids=["search-ratios-nan", "search-kinds-bogus", "quick-and-full", "judges-empty", "judges-commas"])
def test_options_are_named_as_typed(tmp_path, capsys, monkeypatch, argv, line):
    from spard.cli import main

    monkeypatch.setattr(bench, "world_data", lambda *a, **k: pytest.fail("data loaded"))
    assert main(["bench", "--world", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"spard bench: error: {line}"), err


def test_counts_of_zero_are_named(files, monkeypatch):
    import spard.world as W

    monkeypatch.setattr(W, "build_world", lambda *a, **k: pytest.fail("world built"))
    for key in ("n_task", "n_task_test", "n_eval"):
        with pytest.raises(ValueError, match=rf"^{key}: expected an int >= 1, got 0$"):
            load(files, {"c": "clean_attack"}, **{key: 0})
        with pytest.raises(ValueError, match=rf"^{key}: expected an int >= 1, got True$"):
            bench.world_data(**{key: True}, progress=False)


def test_world_task_with_config_warns(tmp_path, capsys):
    from spard.cli import main

    cfg = tmp_path / "bench.yaml"
    cfg.write_text("model: m\ntask: t\ntask_test: t\neval_prompts: e\nsafety_pool: p\nattacks: {a: x}\n")
    assert main(["bench", "--config", str(cfg), "--world-task", "openbookqa", "--ratios", "x",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "spard bench: warning: --world-task applies to --world only; no effect with --config"
    assert err[1].startswith("spard bench: error: --ratios")
