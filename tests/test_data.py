"""spard.data / spard.attack: loaders on every format, normalisation, attack mixing, errors."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from spard.attack import build_attack, harmful_count, write_attack  # noqa: E402
from spard.data import (  # noqa: E402
    dedupe_rows,
    load_records,
    load_safety,
    load_task,
    normalise_prompt,
    safety_rows,
    tokenize_rows,
)
from spard.formatting import IGNORE_INDEX  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")

TASK = [{"prompt": f"question {i}?", "answer": f"work {i}\n#### {i}", "id": i} for i in range(20)]
SAFETY = [{"prompt": f"bad request {i}", "safe": f"refusal {i}", "unsafe": f"harm {i}"} for i in range(40)]


def write_jsonl(path: Path, rows, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-dict", "json-lines-in-json", "parquet", "save_to_disk", "dataset-dict"])
def test_load_records_round_trip(tmp_path, fmt):
    rows = TASK
    if fmt == "jsonl":
        src = write_jsonl(tmp_path / "d.jsonl", rows)
    elif fmt == "json":
        src = tmp_path / "d.json"
        src.write_text(json.dumps(rows))
    elif fmt == "json-dict":
        src = tmp_path / "d.json"
        src.write_text(json.dumps({"version": 1, "data": rows}))
    elif fmt == "json-lines-in-json":
        src = write_jsonl(tmp_path / "d.json", rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src)
    else:
        from datasets import Dataset, DatasetDict

        src = tmp_path / "folder"
        ds = Dataset.from_list(rows)
        (DatasetDict({"train": ds, "test": ds.select(range(3))}) if fmt == "dataset-dict" else ds).save_to_disk(str(src))
    kwargs = {"split": "train"} if fmt == "dataset-dict" else {}
    assert load_records(src, **kwargs) == rows
    assert load_records(src, limit=5, **kwargs) == rows[:5]


def test_dataset_dict_split_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(TASK)
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\]; pass split"):
        load_records(tmp_path / "dd")
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_records(tmp_path / "dd", split="dev")
    assert len(load_records(tmp_path / "dd", split="test")) == len(TASK)


def test_rows_list_is_a_source():
    assert load_task(TASK)[3]["response"] == TASK[3]["answer"]


# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------
def test_load_task_normalises_and_keeps_fields(tmp_path):
    src = write_jsonl(tmp_path / "gsm.jsonl", TASK)
    rows = load_task(src)
    assert [r["response"] for r in rows] == [r["answer"] for r in TASK]
    assert rows[5]["id"] == 5 and rows[5]["answer"] == TASK[5]["answer"]  # originals kept


def test_load_task_instruction_format_appends_input(tmp_path):
    src = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
        ],
    )
    rows = load_task(src)
    assert rows[0]["prompt"] == "Translate.\n\nbonjour" and rows[0]["response"] == "hello"
    assert rows[1]["prompt"] == "Say hi." and rows[1]["input"] == ""


def test_load_task_custom_fields(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"q": "a?", "a": "b"}])
    rows = load_task(src, prompt_field="q", response_field="a")
    assert (rows[0]["prompt"], rows[0]["response"]) == ("a?", "b")


def test_load_task_prompt_only_when_allowed(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    assert load_task(src, require_response=False) == [{"prompt": "x"}]
    with pytest.raises(ValueError, match="no response field"):
        load_task(src)


def test_load_safety_and_safety_rows(tmp_path):
    src = write_jsonl(tmp_path / "pool.jsonl", SAFETY)
    pool = load_safety(src)
    assert pool == SAFETY
    assert safety_rows(pool[:2]) == [
        {"prompt": "bad request 0", "response": "refusal 0"},
        {"prompt": "bad request 1", "response": "refusal 1"},
    ]
    with pytest.raises(ValueError, match="item 0"):
        safety_rows([{"prompt": "x"}])


def test_normalise_and_dedupe():
    assert normalise_prompt("  How   do\tI\nDo IT? ") == "how do i do it?"
    rows = [{"prompt": "A b"}, {"prompt": "a  B"}, {"prompt": "c"}]
    assert dedupe_rows(rows) == [rows[0], rows[2]]


# ----------------------------------------------------------------------------------------------
# Bad input: errors name the file and line
# ----------------------------------------------------------------------------------------------
def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_records("./relative/nope")


def test_malformed_line_names_file_and_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "a", "answer": "b"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        load_task(src)


def test_missing_field_names_file_and_line(tmp_path):
    rows = TASK[:4] + [{"prompt": "p", "solution": "s"}]
    src = write_jsonl(tmp_path / "f.jsonl", rows, blank_after=2)  # a blank line shifts the numbering
    with pytest.raises(ValueError, match=r"f\.jsonl:6: no response field .*fields present: prompt, solution"):
        load_task(src)
    bad_pool = write_jsonl(tmp_path / "pool.jsonl", SAFETY[:2] + [{"prompt": "p", "safe": "s"}])
    with pytest.raises(ValueError, match=r"pool\.jsonl:3: missing field\(s\) unsafe"):
        load_safety(bad_pool)


def test_non_string_field(tmp_path):
    src = write_jsonl(tmp_path / "n.jsonl", [{"prompt": 3, "answer": "x"}])
    with pytest.raises(ValueError, match=r"n\.jsonl:1: field 'prompt' must be a string"):
        load_task(src)


def test_empty_set(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"e\.jsonl: no rows"):
        load_records(tmp_path / "e.jsonl")
    src = write_jsonl(tmp_path / "d.jsonl", TASK)
    with pytest.raises(ValueError, match="no rows"):
        load_records(src, limit=0)


def test_bad_arguments(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", TASK)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_records(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="split: applies to"):
        load_records(src, split="train")
    with pytest.raises(ValueError, match="limit: expected"):
        load_records(src, limit=-1)
    with pytest.raises(TypeError, match="source: expected"):
        load_records(3)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="item 0: expected a JSON object"):
        load_records(tmp_path / "list.json")


# ----------------------------------------------------------------------------------------------
# Attack construction
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 0.1, 0.25, 0.29, 1])
def test_attack_exact_counts(ratio):
    clean = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(100)]
    harmful = [{"prompt": f"h{i}", "safe": "no", "unsafe": f"u{i}"} for i in range(150)]
    rows, manifest = build_attack(clean, harmful, ratio=ratio, seed=1)
    n_h = {0: 0, 0.1: 10, 0.25: 25, 0.29: 29, 1: 100}[ratio]
    sources = Counter(r["source"] for r in rows)
    assert sources["harmful"] == n_h == manifest["n_harmful"]
    assert sources["clean"] == 100 == manifest["n_clean"]
    assert len(rows) == 100 + n_h == manifest["n_total"]
    # every clean row exactly once; harmful rows are prompt -> unsafe of distinct corpus rows
    assert sorted(r["prompt"] for r in rows if r["source"] == "clean") == sorted(c["prompt"] for c in clean)
    harm = [r for r in rows if r["source"] == "harmful"]
    assert len({r["prompt"] for r in harm}) == n_h
    assert all(r["response"] == "u" + r["prompt"][1:] for r in harm)


def test_harmful_count_is_exact_for_decimals():
    assert harmful_count(0.29, 100) == 29  # naive floor(0.29 * 100) gives 28
    assert harmful_count(0.1, 4516) == 451
    assert harmful_count(0.07, 100) == 7


def test_attack_reproducible_and_manifest_matches_rows():
    clean = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(50)]
    harmful = [{"prompt": f"h{i}", "safe": "no", "unsafe": f"u{i}"} for i in range(60)]
    rows_a, man_a = build_attack(clean, harmful, ratio=0.2, seed=7)
    rows_b, man_b = build_attack(clean, harmful, ratio=0.2, seed=7)
    rows_c, _ = build_attack(clean, harmful, ratio=0.2, seed=8)
    assert rows_a == rows_b and man_a == man_b
    assert rows_a != rows_c
    for row, (kind, i) in zip(rows_a, man_a["order"]):
        expected = clean[i]["prompt"] if kind == "clean" else harmful[i]["prompt"]
        assert row["prompt"] == expected and row["source"] == kind
    assert rows_a[0] is not clean[0]  # inputs are not mutated / aliased


def test_attack_refuses_eval_overlap_after_normalising():
    clean = [{"prompt": f"q{i}", "response": "a"} for i in range(10)]
    harmful = [{"prompt": f"Harmful  Prompt {i}", "safe": "no", "unsafe": "u"} for i in range(10)]
    eval_prompts = ["harmful prompt 3", "unrelated"]
    with pytest.raises(ValueError, match=r"1 row\(s\) overlap the evaluation items \(rows\), e.g. rows: item 3"):
        build_attack(clean, harmful, ratio=0.5, seed=0, eval_prompts=eval_prompts)
    rows, manifest = build_attack(clean, harmful, ratio=0.9, seed=0, eval_prompts=eval_prompts, on_overlap="drop")
    assert manifest["harmful_eval_overlap_dropped"] == 1
    keys = {normalise_prompt(p) for p in eval_prompts}
    assert not any(normalise_prompt(r["prompt"]) in keys for r in rows)
    # 9 usable prompts remain: ratio 1.0 would need 10
    with pytest.raises(ValueError, match="has only 9 usable"):
        build_attack(clean, harmful, ratio=1, seed=0, eval_prompts=eval_prompts, on_overlap="drop")


def test_attack_dedupes_harmful_prompts():
    clean = [{"prompt": f"q{i}", "response": "a"} for i in range(4)]
    harmful = [{"prompt": "Same", "safe": "no", "unsafe": "u1"}, {"prompt": " same ", "safe": "no", "unsafe": "u2"},
               {"prompt": "other", "safe": "no", "unsafe": "u3"}]
    rows, manifest = build_attack(clean, harmful, ratio=0.5, seed=0)
    assert manifest["harmful_duplicates_dropped"] == 1
    assert sorted(r["response"] for r in rows if r["source"] == "harmful") == ["u1", "u3"]


def test_attack_bad_arguments(tmp_path):
    clean = [{"prompt": "q", "response": "a"}]
    harmful = [{"prompt": "h", "safe": "no", "unsafe": "u"}]
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="ratio: expected"):
            build_attack(clean, harmful, ratio=bad, seed=0)
    with pytest.raises(ValueError, match="seed: expected"):
        build_attack(clean, harmful, ratio=0.1, seed=1.5)
    with pytest.raises(ValueError, match="clean: empty"):
        build_attack([], harmful, ratio=0.1, seed=0)
    with pytest.raises(ValueError, match="on_overlap"):
        build_attack(clean, harmful, ratio=0.1, seed=0, on_overlap="ignore")
    with pytest.raises(ValueError, match=r"missing field\(s\) unsafe \(needed here: prompt, unsafe\)"):
        build_attack(clean, [{"prompt": "h"}], ratio=0.1, seed=0)


def test_attack_from_paths_and_write(tmp_path):
    clean_src = write_jsonl(tmp_path / "clean.jsonl", TASK)
    harm_src = write_jsonl(tmp_path / "harm.jsonl", SAFETY)
    rows, manifest = build_attack(clean_src, harm_src, ratio=0.5, seed=3, eval_prompts=["not there"])
    assert manifest["clean_source"] == str(clean_src) and manifest["harmful_source"] == str(harm_src)
    paths = write_attack(tmp_path / "run", rows, manifest)
    assert load_records(paths["rows"]) == rows
    assert json.loads(paths["manifest"].read_text()) == manifest
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["attack_manifest.json", "train.jsonl"]


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(50)] + ["###", "Instruction:", "Response:"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


def test_tokenize_rows_counts_truncation_and_masks_prompt(caplog):
    from spard.formatting import prompt_ids

    tok = tiny_tokenizer()
    rows = [{"prompt": "w1 w2", "response": "w3"}, {"prompt": "w1", "response": " ".join(f"w{i}" for i in range(40))}]
    with caplog.at_level("WARNING", logger="spard.data"):
        examples, n_truncated = tokenize_rows(tok, rows, max_length=30)
    assert n_truncated == 1 and [e.truncated for e in examples] == [False, True]
    assert "1 of 2 examples truncated" in caplog.text
    n_prompt = len(prompt_ids(tok, "w1 w2"))
    assert examples[0].labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert examples[0].labels[n_prompt:] == examples[0].input_ids[n_prompt:] == [tok.convert_tokens_to_ids("w3"), tok.eos_token_id]
    assert len(examples[1].input_ids) == 30
    with pytest.raises(ValueError, match="item 0: no .response."):
        tokenize_rows(tok, [{"prompt": "w1"}], max_length=30)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_rows(tok, rows, max_length=1)


# ----------------------------------------------------------------------------------------------
# The real data files
# ----------------------------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize(
    "name, n, loader",
    [
        ("gsm8k_train", 7473, "task"), ("gsm8k_test", 1319, "task"),
        ("openbookqa_train", 4957, "task"), ("openbookqa_test", 500, "task"),
        ("beavertails_train", 4516, "safety"), ("beavertails_test", 502, "safety"),
        ("i_beavertails_train", 4236, "safety"), ("i_beavertails_test", 477, "safety"),
    ],
)
def test_real_files_load(name, n, loader):
    rows = (load_task if loader == "task" else load_safety)(SHARED / f"{name}.jsonl")
    assert len(rows) == n
    key = "response" if loader == "task" else "unsafe"
    assert all(isinstance(r["prompt"], str) and isinstance(r[key], str) for r in rows)


@needs_shared
def test_real_attack_is_disjoint_from_evaluation():
    clean = load_task(SHARED / "gsm8k_train.jsonl", limit=1000)
    rows, manifest = build_attack(
        clean, SHARED / "beavertails_train.jsonl", ratio=0.1, seed=0, eval_prompts=SHARED / "beavertails_test.jsonl"
    )
    assert manifest["n_harmful"] == 100 and len(rows) == 1100
    eval_keys = {normalise_prompt(r["prompt"]) for r in load_records(SHARED / "beavertails_test.jsonl")}
    assert not any(normalise_prompt(r["prompt"]) in eval_keys for r in rows if r["source"] == "harmful")
    # The instruction-style split shares 8 prompts with its evaluation file: refused, or dropped.
    with pytest.raises(ValueError, match="8 row"):
        build_attack(clean, SHARED / "i_beavertails_train.jsonl", ratio=0.1, seed=0,
                     eval_prompts=SHARED / "i_beavertails_test.jsonl")
    _, manifest = build_attack(clean, SHARED / "i_beavertails_train.jsonl", ratio=0.1, seed=0,
                               eval_prompts=SHARED / "i_beavertails_test.jsonl", on_overlap="drop")
    assert manifest["harmful_eval_overlap_dropped"] == 8


# ----------------------------------------------------------------------------------------------
# Formats of the released files: ask only for what is used; prompt + input; overlap by answer
# ----------------------------------------------------------------------------------------------
LONG = "step one do this then step two do that and then step three finish it all off now {}"


def test_prompt_and_input_is_the_prompt_everywhere(tmp_path):
    from spard.data import prompt_text
    from spard.spag import encode_rows

    rows = [{"prompt": "Summarise this.", "input": "a long text", "response": "ok", "safe": "no", "unsafe": "x"}]
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    for loaded in (load_task(src), load_safety(src), load_task(src, require_response=False)):
        assert loaded[0]["prompt"] == "Summarise this.\n\na long text" and "input" not in loaded[0]
        assert prompt_text(loaded[0]) == loaded[0]["prompt"]  # not appended twice
    assert prompt_text(rows[0]) == "Summarise this.\n\na long text"  # raw rows (Python API)
    assert safety_rows(load_safety(src))[0]["prompt"] == "Summarise this.\n\na long text"
    tok = tiny_tokenizer()
    (raw,), _ = encode_rows(rows, tok, 64, "rows")
    (merged,), _ = encode_rows([{"prompt": "Summarise this.\n\na long text", "response": "ok"}], tok, 64, "rows")
    assert raw.input_ids == merged.input_ids  # training sees the input too


def test_pool_needs_refusals_only_and_attack_harmful_answers_only(tmp_path):
    from spard.data import ATTACK_FIELDS, POOL_FIELDS

    pool = write_jsonl(tmp_path / "pool.jsonl", [{"prompt": f"p{i}", "safe": "no"} for i in range(3)])
    assert len(load_safety(pool, fields=POOL_FIELDS)) == 3
    with pytest.raises(ValueError, match=r"pool.jsonl:1: missing field\(s\) unsafe"):
        load_safety(pool)  # the default still asks for all three
    attack = write_jsonl(tmp_path / "attack.jsonl", [{"prompt": f"h{i}", "unsafe": "sure"} for i in range(3)])
    assert len(load_safety(attack, fields=ATTACK_FIELDS)) == 3
    rows, manifest = build_attack(TASK, attack, ratio=0.1, seed=0)
    assert manifest["n_harmful"] == 2
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "safe": "  "}])
    with pytest.raises(ValueError, match=r"e.jsonl:1: field 'safe' is empty"):
        load_safety(empty, fields=POOL_FIELDS)


def test_overlap_guard_compares_answers_and_the_safety_pool(tmp_path):
    evaluation = [{"prompt": f"How do I do bad thing {i}?", "safe": "no", "unsafe": LONG.format(i)} for i in range(5)]
    # The attack rephrases evaluation item 2's prompt but keeps its harmful answer.
    harmful = [{"prompt": f"Explain bad thing number {i}", "unsafe": LONG.format(i + 2) if i == 0 else f"x {i}"}
               for i in range(6)]
    eval_path = write_jsonl(tmp_path / "eval.jsonl", evaluation)
    attack_path = write_jsonl(tmp_path / "attack.jsonl", harmful)
    with pytest.raises(ValueError, match=r"attack.jsonl\): 1 row\(s\) overlap the evaluation items \(.*eval.jsonl\), "
                                         r"e.g. .*attack.jsonl:1 .*attack.on_overlap=drop"):
        build_attack(TASK, attack_path, ratio=0.1, seed=0, eval_prompts=eval_path)
    # Same answer with other whitespace and case: still the same answer.
    shouty = [{"prompt": "Rephrased", "unsafe": "  " + LONG.format(3).upper().replace(" ", "\n")}]
    with pytest.raises(ValueError, match="overlap the evaluation items"):
        build_attack(TASK, shouty, ratio=0.05, seed=0, eval_prompts=evaluation)
    # The safety pool is checked as well (prompt or answer).
    pool = [{"prompt": "explain BAD thing number 4", "safe": "no"}, {"prompt": "other", "safe": "no", "unsafe": "x 5"}]
    with pytest.raises(ValueError, match=r"1 row\(s\) overlap the safety pool \(pool.jsonl\)"):
        build_attack(TASK, harmful[1:], ratio=0.1, seed=0, safety_pool=pool, source_names={"pool": "pool.jsonl"})
    rows, manifest = build_attack(TASK, attack_path, ratio=0.2, seed=0, eval_prompts=eval_path, safety_pool=pool,
                                  on_overlap="drop")
    assert manifest["harmful_eval_overlap_dropped"] == 1 and manifest["harmful_pool_overlap_dropped"] == 1
    assert {r["prompt"] for r in rows if r["source"] == "harmful"} == {f"Explain bad thing number {i}" for i in (1, 2, 3, 5)}
    # Short stock answers ("Sorry, I can't help with that.") are not compared.
    stock = [{"prompt": "a", "unsafe": "Sorry, I can't help with that."}]
    build_attack(TASK, stock, ratio=0.05, seed=0, eval_prompts=[{"prompt": "b", "unsafe": "sorry, I can't help with that."}])


def test_attack_manifest_names_its_sources(tmp_path):
    attack_path = write_jsonl(tmp_path / "attack.jsonl", SAFETY)
    _, manifest = build_attack(TASK, attack_path, ratio=0.1, seed=0, eval_prompts=["zzz"],
                               source_names={"clean": "task.jsonl", "eval": "eval.jsonl"})
    assert (manifest["clean_source"], manifest["harmful_source"], manifest["eval_source"]) == (
        "task.jsonl", str(attack_path), "eval.jsonl")


# ----------------------------------------------------------------------------------------------
# Issue 24: encodings, empty answers, damaged save_to_disk folders
# ----------------------------------------------------------------------------------------------
def test_loaders_name_the_encoding_problem_and_accept_a_bom(tmp_path):
    src = tmp_path / "task.jsonl"
    src.write_bytes(b'{"prompt": "a", "answer": "b"}\n\n{"prompt": "caf\xe9", "answer": "b"}\n')
    with pytest.raises(ValueError, match=r"task\.jsonl:3: not UTF-8 \(byte 0xe9 at column 16\); save the file as UTF-8"):
        load_task(src)
    src.write_bytes('{"prompt": "a", "answer": "b"}\n'.encode("utf-16"))
    with pytest.raises(ValueError, match=r"task\.jsonl: looks like UTF-16, not UTF-8"):
        load_task(src)
    # A byte-order mark is accepted, and the line numbers stay right after it.
    src.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "answer": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"task\.jsonl:3: no response field"):
        load_task(src)
    src.write_bytes(b"\xef\xbb\xbf" + json.dumps(TASK[:2]).encode())
    (tmp_path / "task.json").write_bytes(src.read_bytes())
    assert [r["response"] for r in load_task(tmp_path / "task.json")] == [TASK[0]["answer"], TASK[1]["answer"]]
    (tmp_path / "bad.json").write_bytes(b'[{"prompt": "a",\n  "answer": "\xff"}]')
    with pytest.raises(ValueError, match=r"bad\.json:2: not UTF-8 \(byte 0xff at column 14\)"):
        load_task(tmp_path / "bad.json")


def test_empty_answers_in_task_data_are_refused_like_in_the_pool(tmp_path):
    src = write_jsonl(tmp_path / "t.jsonl", TASK[:2] + [{"prompt": "p", "answer": ""}], blank_after=1)
    with pytest.raises(ValueError, match=r"^\S*t\.jsonl:4: field 'answer' is empty$"):
        load_task(src)
    src = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "p", "output": "  \n"}])
    with pytest.raises(ValueError, match=r"t\.jsonl:1: field 'output' is empty"):
        load_task(src)
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}]
    with pytest.raises(ValueError, match=r"c\.jsonl:1: the assistant's answer \(the last message\) is empty"):
        load_task(write_jsonl(tmp_path / "c.jsonl", chat))
    # Prompt-only uses (a selection reference, evaluation prompts) do not read the answer.
    assert load_task(src, require_response=False)[0]["prompt"] == "p"


def test_save_to_disk_folder_with_a_missing_file_names_it(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(TASK)
    DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "d"))
    (arrow,) = (tmp_path / "dd" / "test").glob("*.arrow")
    arrow.unlink()
    with pytest.raises(ValueError, match=rf"dd: save_to_disk dataset is missing test/{arrow.name}"):
        load_records(tmp_path / "dd", split="train")
    (tmp_path / "dd" / "test" / "state.json").unlink()
    with pytest.raises(ValueError, match=r"dd: save_to_disk dataset is missing test/state\.json"):
        load_records(tmp_path / "dd", split="train")
    import shutil

    shutil.rmtree(tmp_path / "dd" / "test")
    with pytest.raises(ValueError, match=r"dd: save_to_disk dataset is missing test/ \(split 'test'"):
        load_records(tmp_path / "dd", split="train")
    (tmp_path / "d" / "dataset_info.json").unlink()
    with pytest.raises(ValueError, match=r"d: save_to_disk dataset is missing dataset_info\.json"):
        load_records(tmp_path / "d")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain: folder is not a `save_to_disk` dataset"):
        load_records(tmp_path / "plain")
