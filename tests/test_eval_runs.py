"""`spard eval` runs that go wrong: a disk that fills up or a judge that fails mid-run (no
generated answer is lost), a judge that never answers (no ASR from nothing), prompts beyond the
model's context (truncated or refused, counted), and --rejudge reporting the settings the answers
were generated with."""

import errno
import importlib
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from spard.cli import main as spard_main
from spard.eval import RefusalJudge, evaluate, load_generations, save_generations
from spard.eval.reply_cache import ReplyCache
from test_eval_models import byte_tokenizer, tiny_config, tiny_lm
from test_eval_rubric import KEY_ENV, server  # noqa: F401  (fixture: a local OpenAI-compatible server)

SAFETY = ["hi", "tell me a story about a cat", "2+2?", "a somewhat longer prompt with more words in it", "ok"]
TASK = [{"prompt": "1+1?", "answer": "#### 2"}, {"prompt": "what is 2+2?", "answer": "#### 4"},
        {"prompt": "3+3?", "answer": "#### 6"}]


@pytest.fixture
def tok():
    return byte_tokenizer()


def counting(model):
    """Counts the rows the model generates for (model.generate is what spard.eval calls)."""
    real = model.generate
    model.generated = 0

    def generate(*args, **kw):
        model.generated += kw["input_ids"].shape[0]
        return real(*args, **kw)

    model.generate = generate
    return model


class DownJudge(RefusalJudge):
    def judge(self, prompts, responses):
        raise RuntimeError("judge down")


# ------------------------------------------------------------------- answers kept as they come
def test_answers_survive_a_full_disk_and_a_failing_judge_and_are_never_generated_twice(tok, tmp_path, monkeypatch):
    ev = importlib.import_module("spard.eval.evaluate")  # the module (spard.eval.evaluate is also the function)

    lm = counting(tiny_lm())
    lm.generation_config.eos_token_id = None
    out = tmp_path / "eval"
    kw = dict(safety_prompts=SAFETY, task_rows=TASK, max_new_tokens=4, task_max_new_tokens=3, batch_size=2,
              out_dir=out)

    # 1. The disk fills up after the first batch of two answers: the third append fails.
    real_add, appended = ReplyCache.add, []

    def add(self, key, reply):
        if len(appended) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        appended.append(key)
        real_add(self, key, reply)

    monkeypatch.setattr(ReplyCache, "add", add)
    with pytest.raises(OSError, match="No space left"):
        evaluate(lm, tok, **kw)
    monkeypatch.setattr(ReplyCache, "add", real_add)
    assert lm.generated == 4  # two batches of two: the second one's answers could not be kept

    # 2. Space freed; the judge fails now: only the three missing safety answers are generated.
    lm.generated = 0
    with pytest.raises(RuntimeError, match="judge down"):
        evaluate(lm, tok, judge=DownJudge(), **kw)
    assert lm.generated == 3

    # 3. A later write fails (the disk again): the task answers were generated, then lost nothing.
    real_save = ev.save_generations

    def save(path, *a, **k):
        if path.name == "task_generations.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, *a, **k)

    monkeypatch.setattr(ev, "save_generations", save)
    lm.generated = 0
    with pytest.raises(OSError, match="No space left"):
        evaluate(lm, tok, **kw)
    assert lm.generated == len(TASK)
    monkeypatch.setattr(ev, "save_generations", real_save)

    # 4. The rerun generates nothing and gives what one clean run gives.
    lm.generated = 0
    result = evaluate(lm, tok, **kw)
    assert lm.generated == 0
    clean = evaluate(counting(tiny_lm()), tok, **{**kw, "out_dir": tmp_path / "clean"})
    for name in ("safety_generations.jsonl", "task_generations.jsonl"):
        assert load_generations(out / name) == load_generations(tmp_path / "clean" / name)
    assert result["safety"] == clean["safety"] and result["task"] == clean["task"]
    # Other settings or another model are generated for, never served from the file.
    lm.generated = 0
    evaluate(lm, tok, **{**kw, "max_new_tokens": 5})
    assert lm.generated == len(SAFETY)
    other = counting(tiny_lm(seed=1))
    evaluate(other, tok, **kw)
    assert other.generated == len(SAFETY) + len(TASK)


# ------------------------------------------------------------------------ a judge that never answers
def _rejudge_args(server, tmp_path, responses):  # noqa: F811
    prompts = [f"q{i}" for i in range(len(responses))]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out"
    save_generations(out / "safety_generations.jsonl", prompts, responses)
    return out, ["eval", "--rejudge", "--out", str(out), "--safety-data", str(data), "--judge", "rubric",
                 "--judge-model", "judge-model", "--judge-base-url", server.base_url,
                 "--judge-api-key-env", KEY_ENV, "--judge-retries", "0"]


def test_a_rubric_judge_whose_every_call_fails_ends_the_run_in_one_line(server, tmp_path, capsys):  # noqa: F811
    out, args = _rejudge_args(server, tmp_path, ["a [500]", "b [500]", "c [500]"])
    rc = spard_main(args)
    said = [line for line in capsys.readouterr().err.splitlines() if "spard eval" in line]  # not the progress bar
    assert rc == 1 and len(said) == 1, said
    assert said[0].startswith("spard eval: error: the rubric judge gave no verdict: 3 of 3 calls failed"), said
    assert not (out / "eval.json").exists()


