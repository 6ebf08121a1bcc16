"""How a row becomes model input.

The model's chat template is used when its tokenizer has one; otherwise the instruction template
below (the Alpaca layout most fine-tuning-attack papers use). Labels are -100 on the prompt so
the loss covers the response tokens only. Training, evaluation and the synthetic world all go
through these functions, so a model is always prompted the way it was trained.

Rows (``encode_row``), in the shapes the ecosystem writes them:
- ``prompt`` + ``response`` (or ``safe`` / ``completion``): strings;
- conversational: ``messages``, a list of ``{"role", "content"}`` ending with the assistant's
  answer (TRL, chat datasets), or TRL's ``prompt`` + ``completion`` as message lists. Rendered
  with the tokenizer's chat template; the loss covers the last assistant turn as the template
  writes it (its end-of-turn tokens included);
- ``text``: a whole training text (TRL's language-modelling rows, or the output of a TRL
  ``formatting_func``, see ``format_rows``); with a ``response`` field the loss covers the last
  occurrence of the response in the text and what follows, else the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

IGNORE_INDEX = -100

INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)


# How a prompt/response row is laid out for training (a row's optional ``layout`` field; the
# adaptive attacker varies it, since a defense tuned on one layout may lose its effect on
# another): "chat", the model's chat template (the instruction template when it has none);
# "plain", the instruction template whatever the model has; "none", prompt and response on two
# lines with no template. Evaluation always prompts with render_prompt.
LAYOUTS = ("chat", "plain", "none")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees before its answer (generation starts right after it)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return INSTRUCTION_TEMPLATE.format(prompt=prompt)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the rendered prompt, with BOS when the tokenizer uses one and the chat
    template did not already add it."""
    return _ids_with_bos(tokenizer, render_prompt(tokenizer, prompt))


def _ids_with_bos(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + ids if _needs_bos(tokenizer, text, ids) else ids


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS first by itself (with its special tokens). Asked of the
    tokenizer, not read from ``add_bos_token``: transformers 4.x sets that attribute on some
    tokenizer classes only (a PreTrainedTokenizerFast has none), so reading it with a default
    gave a BOS under 4.x that 5.x, and the tokenizer itself, leave out."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _needs_bos(tokenizer, text: str, ids: Sequence[int]) -> bool:
    """BOS goes first when the tokenizer uses one and neither the ids nor a chat template's text
    already start with it."""
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and _adds_bos(tokenizer):
        return not (has_chat_template(tokenizer) and tokenizer.bos_token and text.startswith(tokenizer.bos_token))
    return False


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_example(tokenizer, prompt: str, response: str, max_length: int) -> EncodedExample:
    """Prompt + response + EOS, labels masked on the prompt, cut to ``max_length`` tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    p = prompt_ids(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r = r + [tokenizer.eos_token_id]
    return _cut(p + r, [IGNORE_INDEX] * len(p) + r, max_length)


def _cut(ids: list[int], labels: list[int], max_length: int) -> EncodedExample:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    return EncodedExample(ids[:max_length], labels[:max_length], len(ids) > max_length)


# ----------------------------------------------------------------------------------------------
# Rows in the ecosystem's shapes
# ----------------------------------------------------------------------------------------------
RESPONSE_KEYS = ("response", "safe", "completion")


def conversation_of(row: dict) -> Optional[list]:
    """The messages of a conversational row (``messages``, or ``prompt`` + ``completion`` as
    message lists); None for a row of strings."""
    if isinstance(row.get("messages"), (list, tuple)):
        return list(row["messages"])
    if isinstance(row.get("prompt"), (list, tuple)) and isinstance(row.get("completion"), (list, tuple)):
        return list(row["prompt"]) + list(row["completion"])
    return None


def check_conversation(messages: Sequence[Any], where: str) -> None:
    """Role/content string pairs, ending with the assistant's answer after some prompt."""
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{where}: message {j}: expected {{'role': str, 'content': str}}, got {m!r:.80}")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise ValueError(f"{where}: a conversation must end with the assistant's answer after at least one "
                         f"prompt message; roles: {roles}")


def split_conversation(messages: Sequence[dict], where: str = "row") -> tuple[str, str]:
    """(the last user message, the assistant's answer): a conversation's prompt and response."""
    check_conversation(messages, where)
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    if not users:
        raise ValueError(f"{where}: the conversation has no user message before the answer")
    return users[-1], messages[-1]["content"]


def encode_conversation(tokenizer, messages: Sequence[dict], max_length: int, where: str = "row") -> EncodedExample:
    """A conversation through the chat template; the loss covers the last assistant turn as the
    template writes it. Without a template only [system,] user, assistant can be laid out."""
    check_conversation(messages, where)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if has_chat_template(tokenizer):
        prompt_text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(f"{where}: the chat template does not write the conversation as its prompt "
                             "(with the generation prompt) followed by the answer, so the answer cannot be "
                             "told apart for the loss")
        p = _ids_with_bos(tokenizer, prompt_text)
        r = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        return _cut(p + r, [IGNORE_INDEX] * len(p) + r, max_length)
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"{where}: this tokenizer has no chat template, so only a [system,] user, assistant "
                         f"conversation can be laid out (instruction template); roles: {roles}")
    prompt = messages[-2]["content"]
    if roles[0] == "system":
        prompt = f"{messages[0]['content']}\n\n{prompt}"
    return encode_example(tokenizer, prompt, messages[-1]["content"], max_length)


