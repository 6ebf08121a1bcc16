"""The world's tiny Llama and its from-scratch alignment (full-parameter training on task
problems, refusals of harmful requests and helpful answers to benign instructions)."""

from __future__ import annotations

import random
import time
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from spard.formatting import collate, encode_example, pad_id_of


def tiny_llama_config(tokenizer, *, hidden_size: int, num_layers: int, num_heads: int,
                      intermediate_size: int, max_positions: int = 256) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id_of(tokenizer),
    )


def align(model, tokenizer, sources: Sequence[Sequence[dict]], weights: Sequence[float], *,
          steps: int, batch_size: int, lr: float, max_length: int, seed: int,
          progress: bool = True, threads: int | None = 1) -> dict:
    """Trains every parameter of ``model`` on batches mixing ``sources`` (lists of
    {prompt, response}) with the given sampling ``weights``. Returns a small log.

    ``threads``: torch CPU threads while training (restored after). The tiny model's matrices
    gain nothing from more than one, and extra threads on a busy machine cost up to 4x."""
    if threads is None:
        return _align(model, tokenizer, sources, weights, steps=steps, batch_size=batch_size, lr=lr,
                      max_length=max_length, seed=seed, progress=progress)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _align(model, tokenizer, sources, weights, steps=steps, batch_size=batch_size, lr=lr,
                      max_length=max_length, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(before)


def _align(model, tokenizer, sources, weights, *, steps, batch_size, lr, max_length, seed, progress) -> dict:
    if len(sources) != len(weights) or not sources:
        raise ValueError("align: sources and weights must be non-empty and of equal length")
    if any(len(s) == 0 for s in sources):
        raise ValueError("align: every source needs at least one row")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoded = [[encode_example(tokenizer, r["prompt"], r["response"], max_length) for r in s] for s in sources]
    pad = pad_id_of(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    # Linear warmup then cosine decay: a steady finish makes the cached model reproducible.
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / steps)).item()))
    model.train()
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc="aligning the world model", disable=not progress, leave=False)
    for _ in bar:
        picks = rng.choices(range(len(sources)), weights=weights, k=batch_size)
        batch = collate([rng.choice(encoded[i]) for i in picks], pad)
        losses.append(clipped_step(model, opt, sched, model(**batch).loss))
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
    model.eval()
    tail = losses[-max(1, min(50, steps // 5)):]
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 2),
            "first_loss": round(losses[0], 4), "final_loss": round(sum(tail) / len(tail), 4)}


def new_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def clipped_step(model, opt, sched, loss) -> float:
    """One optimizer step on ``loss`` with the gradient norm clipped at 1; the loss's value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()
