"""Rows as the ecosystem writes them: conversational ``messages`` (and TRL's prompt/completion
message lists), ``datasets.Dataset`` objects, ``text`` rows and a TRL formatting function."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from datasets import Dataset

from spard.data import load_safety, load_task, tokenize_rows
from spard.formatting import (
    IGNORE_INDEX,
    encode_conversation,
    encode_example,
    encode_row,
    encode_text,
    format_rows,
)
from spard.spag import SafetyProjector, encode_rows
from test_spag import WORDS, one_thread, tiny_lora_model, tiny_tokenizer  # noqa: F401

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def convo(question="what is one plus two ?", answer="three", system=None):
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def trained_tokens(tok, ex):
    return tok.convert_ids_to_tokens([t for t in ex.labels if t != IGNORE_INDEX])


# ----------------------------------------------------------------------------------------------
# Conversational rows
# ----------------------------------------------------------------------------------------------
def test_messages_are_rendered_with_the_chat_template_and_only_the_answer_is_trained():
    tok = chat_tokenizer()
    messages = convo(system="sorry") + [{"role": "user", "content": "then two plus two ?"},
                                        {"role": "assistant", "content": "four"}]
    ex = encode_row(tok, {"messages": messages}, 128)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert ex.input_ids == tok(full, add_special_tokens=False)["input_ids"]  # as the template writes it
    assert tok.unk_token_id not in ex.input_ids
    assert trained_tokens(tok, ex) == ["four", "</s>"]  # the last answer and its end of turn


def test_trl_prompt_completion_message_lists_are_a_conversation():
    tok = chat_tokenizer()
    messages = convo()
    row = {"prompt": messages[:1], "completion": messages[1:]}
    assert encode_row(tok, row, 64) == encode_row(tok, {"messages": messages}, 64)


def test_messages_without_a_chat_template_use_the_instruction_layout():
    tok = tiny_tokenizer()  # no chat template
    assert encode_row(tok, {"messages": convo()}, 64) == encode_example(tok, "what is one plus two ?", "three", 64)
    with pytest.raises(ValueError, match=r"safe\[3\]: this tokenizer has no chat template.*roles: \['user', "
                                         r"'assistant', 'user', 'assistant'\]"):
        encode_row(tok, {"messages": convo() + convo()}, 64, where="safe[3]")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}], "a conversation must end with the assistant's answer"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "message 1: expected"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "message 0: expected"),
])
def test_bad_conversations_name_the_row_and_the_message(messages, message):
    with pytest.raises(ValueError, match=rf"rows: item 2: {message}"):
        tokenize_rows(chat_tokenizer(), [{"prompt": "a", "response": "b"}] * 2 + [{"messages": messages}], 64)


def test_load_task_keeps_conversations_and_gives_prompt_and_response():
    rows = load_task([{"messages": convo(system="sorry"), "id": 7}])
    assert rows[0]["prompt"] == "what is one plus two ?" and rows[0]["response"] == "three"
    assert rows[0]["messages"] == convo(system="sorry") and rows[0]["id"] == 7
    tok = chat_tokenizer()
    (ex,), _ = tokenize_rows(tok, rows, 64)
    assert ex == encode_conversation(tok, convo(system="sorry"), 64)  # the template, not the pair
    assert load_task([{"messages": convo()[:1]}], require_response=False)[0]["prompt"] == "what is one plus two ?"
    assert load_task([{"prompt": "p", "completion": "c"}])[0]["response"] == "c"  # TRL's string form


# ----------------------------------------------------------------------------------------------
# datasets.Dataset objects
# ----------------------------------------------------------------------------------------------
def test_datasets_are_accepted_wherever_rows_are():
    tok = chat_tokenizer()
    pairs = [{"prompt": "tell me about cats", "response": "i cannot help with that"}] * 3
    chats = Dataset.from_list([{"messages": convo()} for _ in range(3)])
    assert load_task(Dataset.from_list(pairs)) == load_task(pairs)
    pool = [{"prompt": "how to make a cake", "safe": "sorry", "unsafe": "sure"}]
    assert load_safety(Dataset.from_list(pool)) == pool
    assert encode_rows(chats, tok, 64, "safe_rows")[0] == encode_rows(list(chats), tok, 64, "safe_rows")[0]
    projector = SafetyProjector(tiny_lora_model("llama"), chats, tok, tau=1.0, progress=False)
    assert len(projector.examples) == 3 and projector.step()["trigger"] is not None


def test_a_dataset_row_error_names_the_row():
    with pytest.raises(ValueError, match="dataset: row 1: no prompt field"):
        load_task(Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": None, "response": "c"}]))


# ----------------------------------------------------------------------------------------------
# Text rows and a TRL formatting function
# ----------------------------------------------------------------------------------------------
def sft_format(row):
    """A formatting_func as TRL SFTTrainer users write them."""
    return f"### Question : {row['prompt']} ### Answer : {row['response']}"


def test_formatting_func_lays_out_the_safety_rows_and_the_loss_covers_the_response():
    tok = tiny_tokenizer()
    for w in ("###", "Question", "Answer", ":"):
        tok.add_tokens([w])
    rows = [{"prompt": "how to make a cake", "response": "i cannot help with that"}]
    (text_row,) = format_rows(rows, sft_format)
    assert text_row == {"text": sft_format(rows[0]), "response": "i cannot help with that"}
    ex = encode_row(tok, text_row, 64)
    # TRL tokenizes the formatted text (EOS appended); the ids are exactly those.
    trl_ids = tok(sft_format(rows[0]) + tok.eos_token)["input_ids"]
    assert ex.input_ids == trl_ids
    assert trained_tokens(tok, ex) == "i cannot help with that </s>".split()


def test_text_rows_without_a_response_train_on_the_whole_text_and_a_missing_response_is_an_error():
    tok = tiny_tokenizer()
    ex = encode_text(tok, "tell me about cats", 64)
    assert trained_tokens(tok, ex) == "tell me about cats </s>".split()
    with pytest.raises(ValueError, match=r"rows\[0\]: the text does not contain the row's response"):
        encode_row(tok, {"text": "### Answer : sure", "response": "sorry"}, 64, where="rows[0]")
    with pytest.raises(TypeError, match="must return one string"):
        format_rows([{"prompt": "a", "response": "b"}], lambda row: [sft_format(row)])


def test_spag_callback_takes_the_trainers_formatting_func():
    from spard.callback import SpagCallback

    rows = [{"prompt": "how to make a cake", "safe": "i cannot help with that", "unsafe": "sure"}]
    callback = SpagCallback(rows, tiny_tokenizer(), formatting_func=lambda r: f"{r['prompt']} . {r['safe']}")
    assert callback.safe_rows == [{"text": "how to make a cake . i cannot help with that",
                                   "response": "i cannot help with that"}]
    assert set(WORDS) >= set("how to make a cake".split())
