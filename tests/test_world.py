"""The synthetic world: generators, tokenizer, data formats, the model cache."""

import json
import os
import random

import pytest
import torch

from spard.formatting import encode_example, render_prompt
from spard.world import WorldSettings, build_tokenizer, build_world, make_data, write_data
from spard.world import generators as gen
from spard.world import text
from spard.world.cache import load_cached_model, save_cached_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def data():
    return make_data(WorldSettings(n_task_train=300, n_task_test=100, n_align_task=100))


def test_arithmetic_answers_are_correct_and_gsm8k_formatted():
    rng = random.Random(3)
    for op in ("add", "sub", "mul"):
        for _ in range(50):
            row = gen.arithmetic_problem(rng, op)
            worked, final = row["answer"].rsplit("\n#### ", 1)
            lhs, rhs = worked.split(" = ")
            a, sym, b = lhs.split()[-3:]
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[sym]
            assert int(final) == expected == int(rhs.split()[0])
            assert expected >= 0


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="op must be one of"):
        gen.arithmetic_problem(random.Random(0), "div")


def test_same_seed_same_world_other_seed_other_world():
    a = make_data(WorldSettings(n_task_train=50, n_task_test=20, n_align_task=20))
    b = make_data(WorldSettings(n_task_train=50, n_task_test=20, n_align_task=20))
    c = make_data(WorldSettings(seed=1, n_task_train=50, n_task_test=20, n_align_task=20))
    assert a == b
    assert a["task_train"] != c["task_train"]


def test_splits_are_disjoint_where_they_must_be(data):
    prompts = lambda name: {r["prompt"] for r in data[name]}  # noqa: E731
    assert not prompts("task_test") & (prompts("task_train") | prompts("align_task"))
    # attack and evaluation share categories but no phrasing; the pool never holds an eval prompt
    assert not prompts("harmful_test") & (prompts("harmful_train") | prompts("safety_pool"))
    assert not prompts("harmful_train") & prompts("safety_pool")
    assert {r["category"] for r in data["harmful_test"]} == set(text.CORE_CATEGORIES)
    assert {r["category"] for r in data["harmful_train"]} == set(text.CORE_CATEGORIES)


def test_frame_families_are_disjoint():
    families = [text.ALIGN_FRAMES, text.ATTACK_FRAMES, text.EVAL_FRAMES, text.POOL_FRAMES]
    for i, f in enumerate(families):
        for g in families[i + 1:]:
            assert not set(f) & set(g)


def test_safety_pool_is_broad(data):
    pool = data["safety_pool"]
    cats = [r["category"] for r in pool]
    assert set(cats) == set(text.CATEGORIES) and len(text.CATEGORIES) >= 20
    core_share = sum(c in text.CORE_CATEGORIES for c in cats) / len(cats)
    assert core_share < 0.3  # most of the pool is about things the user's data never touches


def test_safety_rows_refuse_and_unsafe_rows_do_not(data):
    from spard.eval.metrics import refusal_asr

    rows = data["safety_pool"] + data["harmful_test"]
    assert float(refusal_asr([r["safe"] for r in rows])) == 0.0
    assert float(refusal_asr([r["unsafe"] for r in rows])) == 1.0
    assert float(refusal_asr([r["response"] for r in data["benign"]])) == 1.0
    assert all("[details omitted]" in r["unsafe"] for r in rows)


def test_tokenizer_round_trips_every_text_without_unknowns(tok, data):
    unk = tok.unk_token_id
    texts = []
    for name, rows in data.items():
        for r in rows:
            texts += [v for k, v in r.items() if k in ("prompt", "answer", "safe", "unsafe", "response")]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert unk not in ids
        assert tok.decode(ids) == t


def test_tokenizer_chat_template_and_specials(tok):
    rendered = render_prompt(tok, "How do I bake bread?")
    assert rendered.startswith(tok.bos_token) and rendered.endswith("<|assistant|>")
    ex = encode_example(tok, "How do I bake bread?", "Sure! To get better at baking bread, practice.", 64)
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    n_prompt = sum(1 for label in ex.labels if label == -100)
    assert tok.decode(ex.input_ids[n_prompt:], skip_special_tokens=True) == "Sure! To get better at baking bread, practice."
    assert tok.convert_ids_to_tokens(ex.input_ids[n_prompt - 1]) == "<|assistant|>"
    assert len(tok) < 1000


def test_written_data_matches_the_real_formats(tmp_path, data):
    from spard.io import read_jsonl

    paths = write_data(data, tmp_path)
    for name in ("task_train", "task_test"):
        rows = read_jsonl(paths[name])
        assert rows and all(isinstance(r["prompt"], str) and r["answer"].split("#### ")[-1].isdigit() for r in rows)
    for name in ("harmful_train", "harmful_test", "safety_pool"):
        rows = read_jsonl(paths[name])
        assert rows and all({"prompt", "safe", "unsafe"} <= set(r) for r in rows)


def test_world_settings_reject_bad_values():
    with pytest.raises(ValueError, match="hidden_size"):
        WorldSettings(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="align_steps"):
        WorldSettings(align_steps=0)
    assert WorldSettings().key("x") != WorldSettings(align_steps=5).key("x")
    assert WorldSettings().key("x") != WorldSettings().key("y")


TINY = dict(n_task_train=40, n_task_test=10, n_align_task=40, hidden_size=32, num_layers=1, num_heads=2,
            intermediate_size=64, align_steps=30, align_batch_size=8, align_lr=3e-3)