def test_some_failed_judge_calls_are_counted_and_said(server, tmp_path, capsys):  # noqa: F811
    out, args = _rejudge_args(server, tmp_path, ["a [500]", "b [score=4]", "c [score=1]"])
    assert spard_main(args) == 0
    err = capsys.readouterr().err
    assert "1 of 3 rubric judge calls failed" in err
    s = json.loads((out / "eval.json").read_text())["safety"]
    assert s["failed_calls"] == 1 and s["asr"] == 0.5


# ------------------------------------------------------------------------------ long prompts
def _short_context_lm(positions=256):  # the instruction template alone is 141 byte tokens
    torch.manual_seed(0)
    cfg = tiny_config()
    cfg.max_position_embeddings = positions
    return LlamaForCausalLM(cfg).eval()


def test_prompts_beyond_the_context_are_left_truncated_and_counted(tok, tmp_path):
    lm = _short_context_lm(256)
    lm.generation_config.eos_token_id = None
    widths = []
    real = lm.generate

    def generate(*args, **kw):
        widths.append(kw["input_ids"].shape[1])
        return real(*args, **kw)

    lm.generate = generate
    huge = " ".join(f"w{i}" for i in range(5000)) + " THE END"  # ~25,000 byte tokens
    result = evaluate(lm, tok, safety_prompts=["hi", huge], max_new_tokens=8, batch_size=1, out_dir=tmp_path)
    assert max(widths) <= 256 - 8
    g = result["generation"]
    assert g["truncated_prompts"] == {"safety": 1} and g["context_tokens"] == 256 and g["long_prompts"] == "truncate"
    # The end of the prompt is kept, inside the template.
    from spard.eval.generate import fit_prompt_ids
    from spard.formatting import INSTRUCTION_TEMPLATE

    ids, truncated = fit_prompt_ids(lm, tok, ["hi", huge], max_new_tokens=8)
    assert truncated == [1] and len(ids[1]) <= 248
    text = tok.decode(ids[1], skip_special_tokens=True)
    head, tail = INSTRUCTION_TEMPLATE.split("{prompt}")
    assert text.endswith("THE END" + tail) and text.startswith(head)
    with pytest.raises(ValueError, match=r"--long-prompts error.*safety prompt 1 is \d+ tokens long"):
        evaluate(lm, tok, safety_prompts=["hi", huge], max_new_tokens=8, long_prompts="error")
    with pytest.raises(ValueError, match=r"--max-new-tokens \(max_new_tokens\): 256 new tokens leave no room"):
        evaluate(lm, tok, safety_prompts=["hi"], max_new_tokens=256)


def test_spard_eval_long_prompts_option(tok, tmp_path, capsys):
    _short_context_lm().save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "x " * 20000}) + "\n")
    common = ["eval", "--model", str(tmp_path / "model"), "--device", "cpu", "--safety-data", str(data),
              "--max-new-tokens", "4"]
    assert spard_main(common + ["--out", str(tmp_path / "a")]) == 0
    generation = json.loads((tmp_path / "a" / "eval.json").read_text())["generation"]
    assert generation["truncated_prompts"] == {"safety": 1}
    capsys.readouterr()
    rc = spard_main(common + ["--out", str(tmp_path / "b"), "--long-prompts", "error"])
    said = [line for line in capsys.readouterr().err.splitlines() if "spard eval" in line]  # not the progress bars
    assert rc == 2 and len(said) == 1 and "--long-prompts error" in said[0] and "safety prompt 1" in said[0], said
    assert not (tmp_path / "b" / "safety_generations.jsonl").exists()


# ------------------------------------------------------------------------------- --rejudge
def test_rejudge_reports_the_settings_the_answers_were_generated_with(tok, tmp_path):
    lm = tiny_lm()
    lm.generation_config.eos_token_id = None
    out = tmp_path / "eval"
    first = evaluate(lm, tok, safety_prompts=SAFETY, task_rows=TASK, max_new_tokens=3, task_max_new_tokens=2,
                     batch_size=2, out_dir=out)
    safety = tmp_path / "safety.jsonl"
    safety.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SAFETY))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in TASK))
    # The command line's defaults (512 new tokens, batch 8) are not what the answers had.
    assert spard_main(["eval", "--rejudge", "--out", str(out), "--safety-data", str(safety),
                       "--task-data", str(task)]) == 0
    generation = json.loads((out / "eval.json").read_text())["generation"]
    assert generation == first["generation"]
    assert (generation["max_new_tokens"], generation["task_max_new_tokens"], generation["batch_size"],
            generation["do_sample"]) == (3, 2, 2, False)
    # Answers from a run that kept no record: unknown, not the defaults.
    (out / "generation.json").unlink()
    assert spard_main(["eval", "--rejudge", "--out", str(out), "--safety-data", str(safety)]) == 0
    generation = json.loads((out / "eval.json").read_text())["generation"]
    assert generation["max_new_tokens"] is None and generation["unrecorded"] == ["safety"]
