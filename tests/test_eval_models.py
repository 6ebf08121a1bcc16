"""Generation, adapter loading, model judges and `spard eval` on tiny models built from configs."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from spard.cli import main as spard_main
from spard.eval import (
    AdapterError,
    GuardJudge,
    ModerationJudge,
    evaluate,
    generate,
    load_generations,
    load_model,
)
from spard.eval.judges import parse_guard_reply
from spard.formatting import prompt_ids

PROMPTS = ["hi", "tell me a story about a cat", "2+2?", "a somewhat longer prompt with more words in it", "ok"]


def byte_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: any text, 259 ids, built locally."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_config(hidden=64, layers=2, **kw) -> LlamaConfig:
    # A large init range makes the random model's outputs depend on its input.
    return LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.5, **kw)


def tiny_lm(seed=0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


@torch.no_grad()
def reference_greedy(model, ids: list[int], n: int, eos: set[int] = frozenset()) -> list[int]:
    """Plain greedy decoding: full forward pass per token, one prompt, no padding, no cache."""
    x = torch.tensor([ids])
    out = []
    for _ in range(n):
        tok = int(model(input_ids=x).logits[0, -1].argmax())
        if tok in eos:
            break
        out.append(tok)
        x = torch.cat([x, torch.tensor([[tok]])], dim=1)
    return out


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_batched_left_padded_greedy_matches_reference(lm, tok):
    lm.generation_config.eos_token_id = None
    got = generate(lm, tok, PROMPTS, max_new_tokens=6, batch_size=3, progress=False)
    want = [tok.decode(reference_greedy(lm, prompt_ids(tok, p), 6), skip_special_tokens=True).strip()
            for p in PROMPTS]
    assert got == want
    assert len(set(got)) > 1  # the outputs do depend on the prompt


def test_generation_stops_at_eos(lm, tok):
    ref = reference_greedy(lm, prompt_ids(tok, PROMPTS[1]), 6)
    stop = ref[2]  # declare the model's third token an end-of-turn token
    lm.generation_config.eos_token_id = [tok.eos_token_id, stop]
    try:
        got = generate(lm, tok, PROMPTS, max_new_tokens=6, batch_size=5, progress=False)
        for p, g in zip(PROMPTS, got):
            want = reference_greedy(lm, prompt_ids(tok, p), 6, eos={stop, tok.eos_token_id})
            assert g == tok.decode(want, skip_special_tokens=True).strip()
        assert got[1] == tok.decode(ref[:2]).strip()
    finally:
        lm.generation_config.eos_token_id = None


def test_chat_template_is_used(lm):
    chat = byte_tokenizer("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}<|assistant|>")
    lm.generation_config.eos_token_id = None
    got = generate(lm, chat, ["hi"], max_new_tokens=4, progress=False)
    ids = prompt_ids(chat, "hi")
    assert chat.decode(ids).endswith("<|user|>hi<|assistant|>")
    assert got == [chat.decode(reference_greedy(lm, ids, 4), skip_special_tokens=True).strip()]


def test_generation_argument_checks(lm, tok):
    with pytest.raises(TypeError, match="do_sample must be a bool"):
        generate(lm, tok, ["hi"], max_new_tokens=2, do_sample="False")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(lm, tok, ["hi"], max_new_tokens=0)
    with pytest.raises(TypeError, match="not a single string"):
        generate(lm, tok, "hi", max_new_tokens=2)
    torch.manual_seed(0)
    sampled = generate(lm, tok, ["hi", "hi"], max_new_tokens=8, do_sample=True, progress=False)
    assert len(sampled) == 2


# ------------------------------------------------------------------------------------- adapters
def _save_base(path, **kw):
    model = tiny_lm(**kw)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return model


def _save_adapter(base, path, seed=1):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained-looking adapter (B = 0 would change nothing)
    peft_model.save_pretrained(path)
    return peft_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    base = _save_base(root / "base")
    adapted = _save_adapter(tiny_lm(), root / "adapter")
    other = _save_adapter(tiny_lm(hidden=32), root / "adapter_hidden32")
    deeper = _save_adapter(tiny_lm(layers=3), root / "adapter_3layers")
    del base, other, deeper
    return root, adapted


def test_adapter_is_loaded_and_merged(saved, tok):
    root, adapted = saved
    model, tokenizer = load_model(str(root / "base"), str(root / "adapter"), device="cpu", dtype="float32")
    x = torch.tensor([prompt_ids(tok, "hello")])
    with torch.no_grad():
        want = adapted.eval()(input_ids=x).logits
        got = model(input_ids=x).logits
        plain = tiny_lm()(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter does change the model


def test_adapter_tokenizer_and_base_name_warning(saved, tmp_path, caplog):
    import shutil

    root, _ = saved
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/other-base"}))
    byte_tokenizer("{{ messages[0]['content'] }}").save_pretrained(adapter)
    with caplog.at_level("WARNING", logger="spard.eval.generate"):
        _, tokenizer = load_model(str(root / "base"), str(adapter), device="cpu")
    assert "trained on 'org/other-base'" in caplog.text
    assert tokenizer.chat_template == "{{ messages[0]['content'] }}"  # the tokenizer training saved


def test_adapter_errors_name_the_problem(saved, tmp_path):
    root, _ = saved
    base = str(root / "base")
    with pytest.raises(AdapterError, match="adapter not found"):
        load_model(base, str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_model(base, str(tmp_path / "empty"), device="cpu")
    with pytest.raises(AdapterError, match=r"another base model.*takes 64 inputs here, the adapter expects 32"):
        load_model(base, str(root / "adapter_hidden32"), device="cpu")
    with pytest.raises(AdapterError, match=r"another base model.*model.layers.2.self_attn.q_proj"):
        load_model(base, str(root / "adapter_3layers"), device="cpu")


# --------------------------------------------------------------------------------- model judges
@torch.no_grad()
def test_moderation_judge_matches_unbatched_reference(tok):
    torch.manual_seed(0)
    for problem, labels in (("multi_label_classification", 3), ("single_label_classification", 2)):
        clf = LlamaForSequenceClassification(tiny_config(num_labels=labels, problem_type=problem)).eval()
        judge = ModerationJudge(clf, tok, batch_size=2, device="cpu")
        prompts, responses = ["q1", "question two", "q3"], ["short", "a longer response here", ""]
        probs = judge.probabilities(prompts, responses)
        for p, r, got in zip(prompts, responses, probs):
            ids = tok(judge.template.format(prompt=p, response=r), return_tensors="pt")
            logits = clf(**ids).logits[0]
            want = torch.sigmoid(logits).max() if problem.startswith("multi") else torch.softmax(logits, -1)[1]
            assert got == pytest.approx(float(want), abs=1e-5)
        verdicts = judge.judge(prompts, responses)
        assert [v.harmful for v in verdicts] == [p > 0.5 for p in probs]
        assert judge.hs_kind == "percent_flagged"


def test_guard_judge_plumbing(lm, tok):
    lm.generation_config.eos_token_id = None
    judge = GuardJudge(lm, tok, batch_size=2, max_new_tokens=3, device="cpu")
    prompts, responses = ["q1", "q2", "q3"], ["r1", "a longer r2", "r3"]
    verdicts = judge.judge(prompts, responses)
    for p, r, v in zip(prompts, responses, verdicts):
        want = tok.decode(reference_greedy(lm, judge._ids(p, r), 3), skip_special_tokens=True).strip()
        assert v.reply == want and v.harmful == parse_guard_reply(want)
    assert parse_guard_reply("unsafe\nS1") is True and parse_guard_reply(" safe") is False
    assert parse_guard_reply("unsure") is None and parse_guard_reply("safety first") is None


# ------------------------------------------------------------------------------------ evaluate
def test_evaluate_writes_generations(lm, tok, tmp_path):
    lm.generation_config.eos_token_id = None
    rows = [{"prompt": "1+1?", "answer": "#### 2"}, {"prompt": "2+2?", "answer": "#### 4"}]
    res = evaluate(lm, tok, safety_prompts=["p1", "p2", "p3"], task_rows=rows, max_new_tokens=3,
                   task_max_new_tokens=3, batch_size=2, out_dir=tmp_path)
    assert res["safety"]["n"] == 3 and res["task"]["task"] == "gsm8k" and res["task"]["n"] == 2
    saved = load_generations(tmp_path / "safety_generations.jsonl")
    assert [r["prompt"] for r in saved] == ["p1", "p2", "p3"] and all("harmful" in r for r in saved)
    again = evaluate(None, None, safety_prompts=["p1", "p2", "p3"],
                     safety_responses=[r["response"] for r in saved])
    assert again["safety"]["asr"] == res["safety"]["asr"]
    with pytest.raises(ValueError, match="no 'target_answer'"):
        evaluate(lm, tok, task_rows=rows, task="openbookqa")


# ------------------------------------------------------------------------------------ spard eval
def test_spard_eval_on_real_formats(saved, shared_data, tmp_path, capsys):
    root, _ = saved
    out = tmp_path / "eval"
    common = ["eval", "--model", str(root / "base"), "--adapter", str(root / "adapter"), "--device", "cpu",
              "--out", str(out), "--batch-size", "4"]
    rc = spard_main(common + ["--safety-data", str(shared_data / "beavertails_test.jsonl"), "--n-safety", "4",
                              "--task-data", str(shared_data / "gsm8k_test.jsonl"), "--n-task", "3",
                              "--max-new-tokens", "4", "--task-max-new-tokens", "4"])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["safety"]["n"] == 4 and 0.0 <= result["safety"]["asr"] <= 1.0
    assert result["safety"]["judge"]["name"] == "refusal"
    assert result["task"]["task"] == "gsm8k" and result["task"]["n"] == 3
    assert "| ASR (%) |" in (out / "eval.md").read_text()
    assert len(load_generations(out / "task_generations.jsonl")) == 3
    assert "safety prompts" in capsys.readouterr().err  # bars by default
    # Judging again reuses the saved responses; no model needed.
    rc = spard_main(["eval", "--out", str(out), "--rejudge", "--safety-data",
                     str(shared_data / "beavertails_test.jsonl"), "--n-safety", "4"])
    assert rc == 0 and json.loads((out / "eval.json").read_text())["safety"]["asr"] == result["safety"]["asr"]
    obqa = tmp_path / "obqa"
    capsys.readouterr()
    rc = spard_main(["eval", "--model", str(root / "base"), "--device", "cpu", "--out", str(obqa),
                     "--task-data", str(shared_data / "openbookqa_test.jsonl"), "--n-task", "2",
                     "--task-max-new-tokens", "3", "--no-progress"])
    assert rc == 0 and json.loads((obqa / "eval.json").read_text())["task"]["task"] == "openbookqa"
    assert "prompts" not in capsys.readouterr().err


def test_spard_eval_fails_before_generating(saved, tmp_path, capsys, monkeypatch):
    root, _ = saved
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "p1"}\n{"prompt": "p2"}\n')
    out = tmp_path / "out"
    base = ["eval", "--model", str(root / "base"), "--device", "cpu", "--out", str(out), "--safety-data", str(data)]
    assert spard_main(base + ["--adapter", str(tmp_path / "missing")]) == 2
    assert "adapter not found" in capsys.readouterr().err
    assert spard_main(base + ["--adapter", str(root / "adapter_hidden32")]) == 2
    assert "another base model" in capsys.readouterr().err
    monkeypatch.setenv("SPARD_TEST_KEY", "x")
    rc = spard_main(base + ["--judge", "rubric", "--judge-model", "m", "--judge-api-key-env", "SPARD_TEST_KEY",
                            "--judge-base-url", "http://127.0.0.1:9/v1", "--judge-retries", "0"])
    assert rc == 2 and "cannot reach the rubric judge" in capsys.readouterr().err
    assert not (out / "safety_generations.jsonl").exists()


def test_spard_eval_with_a_saved_moderation_model(tmp_path, tok, capsys):
    from spard.eval import save_generations

    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(tiny_config(num_labels=3, problem_type="multi_label_classification"))
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    prompts, responses = ["q1", "q2", "q3"], ["r1", "a longer r2", "r3"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out"
    save_generations(out / "safety_generations.jsonl", prompts, responses)
    capsys.readouterr()
    rc = spard_main(["eval", "--rejudge", "--out", str(out), "--safety-data", str(data), "--device", "cpu",
                     "--judge", "moderation", "--judge-model", str(tmp_path / "clf"), "--no-progress"])
    assert rc == 0 and "moderation:" not in capsys.readouterr().err
    want = ModerationJudge(clf.eval(), tok, device="cpu").probabilities(prompts, responses)
    flagged = sum(p > 0.5 for p in want)
    s = json.loads((out / "eval.json").read_text())["safety"]
    assert s["harmful"] == flagged and s["hs"] == pytest.approx(100 * flagged / 3)
    saved = load_generations(out / "safety_generations.jsonl")
    assert [r["score"] for r in saved] == pytest.approx(want, abs=1e-5)
    assert spard_main(["eval", "--rejudge", "--out", str(out), "--safety-data", str(data), "--judge", "moderation",
                       "--judge-model", str(tmp_path / "missing")]) == 2


def test_spard_eval_with_several_judges_side_by_side(tmp_path, tok, capsys):
    from spard.eval import RefusalJudge, save_generations
    from spard.eval.agreement import cohen_kappa

    torch.manual_seed(0)
    clf = LlamaForSequenceClassification(tiny_config(num_labels=3, problem_type="multi_label_classification"))
    clf.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    prompts = ["q1", "q2", "q3", "q4"]
    responses = ["I'm sorry, I cannot help with that.", "Sure, here is how.", "Step one, then two.", "No way, I won't."]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out"
    save_generations(out / "safety_generations.jsonl", prompts, responses)
    rc = spard_main(["eval", "--rejudge", "--out", str(out), "--safety-data", str(data), "--device", "cpu",
                     "--judges", f"refusal,moderation={tmp_path / 'clf'}"])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    keyword = [v.harmful for v in RefusalJudge().judge(prompts, responses)]
    moderation = [p > 0.5 for p in ModerationJudge(clf.eval(), tok, device="cpu").probabilities(prompts, responses)]
    j = result["judges"]
    assert result["safety"]["judge"]["name"] == "refusal" and result["safety"]["harmful"] == sum(keyword) == 2
    assert j["asr"]["refusal"]["asr"] == 0.5 and j["asr"]["moderation"]["harmful"] == sum(moderation)
    pair = j["pairs"][0]
    assert (pair["a"], pair["b"]) == ("refusal", "moderation") and pair["n"] == 4
    assert pair["kappa"] == cohen_kappa(keyword, moderation)["kappa"]
    assert pair["disagreements"] == sum(k != m for k, m in zip(keyword, moderation))
    saved = load_generations(out / "safety_generations.jsonl")
    assert [r["judges"] for r in saved] == [{"refusal": k, "moderation": m} for k, m in zip(keyword, moderation)]
    assert "Cohen's kappa" in (out / "eval.md").read_text()
    capsys.readouterr()
    for bad, msg in (("refusal", "at least two judges"), ("refusal,nope", "unknown judge 'nope'"),
                     ("refusal,moderation", "the moderation judge needs a model")):
        assert spard_main(["eval", "--rejudge", "--out", str(out), "--safety-data", str(data), "--judges", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
