"""How a (prompt, response) pair becomes model input.

The model's chat template is used when its tokenizer has one; otherwise the instruction template
below (the Alpaca layout most fine-tuning-attack papers use). Labels are -100 on the prompt so
the loss covers the response tokens only. Training, evaluation and the synthetic world all go
through these functions, so a model is always prompted the way it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100

INSTRUCTION_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)


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
    text = render_prompt(tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", True) and (not ids or ids[0] != bos):
        if not (has_chat_template(tokenizer) and tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
            ids = [bos] + ids
    return ids


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
    ids = p + r
    labels = [IGNORE_INDEX] * len(p) + r
    truncated = len(ids) > max_length
    return EncodedExample(ids[:max_length], labels[:max_length], truncated)


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