def encode_text(tokenizer, text: str, max_length: int, response: Optional[str] = None,
                where: str = "row") -> EncodedExample:
    """A whole training text, EOS appended when missing (as TRL's SFTTrainer does). The loss
    covers the last occurrence of ``response`` and what follows; all of it without one."""
    eos = tokenizer.eos_token
    if eos and not text.endswith(eos):
        text += eos
    start = 0
    if response is not None:
        start = text.rfind(response) if response else -1
        if start < 0:
            raise ValueError(f"{where}: the text does not contain the row's response verbatim, so the "
                             "prompt cannot be told apart from the response (a formatting_func must put "
                             "the response into the text unchanged)")
    # Tokenized whole with the tokenizer's own special tokens, as TRL tokenizes text rows; the
    # offsets tell which tokens belong to the response (added special tokens have none).
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except NotImplementedError:  # a slow tokenizer has no offsets: cut the text at the response
        head = tokenizer(text[:start])["input_ids"]
        tail = tokenizer(text[start:], add_special_tokens=False)["input_ids"]
        ids, spans = head + tail, [(0, 0)] * len(head) + [(start, start + 1)] * len(tail)
    labels = [t if (e > b and b >= start) else IGNORE_INDEX for t, (b, e) in zip(ids, spans)]
    return _cut(ids, labels, max_length)


def response_of(row: dict, where: str = "row") -> str:
    """The answer a row trains on (the assistant's last turn for a conversation)."""
    messages = conversation_of(row)
    if messages is not None:
        return split_conversation(messages, where)[1]
    for key in RESPONSE_KEYS:
        if isinstance(row.get(key), str):
            return row[key]
    raise ValueError(f"{where}: no 'response' (or 'safe' / 'completion') field, and no 'messages'; "
                     f"keys: {sorted(row)}")


def encode_row(tokenizer, row: dict, max_length: int, where: str = "row") -> EncodedExample:
    """Any row shape of the module docstring, as one training example."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a dict row, got {type(row).__name__}: {row!r:.80}")
    messages = conversation_of(row)
    if messages is not None:
        return encode_conversation(tokenizer, messages, max_length, where)
    if isinstance(row.get("text"), str) and "prompt" not in row:
        return encode_text(tokenizer, row["text"], max_length, row.get("response"), where)
    if not isinstance(row.get("prompt"), str):
        raise ValueError(f"{where}: expected a string 'prompt' with a 'response', a 'messages' conversation, "
                         f"or a 'text'; keys: {sorted(row)}")
    layout = row.get("layout", "chat")
    if layout == "chat":
        return encode_example(tokenizer, prompt_with_input(row), response_of(row, where), max_length)
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    prompt, response = prompt_with_input(row), response_of(row, where)
    head = INSTRUCTION_TEMPLATE.format(prompt=prompt) if layout == "plain" else prompt + "\n"
    return encode_text(tokenizer, head + response, max_length, response, where)


def prompt_of(row: dict, where: str = "row") -> str:
    """The prompt of a row in any shape of the module docstring: what a selection embeds and
    Antibody's refusal answers. A conversation's last user message; a ``text`` row's text before
    its ``response`` (the whole text without one)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a dict row, got {type(row).__name__}: {row!r:.80}")
    messages = conversation_of(row)
    if messages is not None:
        return split_conversation(messages, where)[0]
    if isinstance(row.get("prompt"), str):
        return prompt_with_input(row)
    if isinstance(row.get("text"), str):
        text, response = row["text"], row.get("response")
        cut = text.rfind(response) if isinstance(response, str) and response else -1
        return text[:cut] if cut > 0 else text
    raise ValueError(f"{where}: expected a string 'prompt' with a 'response', a 'messages' conversation "
                     f"(or TRL's prompt/completion message lists), or a 'text'; keys: {sorted(row)}")


def prompt_with_input(row: dict) -> str:
    """``prompt`` plus a non-empty ``input`` after a blank line (rows from spard.data's loaders
    have it merged already): the prompt in training as in loading, embedding and evaluation."""
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        return f"{row['prompt']}\n\n{extra}"
    return row["prompt"]


def format_rows(rows: Sequence[dict], formatting_func: Callable[[dict], str]) -> list[dict]:
    """Rows laid out by a TRL ``SFTTrainer`` formatting function: ``{"text", "response"}``.

    Pass the safety rows through the function the trainer uses, so the safety batch reads
    exactly like the training text; the loss then covers each row's response inside its text.
    The function gets one row (a dict) and returns one string.
    """
    out = []
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a dict row, got {type(row).__name__}")
        text = formatting_func(row)
        if not isinstance(text, str):
            raise TypeError(f"formatting_func({where}) must return one string, got {type(text).__name__}")
        out.append({"text": text, "response": response_of(row, where)})
    return out


def label_token_count(labels: torch.Tensor) -> int:
    """Tokens that carry a loss once labels are shifted for next-token prediction."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def pad_id_of(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for training: input_ids, attention_mask, labels (-100 on padding)."""
    if not examples:
        raise ValueError("collate: empty batch")
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        input_ids[i, :L] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, :L] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :L] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