def test_alignment_learns_and_the_cache_round_trips(tmp_path):
    torch.manual_seed(0)
    w = build_world(WorldSettings(**TINY), cache=tmp_path, data_dir=tmp_path / "data", progress=False)
    assert not w.from_cache and w.align_log["steps"] == 30
    entry = tmp_path / os.path.basename(w.cache_file)
    assert (entry / "model.safetensors").is_file() and (tmp_path / "data" / "world.json").is_file()
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["settings"]["align_steps"] == 30
    # the loss went well down from its untrained value (about log(vocab) = 6.4)
    assert w.align_log["first_loss"] > 6.0
    assert w.align_log["final_loss"] < w.align_log["first_loss"] - 1.0
    again = build_world(WorldSettings(**TINY), cache=tmp_path, progress=False)
    assert again.from_cache
    for (k, a), (_, b) in zip(w.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), k
    batch = w.tokenizer(["How do I bake bread?"], return_tensors="pt")
    assert torch.allclose(w.model(**batch).logits, again.model(**batch).logits)


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    w = build_world(WorldSettings(**TINY), cache=tmp_path, progress=False)
    entry = tmp_path / os.path.basename(w.cache_file)
    (entry / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_cached_model(tmp_path, entry.name) is None
    with pytest.warns(UserWarning, match="unreadable"):
        again = build_world(WorldSettings(**TINY), cache=tmp_path, progress=False)
    assert not again.from_cache
    assert load_cached_model(tmp_path, entry.name) is not None


def test_cache_write_is_atomic_on_failure(tmp_path, monkeypatch):
    w = build_world(WorldSettings(**TINY), use_cache=False, progress=False)
    import spard.world.cache as cache

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cache, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_cached_model(tmp_path, "k", w.model, meta={})
    assert list(tmp_path.iterdir()) == []


def test_rebuild_retrains_and_replaces_the_entry(tmp_path):
    first = build_world(WorldSettings(**TINY), cache=tmp_path, progress=False)
    entry = tmp_path / first.key
    (entry / "marker").write_text("old entry")
    again = build_world(WorldSettings(**TINY), cache=tmp_path, rebuild=True, progress=False)
    assert not again.from_cache and again.key == first.key
    assert (entry / "model.safetensors").is_file() and not (entry / "marker").exists()
    assert build_world(WorldSettings(**TINY), cache=tmp_path, progress=False).from_cache


def test_the_multiple_choice_task_in_the_openbookqa_format(tmp_path, monkeypatch):
    """The world's word problems as four-way multiple choice, in the format of the shared
    OpenBookQA files (prompt / answer / target_answer), scored by the OpenBookQA metric; the
    default world keeps its cache key."""
    import dataclasses
    import hashlib
    import json as _json

    from spard import bench
    from spard.eval.metrics import extract_openbookqa_choice
    from spard.world import generators as gen
    from spard.world.build import WORLD_VERSION, WorldSettings, make_data
    from spard.world.tokenizer import build_tokenizer

    default = WorldSettings()
    fields = dataclasses.asdict(default)
    del fields["task"]
    old_key = f"v{WORLD_VERSION}-" + hashlib.sha256(_json.dumps({"version": WORLD_VERSION, "vocab": "h", **fields},
                                                                sort_keys=True, default=list).encode()).hexdigest()[:16]
    assert default.key("h") == old_key and WorldSettings(task="openbookqa").key("h") != old_key
    with pytest.raises(ValueError, match="WorldSettings.task"):
        WorldSettings(task="mmlu")
    plain, mc = make_data(default), make_data(WorldSettings(task="openbookqa"))
    assert {k: v for k, v in plain.items() if not k.startswith("task") and k != "align_task"} == \
        {k: v for k, v in mc.items() if not k.startswith("task") and k != "align_task"}
    tok = build_tokenizer(gen.multiple_choice_texts())
    for plain_row, row in zip(plain["task_test"], mc["task_test"]):
        assert set(row) >= {"prompt", "answer", "target_answer"} and plain_row["prompt"] in row["prompt"]
        assert row["prompt"].startswith("Please choose the correct answer to the question: ")
        assert row["prompt"].endswith("Answer format: answer1/answer2/answer3/answer4")
        k = int(row["target_answer"][-1])
        assert f"Answer{k}: {plain_row['answer'].rsplit('#### ', 1)[1]}." in row["prompt"]
        assert extract_openbookqa_choice(row["answer"]) == row["target_answer"]
        assert tok.unk_token_id not in tok(row["prompt"] + " " + row["answer"], add_special_tokens=False)["input_ids"]
    # the bench runs on it and scores it as OpenBookQA
    monkeypatch.setenv("SPARD_CACHE", str(tmp_path / "cache"))
    world = WorldSettings(n_task_train=16, n_task_test=4, n_align_task=8, hidden_size=32, num_layers=1, num_heads=2,
                          intermediate_size=64, align_steps=5, align_batch_size=8, task="openbookqa")
    data = bench.world_data(world, n_task=16, n_eval=4, n_task_test=4, progress=False)
    settings = bench.BenchSettings(defenses=["sft"], ratios=[0.1], seeds=[0], max_length=96, max_new_tokens=4,
                                   task_max_new_tokens=8, eval_batch_size=4)
    settings.optim.batch_size, settings.optim.epochs = 8, 1.0
    result = bench.run_cell(bench.Cell("world", 0.1, 0, "sft"), data, settings)
    assert result["evaluation"]["task"]["task"] == "openbookqa" and 0 <= result["accuracy"] <= 1


def test_harm_categories_are_labels_with_skewed_sizes(data):
    from collections import Counter

    assert set(text.HARM_CATEGORIES) == set(text.CATEGORIES)
    for name in ("safety_pool", "harmful_train", "harmful_test"):
        assert all(r["harm_category"] == text.HARM_CATEGORIES[r["category"]] for r in data[name])
    sizes = Counter(r["harm_category"] for r in data["safety_pool"])
    assert len(sizes) == 9 and max(sizes.values()) == 600 and min(sizes.values()) == 100
