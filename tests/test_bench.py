"""The grid runner: cells, resume and retry, summary tables and plots, and a tiny grid end to
end on the synthetic world."""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from spard import bench
from spard.bench import BenchData, BenchSettings, Cell
from test_spag import one_thread  # noqa: F401  (autouse fixture)


def fake_data():
    return BenchData(model=None, tokenizer=None, task=[], task_test=[], eval_prompts=[], safety_pool=[],
                     attacks={"a1": [{"prompt": "p", "unsafe": "u"}], "a2": [{"prompt": "q", "unsafe": "v"}]})


def fake_result(cell, asr, acc):
    return {"version": bench.CELL_VERSION, "cell": dataclasses.asdict(cell), "asr": asr, "hs": None, "accuracy": acc, "train": {"seconds": 1.0, "steps": 3}}


def test_grid_is_seed_major_and_keys_are_paths(tmp_path):
    s = BenchSettings(defenses=["sft", "spard"], ratios=[0.05, 0.1], seeds=[0, 1])
    cells = bench.grid(s, ["a1"])
    assert len(cells) == 8 and [c.seed for c in cells[:4]] == [0] * 4
    assert cells[0].path(tmp_path) == tmp_path / "cells" / "a1" / "ph0.05" / "seed0" / "sft.json"
    with pytest.raises(ValueError, match="unknown"):
        BenchSettings(defenses=["sft", "nope"]).validate()
    with pytest.raises(ValueError, match="ratios"):
        BenchSettings(ratios=[-0.1]).validate()


def test_resume_skips_finished_cells_and_retries_failed_ones(tmp_path):
    s = BenchSettings(defenses=["sft", "spard"], ratios=[0.1], seeds=[0])
    calls, failed_once = [], set()

    def flaky(cell, data, settings):  # spard cells fail on their first try
        calls.append(cell.key)
        if cell.defense == "spard" and cell.key not in failed_once:
            failed_once.add(cell.key)
            raise RuntimeError("boom")
        return fake_result(cell, 0.5, 0.2)

    st = bench.run_grid(fake_data(), s, tmp_path, progress=False, cell_runner=flaky)
    assert len(st["done"]) == 2 and len(st["failed"]) == 2
    failed = Cell("a1", 0.1, 0, "spard")
    assert "boom" in json.loads(failed.error_path(tmp_path).read_text())["error"]
    assert not failed.path(tmp_path).exists()
    # a damaged result counts as unfinished
    Cell("a1", 0.1, 0, "sft").path(tmp_path).write_text("{not json")
    calls.clear()
    st = bench.run_grid(fake_data(), s, tmp_path, progress=False, cell_runner=flaky)
    assert sorted(calls) == ["a1/ph0.1/seed0/sft", "a1/ph0.1/seed0/spard", "a2/ph0.1/seed0/spard"]
    assert st["failed"] == [] and len(st["skipped"]) == 1
    assert not failed.error_path(tmp_path).exists() and failed.path(tmp_path).exists()
    calls.clear()
    st = bench.run_grid(fake_data(), s, tmp_path, progress=False, cell_runner=flaky)
    assert calls == [] and len(st["skipped"]) == 4
    # results made under other settings are stale; another defense's settings leave sft's alone
    s.defense_settings = {"spard": {"p": 0.05}}
    st = bench.run_grid(fake_data(), s, tmp_path, progress=False, cell_runner=flaky)
    assert sorted(st["done"]) == ["a1/ph0.1/seed0/spard", "a2/ph0.1/seed0/spard"]
    s.optim.lr = 1e-3
    assert len(bench.run_grid(fake_data(), s, tmp_path, progress=False, cell_runner=flaky)["done"]) == 4


