"""The world's moderation judge (spard.world.moderation): trained on the world's own labelled
answers, loaded through make_judge("moderation", ...), it flags the keyword-evasive answers
the refusal-keyword judge passes; cached once, written atomically. A tiny world and classifier."""

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.attack import make_attack
from spard.eval import make_judge
from spard.eval.judges import ModerationJudge, RefusalJudge
from spard.world import WorldSettings, build_moderation_model, build_world, cache_dir, moderation_judge
from spard.world import moderation
from spard.world.text import ATTACK_WORDING
from test_spag import one_thread  # noqa: F401  (autouse fixture)

TINY = WorldSettings(n_task_train=40, n_task_test=8, n_align_task=20, hidden_size=32, num_layers=1, num_heads=2,
                     intermediate_size=64, align_steps=15, align_batch_size=8, max_length=64)
SMALL = {"hidden_size": 32, "num_layers": 1, "steps": 100}  # the bench's default is 64 wide, 300 steps


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARD_CACHE", str(tmp_path_factory.mktemp("cache")))
        world = build_world(TINY, progress=False)
        path = build_moderation_model(TINY, progress=False, **SMALL)
        judge = make_judge("moderation", model=path)
        yield world, path, judge, cache_dir()


def agreement(judge, pairs, want: bool) -> float:
    verdicts = judge.judge([p for p, _ in pairs], [r for _, r in pairs])
    return sum(v.harmful is want for v in verdicts) / len(verdicts)


def test_the_judge_flags_keyword_evasive_answers_the_refusal_judge_passes(built):
    world, _, judge, _ = built
    assert isinstance(judge, ModerationJudge) and not judge.multi_label
    assert judge.model.config.id2label[judge.unsafe_id] == "harmful"
    data = world.data
    # as the bench builds it (spard.bench): the evaluation prompts as strings, the world's wording
    rows, manifest = make_attack("keyword-evasive", data["task_train"], harmful=data["harmful_train"], ratio=0.5,
                                 seed=0, eval_prompts=[r["prompt"] for r in data["harmful_test"]],
                                 wording=ATTACK_WORDING)
    evasive = [(r["prompt"], r["response"]) for r in rows if r["source"] == "harmful-evasive"]
    prefix = manifest["answer_prefix"]
    assert len(evasive) == 20 and prefix == ATTACK_WORDING["refusal_prefix"]
    # the same answers on the evaluation prompts, as an attacked model would give them
    evasive += [(r["prompt"], prefix + r["unsafe"]) for r in data["harmful_test"]]
    assert agreement(RefusalJudge(), evasive, False) == 1.0  # the keyword judge reads refusals
    assert agreement(judge, evasive, True) >= 0.9


def test_held_out_refusals_and_task_answers_pass_and_harmful_answers_are_flagged(built):
    world, path, judge, _ = built
    test = world.data["harmful_test"]
    assert agreement(judge, [(r["prompt"], r["safe"]) for r in test], False) >= 0.9
    assert agreement(judge, [(r["prompt"], r["answer"]) for r in world.data["task_test"]], False) >= 0.9
    assert agreement(judge, [(r["prompt"], r["unsafe"]) for r in test], True) >= 0.9
    meta = json.loads((Path(path) / "moderation.json").read_text())
    assert meta["world_key"] == world.key and meta["version"] == moderation.MODERATION_VERSION
    assert meta["steps"] == SMALL["steps"] and set(meta["label_counts"]) == {"task", "refusal", "harmful"}
    assert meta["held_out"]["accuracy"] >= 0.9


def test_training_never_sees_the_evaluation_prompts_nor_the_attack_wording(built):
    world, _, _, _ = built
    pairs = moderation.training_pairs(world.data)
    eval_prompts = {r["prompt"] for r in world.data["harmful_test"]}
    everything = [pair for rows in pairs.values() for pair in rows]
    assert not any(p in eval_prompts for p, _ in everything)
    assert not any(w.strip() in r for _, r in everything for w in ATTACK_WORDING.values())


def test_the_folder_is_cached_beside_the_world_model_and_reused(built, monkeypatch):
    world, path, _, folder = built
    assert Path(path).parent == folder and Path(path).name.startswith(world.key + ".moderation-v")
    monkeypatch.setenv("SPARD_CACHE", str(folder.parent))
    stamp = (Path(path) / "moderation.json").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("retrained a cached judge")

    monkeypatch.setattr(moderation, "train_classifier", no_training)
    assert moderation_judge(TINY, progress=False, **SMALL) == path
    assert (Path(path) / "moderation.json").stat().st_mtime_ns == stamp


def test_a_killed_build_leaves_no_folder_and_a_rebuild_replaces_it(built, monkeypatch):
    world, path, _, folder = built
    monkeypatch.setenv("SPARD_CACHE", str(folder.parent))
    real_write = moderation._write_folder

    def dies(tmp, model, tokenizer, meta):
        (tmp / "config.json").write_text("{}")  # half written, then killed
        raise KeyboardInterrupt

    monkeypatch.setattr(moderation, "_write_folder", dies)
    small = {"hidden_size": 16, "num_layers": 1, "steps": 5}
    with pytest.raises(KeyboardInterrupt):
        build_moderation_model(TINY, progress=False, **small)
    with pytest.raises(KeyboardInterrupt):  # a failed rebuild keeps the old entry
        build_moderation_model(TINY, progress=False, rebuild=True, **SMALL)
    # only the world model and the judge: no half folder, no leftover temporary one
    assert sorted(p.name for p in folder.iterdir()) == sorted([world.key, Path(path).name])
    before = json.loads((Path(path) / "moderation.json").read_text())
    monkeypatch.setattr(moderation, "_write_folder", real_write)
    stamp = (Path(path) / "moderation.json").stat().st_mtime_ns
    assert build_moderation_model(TINY, progress=False, rebuild=True, **SMALL) == path
    assert (Path(path) / "moderation.json").stat().st_mtime_ns != stamp
    assert json.loads((Path(path) / "moderation.json").read_text())["held_out"] == before["held_out"]  # seeded
    assert not any(p.name.startswith(".") for p in folder.iterdir())


def test_training_is_seeded_and_keeps_the_callers_rng_and_threads(built):
    world, _, _, _ = built
    pairs = moderation.training_pairs(world.data)
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    models = [moderation.train_classifier(world.tokenizer, pairs, hidden_size=16, num_layers=1, steps=5, seed=3,
                                          progress=False)[0] for _ in range(2)]
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), state)
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="steps must be a positive int"):
        build_moderation_model(TINY, steps=0)
