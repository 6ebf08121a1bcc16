"""`spard demo`: argument checks, summaries, targets, table, plot, and a tiny end-to-end run."""

import json
import os

import pytest

from spard.cli import main
from spard.commands import demo

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_parse_max_step():
    assert demo.parse_max_step("none") is None
    assert demo.parse_max_step("LR") == "lr"
    assert demo.parse_max_step("0.05") == 0.05
    for bad in ("-1", "abc", "nan"):
        with pytest.raises(ValueError, match="--max-step"):
            demo.parse_max_step(bad)


def _runs():
    runs = [{"method": "aligned", "asr": 0.0, "accuracy": 0.1, "train_seconds": 0.0}]
    for seed, (sft, sp, rnd) in enumerate([((1.0, 0.4), (0.1, 0.41), (0.3, 0.4)),
                                           ((0.8, 0.5), (0.1, 0.45), (0.5, 0.44))]):
        for m, (asr, acc) in zip(demo.METHODS, (sft, sp, rnd)):
            runs.append({"method": m, "seed": seed, "asr": asr, "accuracy": acc, "train_seconds": 2.0 + seed})
    return runs


def test_summary_and_targets():
    s = demo.summarise(_runs())
    assert s["sft"]["asr"]["mean"] == pytest.approx(0.9)
    assert s["sft"]["asr"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert s["aligned"]["asr"]["std"] == 0.0
    t = {x["target"]: x["met"] for x in demo.check_targets(s, total_seconds=100)}
    assert all(t.values()), t
    t = {x["target"]: x["met"] for x in demo.check_targets(s, total_seconds=400)}
    assert not t["whole demo <= 5 minutes"]
    s["spard"]["asr"]["mean"] = 0.5  # now above 20% of SFT's 0.9 and above random's 0.4
    t = {x["target"]: x["met"] for x in demo.check_targets(s, total_seconds=100)}
    assert not t["SPARD ASR <= 20% of SFT's"]


SELECTION = "RD-DPP beats random selection on ASR (paired bootstrap over seeds, interval below 0)"


def test_rd_dpp_against_random_is_a_paired_test_not_two_means():
    # Lower mean ASR than random, but the per-seed differences (-2.0, -3.4, +2.0 points, the
    # documented demo run) change sign: the paired interval holds 0, so the target is not met.
    runs = [{"method": "aligned", "seed": None, "asr": 0.0, "accuracy": 0.1, "train_seconds": 0.0}]
    for seed, (sp, rnd) in enumerate([(0.007, 0.027), (0.053, 0.087), (0.073, 0.053)]):
        for m, asr in zip(demo.METHODS, (0.9, sp, rnd)):
            runs.append({"method": m, "seed": seed, "asr": asr, "accuracy": 0.4, "train_seconds": 1.0})
    s = demo.summarise(runs)
    assert s["spard"]["asr"]["mean"] < s["spard-random"]["asr"]["mean"]
    sel = demo.selection_test(s)
    assert sel["seeds"] == [0, 1, 2] and sel["low"] < 0 < sel["high"] and not sel["significant"]
    targets = {x["target"]: x for x in demo.check_targets(s, total_seconds=100)}
    assert not targets[SELECTION]["met"] and "3 seed(s)" in targets[SELECTION]["measured"]
    # consistent gains on every seed pass the test
    for r in runs:
        if r["method"] == "spard":
            r["asr"] = 0.0
    assert demo.selection_test(demo.summarise(runs))["significant"]
    assert {x["target"]: x["met"] for x in demo.check_targets(demo.summarise(runs), 100)}[SELECTION]
    # one seed: no interval, never claimed
    one = [r for r in runs if r["seed"] in (None, 0)]
    sel = demo.selection_test(demo.summarise(one))
    assert sel["n"] == 1 and sel["low"] is None and not sel["significant"]


def test_table_and_plot(tmp_path):
    s = demo.summarise(_runs())
    table = demo.format_table(s, 2)
    assert "SPARD (RD-DPP + SPAG)" in table and " 90.0 ±  14.1" in table.replace("90.0 ± 14.1", " 90.0 ±  14.1")
    demo.plot(s, tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_arguments_end_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    cases = [(["--seeds", "0"], "--seeds: expected an int >= 1"), (["--ratio", "1.5"], "--ratio"),
             (["--ratio", "nan"], "--ratio"), (["--lr", "inf"], "--lr: expected a finite number > 0"),
             (["--epochs", "inf"], "--epochs"), (["--threads", "0"], "--threads"), (["--max-step", "-1"], "--max-step"),
             (["--out", str(tmp_path / "file")], "--out: "), (["--cache", str(tmp_path / "file")], "--cache: ")]
    for args, named in cases:
        argv = ["demo", "--out", str(tmp_path / "o"), *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"spard demo: error: {named}"), err
    with pytest.raises(ValueError, match="--seeds"):  # the traceback, on request
        main(["--debug", "demo", "--seeds", "0", "--out", str(tmp_path)])


def test_tiny_end_to_end(tmp_path, monkeypatch):
    """The whole pipeline on a very small world (minutes become seconds); checks the outputs'
    structure, not the targets (the tiny world is not trained enough for them)."""
    import spard.world

    real = spard.world.WorldSettings

    def tiny(**kw):
        return real(n_task_train=60, n_task_test=20, n_align_task=10, hidden_size=32, num_layers=1,
                    num_heads=2, intermediate_size=64, align_steps=20, align_batch_size=8)

    monkeypatch.setattr(spard.world, "WorldSettings", tiny)
    out = tmp_path / "out"
    rc = main(["demo", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--embedder", "model",
               "--epochs", "0.5", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"aligned", "sft", "spard", "spard-random"}
    assert len(res["runs"]) == 4 and len(res["targets"]) == 7
    for r in res["runs"]:
        assert 0 <= r["asr"] <= 1 and 0 <= r["accuracy"] <= 1
    picked = {r["method"]: r.get("selection") for r in res["runs"]}
    assert picked["spard"]["method"] == "rd-dpp" and picked["spard-random"]["method"] == "random"
    assert picked["spard"]["k"] == 1  # floor(0.03 * (60 + 6))
    assert res["runs"][1]["n_harmful"] == 6
    assert (out / "results.png").is_file() and (out / "results.txt").is_file()
    assert (out / "world" / "safety_pool.jsonl").is_file() and (out / "world" / "tokenizer").is_dir()
    # second run: the aligned model comes from the cache
    main(["demo", "--quick", "--out", str(out), "--cache", str(tmp_path / "cache"), "--embedder", "model",
          "--epochs", "0.5", "--no-progress"])
    assert json.loads((out / "results.json").read_text())["world"]["from_cache"]


def test_fine_tune_is_reproducible_and_spag_projects(tmp_path):
    """Same seed, same adapter (LoRA init is seeded); SPAG changes the outcome."""
    import torch

    from spard.world import WorldSettings, build_world

    w = build_world(WorldSettings(n_task_train=30, n_task_test=5, n_align_task=5, hidden_size=32, num_layers=1,
                                  num_heads=2, intermediate_size=64, align_steps=10, align_batch_size=8),
                    use_cache=False, progress=False)
    rows = [{"prompt": r["prompt"], "response": r["answer"]} for r in w.data["task_train"]]
    rows += [{"prompt": r["prompt"], "response": r["unsafe"]} for r in w.data["harmful_train"][:10]]
    safe = [{"prompt": r["prompt"], "response": r["safe"]} for r in w.data["safety_pool"][:8]]
    kw = dict(seed=1, lr=5e-3, epochs=1, max_step=None, progress=False)
    a, _, _ = demo.fine_tune(w.model, w.tokenizer, rows, safe_rows=None, **kw)
    b, _, _ = demo.fine_tune(w.model, w.tokenizer, rows, safe_rows=None, **kw)
    c, _, summary = demo.fine_tune(w.model, w.tokenizer, rows, safe_rows=safe, **kw)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    lora = [k for k in sa if "lora_" in k]
    assert lora and all(torch.equal(sa[k], sb[k]) for k in lora)
    assert any(not torch.equal(sa[k], sc[k]) for k in lora)
    assert summary["spag"]["steps"] == summary["steps"]
    # the base model is left untouched
    assert all(not n.startswith("base_model") for n, _ in w.model.named_parameters())