def test_summary_means_table_csv_and_plots(tmp_path):
    values = {("sft", 0): (0.8, 0.30), ("sft", 1): (0.6, 0.34), ("spard", 0): (0.1, 0.31), ("spard", 1): (0.0, 0.33)}
    for (d, seed), (asr, acc) in values.items():
        for attack, shift in (("a1", 0.0), ("a2", 0.1)):
            c = Cell(attack, 0.1, seed, d)
            c.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
            c.path(tmp_path).write_text(json.dumps(fake_result(c, asr + shift, acc)))
    s = bench.summarize(tmp_path)
    assert s["defenses"] == ["sft", "spard"] and s["attacks"] == ["a1", "a2"]
    g = next(g for g in s["groups"] if g["defense"] == "sft" and g["attack"] == "a1")
    assert g["asr"]["mean"] == pytest.approx(0.7) and g["asr"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert s["overall"]["spard"]["asr"]["mean"] == pytest.approx(0.1)
    assert s["target"]["method_has_lowest_asr"] and s["target"]["accuracy_gap"] == pytest.approx(0.0)
    table = (tmp_path / "table.md").read_text()
    # mean [95% t-interval over seeds], clipped to 0..100 for display
    assert "| sft | 70.0 [0.0, 100.0] | - | 32.0 [6.6, 57.4] | 80.0 [0.0, 100.0] | - | 32.0 [6.6, 57.4] | 75.0 | 32.0 |" in table
    assert g["asr"]["high"] - g["asr"]["mean"] == pytest.approx(12.7062 * 0.141421 / 2 ** 0.5, rel=1e-4)
    # overall: the interval over the seeds' means (seed 0: 0.15, seed 1: 0.05 for spard)
    assert s["overall"]["spard"]["asr"]["n"] == 2 and s["overall"]["spard"]["asr"]["std"] == pytest.approx(0.0707, abs=1e-3)
    # paired comparisons over the 4 (attack, ratio, seed) cells: spard - sft: -0.7 or -0.6 per cell
    comp = {(c["defense"], c["reference"], c["metric"]): c for c in s["comparisons"]}
    asr = comp[("spard", "sft", "asr")]
    assert asr["n"] == 4 and asr["diff"] == pytest.approx(-0.65) and asr["significant"] and asr["high"] < 0
    assert not comp[("spard", "sft", "accuracy")]["significant"]  # +0.01 and -0.01 per seed
    assert "| spard | sft | asr | -65.0 | [-70.0, -60.0] | 4 | * |" in table
    assert json.loads((tmp_path / "summary.json").read_text())["comparisons"] == s["comparisons"]
    assert "Target (spard: lowest mean ASR, below sft's, accuracy within 3 points of sft): met." in table
    rows = (tmp_path / "cells.csv").read_text().splitlines()
    assert rows[0].startswith("attack,ratio,seed,defense,asr") and len(rows) == 9
    for png in ("asr_vs_ratio.png", "asr_vs_accuracy.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def tiny_world_data(tmp_path, monkeypatch):
    """A tiny synthetic world (aligned on the fly, cached under tmp_path) as bench data."""
    from spard.world import WorldSettings

    monkeypatch.setenv("SPARD_CACHE", str(tmp_path / "cache"))
    world = WorldSettings(n_task_train=40, n_task_test=8, n_align_task=20, hidden_size=32, num_layers=1,
                          num_heads=2, intermediate_size=64, align_steps=15, align_batch_size=8, max_length=64)
    return bench.world_data(world, n_task=40, n_eval=8, n_task_test=8, progress=False)


def test_tiny_grid_end_to_end_on_the_world(tmp_path, monkeypatch, capsys):
    from spard.commands.bench import build_settings

    data = tiny_world_data(tmp_path, monkeypatch)
    capsys.readouterr()
    settings = build_settings({
        "defenses": ["sft", "spard-random"], "ratios": [0.1], "seeds": [0],
        "optim": {"lr": 5e-3, "warmup_steps": 0, "batch_size": 8, "epochs": 1.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_length": 64, "max_new_tokens": 8,
        "task_max_new_tokens": 8, "eval_batch_size": 8, "extra_judges": ["refusal"]})
    st = bench.run_grid(data, settings, tmp_path / "out", progress=False)
    assert st["failed"] == [] and len(st["done"]) == 2
    assert capsys.readouterr().err == ""  # no bar of the cells' generation or judges (the grid has its own)
    cell = json.loads(Cell("world", 0.1, 0, "spard-random").path(tmp_path / "out").read_text())
    assert cell["attack_manifest"]["n_harmful"] == 4 and cell["train"]["steps"] == 6  # 44 rows / 8
    assert 0 <= cell["accuracy"] <= 1
    # This tiny world model (15 alignment steps, 8 new tokens) answers nothing: that is flagged,
    # never scored as ASR 0%.
    assert cell["degenerate"] == cell["n_eval"] == 8 and cell["asr"] is None
    assert cell["train"]["summary"]["spag"]["steps"] == 6
    # the extra judge scored the same answers (all empty here: no ASR, no kappa)
    assert list(cell["judges"]["asr"]) == ["refusal", "refusal'"] and cell["judges"]["pairs"][0]["kappa"] is None
    summary = bench.summarize(tmp_path / "out")
    assert summary["overall"]["sft"]["cells"] == 1
    assert summary["overall"]["sft"]["degenerate"] == 8 and summary["overall"]["sft"]["asr"]["mean"] is None
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| sft | - † |" in table and "† empty or degenerate answers" in table and "sft 8 of 8" in table
    assert bench.run_grid(data, settings, tmp_path / "out", progress=False)["skipped"] != []


def test_target_is_not_met_on_a_tie_with_sft_and_degenerate_cells_are_marked(tmp_path):
    for d, asr in (("sft", 1.0), ("spard", 1.0), ("lisa", 1.0)):
        c = Cell("a1", 0.1, 0, d)
        c.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        result = fake_result(c, asr, 0.3)
        if d == "lisa":
            result.update(degenerate=3, n_eval=10)
        c.path(tmp_path).write_text(json.dumps(result))
    s = bench.summarize(tmp_path)
    assert s["target"]["method_has_lowest_asr"] and not s["target"]["method_below_reference_asr"]
    assert s["target"]["met"] is False
    table = (tmp_path / "table.md").read_text()
    assert "NOT met (spard's ASR is not below sft's)" in table and ": met" not in table
    assert "| lisa | 100.0 † |" in table and "lisa 3 of 10" in table


def test_cli_checks_settings_first_and_summarizes(tmp_path, capsys):
    from spard.cli import main

    assert main(["bench", "--world", "--defenses", "sft,nope", "--out", str(tmp_path)]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()  # nothing loaded or written
    c = Cell("w", 0.1, 0, "sft")
    c.path(tmp_path).parent.mkdir(parents=True)
    c.path(tmp_path).write_text(json.dumps(fake_result(c, 0.25, 0.5)))
    assert main(["bench", "--summarize-only", "--out", str(tmp_path)]) == 0
    assert "| sft | 25.0 | - | 50.0 | 25.0 | 50.0 |" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Several workers on one output folder
# ----------------------------------------------------------------------------------------------
def test_shards_split_the_grid_without_overlap():
    s = BenchSettings(defenses=["sft", "spard", "lisa"], ratios=[0.05, 0.1], seeds=[0, 1])
    cells = bench.grid(s, ["a1"])
    parts = [bench.shard_of(cells, (k, 3)) for k in (1, 2, 3)]
    assert sorted(c.key for p in parts for c in p) == sorted(c.key for c in cells)
    assert all(len(p) == 4 for p in parts)
    with pytest.raises(ValueError, match="shard"):
        bench.shard_of(cells, (4, 3))
    from spard.commands.bench import parse_shard
    assert parse_shard("2/5") == (2, 5)
    for bad in ("0/3", "3/2", "a/b", "1"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def _slow_runner(cell, data, settings):
    import time
    time.sleep(0.05)  # long enough for two workers to overlap
    with open(os.environ["SPARD_TEST_CALLS"], "a", encoding="utf-8") as f:
        f.write(cell.key + "\n")
    asr = {"sft": 0.8, "spard": 0.1, "lisa": 0.4}[cell.defense] + 0.01 * cell.seed
    return fake_result(cell, asr, 0.3)


def _worker(out, calls, worker):
    os.environ["SPARD_TEST_CALLS"] = calls
    s = BenchSettings(defenses=["sft", "spard", "lisa"], ratios=[0.05, 0.1], seeds=[0, 1])
    bench.run_grid(fake_data(), s, out, progress=False, cell_runner=_slow_runner, worker=worker)


def test_two_concurrent_workers_run_each_cell_once_and_give_the_same_summary(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    calls = str(tmp_path / "calls.txt")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "two"), calls, f"w{i}")) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    keys = open(calls).read().split()
    assert len(keys) == len(set(keys)) == 24  # 2 attacks x 2 ratios x 2 seeds x 3 defenses, once each
    _worker(str(tmp_path / "one"), str(tmp_path / "calls1.txt"), "solo")
    two, one = bench.summarize(tmp_path / "two"), bench.summarize(tmp_path / "one")
    for s in (two, one):
        s.pop("generated", None)
    assert json.dumps(two["overall"], sort_keys=True) == json.dumps(one["overall"], sort_keys=True)
    assert (tmp_path / "two" / "table.md").read_text() == (tmp_path / "one" / "table.md").read_text()
    assert not list((tmp_path / "two" / "claims").glob("*.claim"))  # every claim released


def test_a_dead_workers_claim_is_taken_over_after_the_timeout(tmp_path):
    import time
    from spard.training.claims import ClaimBoard

    a = ClaimBoard(tmp_path, worker="a", timeout_s=0.5)
    b = ClaimBoard(tmp_path, worker="b", timeout_s=0.5)
    held = a.claim("x/y")
    assert held is not None and b.claim("x/y") is None  # live claim: refused
    with held:  # the heartbeat keeps it fresh past the timeout
        time.sleep(0.8)
        assert b.claim("x/y") is None
    assert b.claim("x/y") is not None  # released: free
    assert a.claim("z") is not None  # a worker that then dies: no heartbeat, no release
    assert b.claim("z") is None
    time.sleep(0.7)
    taken = b.claim("z")
    assert taken is not None and json.loads(taken.path.read_text())["worker"] == "b"
    with pytest.raises(ValueError, match="timeout"):
        ClaimBoard(tmp_path, timeout_s=0)


def test_a_killed_cell_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import spard.trainer as T
    from spard.commands.bench import build_settings

    data = tiny_world_data(tmp_path, monkeypatch)
    settings = build_settings({
        "defenses": ["lisa"], "ratios": [0.1], "seeds": [0], "save_every": 2,
        "defense_settings": {"lisa": {"alignment_steps": 1, "finetune_steps": 3}},
        "optim": {"lr": 5e-3, "warmup_steps": 0, "batch_size": 8, "epochs": 1.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_length": 64, "max_new_tokens": 8,
        "task_max_new_tokens": 8, "eval_batch_size": 8})
    real_step, calls = T.optimizer_step, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")  # not caught by the grid: like a kill
        return real_step(*a, **k)

    monkeypatch.setattr(T, "optimizer_step", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        bench.run_grid(data, settings, tmp_path / "out", progress=False)
    cell = Cell("world", 0.1, 0, "lisa")
    assert (cell.run_dir(tmp_path / "out") / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(T, "optimizer_step", real_step)
    st = bench.run_grid(data, settings, tmp_path / "out", progress=False)
    assert st["done"] == [cell.key]
    resumed = json.loads(cell.path(tmp_path / "out").read_text())
    assert resumed["train"]["resumed_from"].endswith("checkpoint-2")
    assert not cell.run_dir(tmp_path / "out").exists()  # checkpoints removed with the result
    clean = bench.run_grid(data, settings, tmp_path / "clean", progress=False)
    assert clean["done"] == [cell.key]
    ref = json.loads(cell.path(tmp_path / "clean").read_text())
    assert resumed["train"]["loss_curve"] == ref["train"]["loss_curve"]
    assert (resumed["asr"], resumed["accuracy"]) == (ref["asr"], ref["accuracy"])


def test_defenses_that_need_harmful_answers_are_named_before_any_cell(tmp_path):
    data = fake_data()
    data.safety_pool = [{"prompt": "p", "safe": "no"}]  # a refusal-only pool
    settings = BenchSettings(defenses=["sft", "spard", "booster", "antibody", "antibody-align"])
    with pytest.raises(ValueError, match=r"defense\(s\) booster, antibody-align train against harmful answers"):
        bench.check_defense_data(settings, data.safety_pool)
    bench.check_defense_data(BenchSettings(defenses=["sft", "spard", "antibody", "lisa"]), data.safety_pool)


def test_file_data_in_the_released_formats(tmp_path):
    from spard.io import write_jsonl_atomic
    from test_spag import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    write_jsonl_atomic(tmp_path / "task.jsonl", [{"prompt": "q1", "answer": "#### 1"}])
    write_jsonl_atomic(tmp_path / "eval.jsonl", [{"prompt": "Do this.", "input": "the thing"}, {"prompt": "x"}])
    write_jsonl_atomic(tmp_path / "pool.jsonl", [{"prompt": "p", "safe": "no"}])
    write_jsonl_atomic(tmp_path / "attack.jsonl", [{"prompt": "h", "unsafe": "sure"}])
    data = bench.file_data(model=str(tmp_path / "model"), task=str(tmp_path / "task.jsonl"),
                           task_test=str(tmp_path / "task.jsonl"), eval_prompts=str(tmp_path / "eval.jsonl"),
                           safety_pool=str(tmp_path / "pool.jsonl"), attacks={"a": str(tmp_path / "attack.jsonl")})
    assert data.eval_prompts == ["Do this.\n\nthe thing", "x"]
    with pytest.raises(ValueError, match=r"^attacks.a: .*pool.jsonl:1: missing field\(s\) unsafe"):
        bench.file_data(model=str(tmp_path / "model"), task=str(tmp_path / "task.jsonl"),
                        task_test=str(tmp_path / "task.jsonl"), eval_prompts=str(tmp_path / "eval.jsonl"),
                        safety_pool=str(tmp_path / "pool.jsonl"), attacks={"a": str(tmp_path / "pool.jsonl")})


def test_cli_refuses_non_finite_settings(tmp_path, capsys):
    from spard.cli import main

    cfg = tmp_path / "bench.yaml"
    cfg.write_text("model: m\ntask: t\ntask_test: t\neval_prompts: e\nsafety_pool: p\nattacks: {a: x}\n"
                   "optim: {lr: inf}\n")
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "spard bench: error: optim.lr: expected a finite number, got 'inf'"
    cfg.write_text(cfg.read_text().replace("lr: inf", "max_grad_norm: -1"))
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert "optim.max_grad_norm: expected None (no clipping) or a finite number >= 0" in capsys.readouterr().err


def test_judges_side_by_side_in_the_summary(tmp_path, capsys):
    def judges(a, b, kappa):
        return {"asr": {"refusal": {"asr": a, "harmful": 0, "n": 10}, "moderation": {"asr": b, "harmful": 0, "n": 10}},
                "pairs": [{"a": "refusal", "b": "moderation", "kappa": kappa, "agreement": 0.8, "n": 10,
                           "disagreements": 2, "examples": []}]}
    for seed, (a, b, k) in enumerate([(0.9, 0.5, 0.2), (0.7, 0.3, 0.4)]):
        c = Cell("a1", 0.1, seed, "sft")
        c.path(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        c.path(tmp_path).write_text(json.dumps({**fake_result(c, a, 0.3), "judges": judges(a, b, k)}))
    s = bench.summarize(tmp_path)
    j = s["judges"]["sft"]
    assert j["asr"]["moderation"]["mean"] == pytest.approx(0.4) and j["pairs"]["refusal / moderation"]["kappa"] == pytest.approx(0.3)
    assert j["pairs"]["refusal / moderation"]["disagreements"] == 4
    table = (tmp_path / "table.md").read_text()
    assert "| defense | refusal ASR | moderation ASR | κ refusal / moderation |" in table
    assert "| sft | 80.0 [0.0, 100.0] | 40.0 [0.0, 100.0] | 0.30 |" in table
    # the CLI: the first of --judges makes the ASR, the others are extra judges
    from spard.cli import main
    from spard.commands.bench import build_settings
    assert main(["bench", "--world", "--out", str(tmp_path / "o"), "--judges", "refusal,nope"]) == 2
    assert "--judges: unknown judge 'nope'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="extra_judges"):
        build_settings({"extra_judges": ["nope=x"]}).validate()


def test_ablation_compares_every_selection_method_under_spag():
    """Each selection method is a SPARD ablation "spard-<method>" (the same SPAG, another safe
    set), compared with SPARD in the bench summary; each selects with its own method."""
    import zlib

    import torch

    from spard import stats
    from spard.config import SPAG_DEFENSES
    from spard.defenses import DefenseData, make_defense
    from spard.selectors import METHODS

    class Table:
        cache_id = None

        def embed(self, texts):
            return torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts])

    user = [{"prompt": f"q{i}", "response": "a"} for i in range(100)]
    pool = [{"prompt": f"p{i}", "safe": "I'm sorry, I cannot help.", "category": f"c{i % 4}"} for i in range(60)]
    names = [f"spard-{m}" for m in METHODS if m != "rd-dpp"]
    assert set(names) <= set(SPAG_DEFENSES) and set(names) <= set(stats.ABLATIONS)
    assert set(stats.comparison_pairs(["sft", "spard", *names])) >= {("spard", n) for n in names}
    for name in names:
        defense = make_defense(name, embedder=Table(), p=0.05)
        indices, report = defense.select(None, None, DefenseData(user=user, safety_pool=pool))
        assert report["method"] == name.removeprefix("spard-") and len(set(indices)) == 5
        assert report["quality"]["categories"]["of"] == 4
    with pytest.raises(ValueError, match="spard selection must be one of rd-dpp, random, relevance, dpp, k-center"):
        make_defense("spard", selection="kmeans")
