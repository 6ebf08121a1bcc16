"""A bench cell's training, generation and judging in three processes (spard.eval.stages): the
same record as in one process, answers kept as files, and judging again from them."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spard import bench
from spard.bench import Cell
from test_bench import tiny_world_data
from test_spag import one_thread  # noqa: F401  (autouse fixture)


def _settings(new_tokens=8):
    from spard.commands.bench import build_settings

    return build_settings({
        "defenses": ["sft"], "ratios": [0.1], "seeds": [0],
        "optim": {"lr": 1e-2, "warmup_steps": 0, "batch_size": 16, "epochs": 1.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "max_length": 96, "max_new_tokens": new_tokens,
        "task_max_new_tokens": new_tokens, "eval_batch_size": 4, "extra_judges": ["refusal"]})


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_separate_stages_give_the_together_record_and_rejudge_from_the_files(tmp_path, monkeypatch):
    # the world's model (cached, as tests/test_eval_serving.py uses it): it answers, unlike the tiny one
    data = bench.world_data(n_task=40, n_eval=8, n_task_test=8, progress=False)
    settings = _settings(new_tokens=16)
    cell = Cell("world", 0.1, 0, "sft")
    records = {}
    for mode in ("together", "separate"):
        st = bench.run_grid(data, settings, tmp_path / mode, progress=False, stages=mode)
        assert st["done"] == [cell.key] and st["failed"] == []
        records[mode] = json.loads(cell.path(tmp_path / mode).read_text())
        assert records[mode]["stages"] == mode
        assert not cell.run_dir(tmp_path / mode).exists()  # adapter, job and logs cleared with the cell
    assert not list((tmp_path / "separate" / "stages").iterdir())  # the data file is removed
    same = ("asr", "hs", "degenerate", "n_eval", "accuracy", "evaluation", "judges", "attack_manifest", "fingerprint")
    assert {k: records["separate"][k] for k in same} == {k: records["together"][k] for k in same}
    timeless = [{k: v for k, v in records[m]["train"].items() if "second" not in k and "time" not in k}
                for m in ("together", "separate")]
    assert timeless[0] == timeless[1] and timeless[0]["steps"] > 0
    for name in ("safety_generations.jsonl", "task_generations.jsonl"):  # hf answers kept as files too
        a, b = (_lines(bench.answers_dir(cell, tmp_path / m) / name) for m in ("together", "separate"))
        assert a == b and len(a) == 8
        assert all(r["response"] for r in a)  # real answers, not the empty ones of an untrained model
    assert "judges" in _lines(bench.answers_dir(cell, tmp_path / "separate") / "safety_generations.jsonl")[0]

    # --rejudge: the answers judged again from the files, nothing generated
    import sys
    ev = sys.modules["spard.eval.evaluate"]  # the module (the package exports its function by that name)

    def no_generation(*a, **k):
        raise AssertionError("rejudge generated")

    monkeypatch.setattr(ev, "_generate_part", no_generation)
    settings.extra_judges = []  # other judges: another fingerprint, the same answers
    st = bench.rejudge_grid(data, settings, tmp_path / "separate")
    assert st == {"rejudged": [cell.key], "missing": []}
    again = json.loads(cell.path(tmp_path / "separate").read_text())
    assert again["judges"] is None and again["evaluation"]["generation"] == records["separate"]["evaluation"]["generation"]
    assert again["fingerprint"] == bench.cell_fingerprint(cell, settings, data.description)
    assert bench.run_grid(data, settings, tmp_path / "separate", progress=False, stages="together")["skipped"] == [cell.key]


def test_a_failing_stage_names_the_stage_and_the_cell_and_the_cell_is_not_done(tmp_path, monkeypatch, capsys):
    data = tiny_world_data(tmp_path, monkeypatch)
    settings = _settings()
    settings.eval_batch_size = 8
    data.task_test = [{"prompt": "q"}]  # no gold answer: generation's own check fails in its process
    cell = Cell("world", 0.1, 0, "sft")
    st = bench.run_grid(data, settings, tmp_path / "o", progress=False, stages="separate")
    assert st["failed"] == [cell.key] and not cell.path(tmp_path / "o").exists()
    cap = capsys.readouterr()
    line = [x for x in (cap.out + cap.err).splitlines() if "failed" in x]
    assert len(line) == 1 and "the generation stage of cell world/ph0.1/seed0/sft failed: ValueError: task row 0" in line[0]


def test_stages_option(tmp_path, capsys):
    import pytest
    import torch

    from spard.eval.stages import stages_mode

    assert stages_mode("auto") == ("separate" if torch.cuda.is_available() else "together")
    assert stages_mode("together") == "together" and stages_mode("separate") == "separate"
    with pytest.raises(ValueError, match="--stages: expected one of auto, separate, together"):
        stages_mode("apart")
    with pytest.raises(ValueError, match="stages: expected separate or together"):
        bench.run_grid(None, _settings(), "unused", stages="auto")

    from spard.cli import main
    assert main(["bench", "--world", "--stages", "apart", "--out", str(tmp_path / "o")]) == 2
    assert "--stages: invalid choice: 'apart'" in capsys.readouterr().err
