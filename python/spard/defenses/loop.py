"""Runs one defense end to end on a model: its alignment stage, LoRA, then the fine-tuning loop
with the defense's hooks (see base.py for the order). The loop is the same for every defense,
so their results differ only by what the defenses do."""

from __future__ import annotations

import time
from typing import Optional

import torch
from tqdm.auto import tqdm

from spard.config import LoraConfig, OptimConfig
from spard.spag import encode_rows, trainable_parameters
from spard.trainer import _total_steps, build_optimizer, optimizer_step

from .base import Defense, DefenseData, RowBatches


def encode_training_rows(rows, tokenizer, max_length: int):
    """Encoded examples and their prompts, leaving out rows whose response is cut off entirely."""
    if not rows:
        raise ValueError("training rows: no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "prompt" not in row or "response" not in row:
            raise ValueError(f"training rows[{i}]: expected a dict with 'prompt' and 'response'")
    examples, kept = encode_rows(rows, tokenizer, max_length, "training rows")
    return examples, [rows[i]["prompt"] for i in kept]


def run_defense(defense: Defense, model, tokenizer, data: DefenseData, *, optim: Optional[OptimConfig] = None,
                lora: Optional[LoraConfig] = None, progress: bool = True, desc: Optional[str] = None):
    """Returns (the fine-tuned peft model, a run dict: steps, seconds, loss curve, summary)."""
    from spard.lora import apply_lora

    optim = optim or OptimConfig()
    lora = lora or LoraConfig()
    start = time.perf_counter()
    model = defense.alignment_stage(model, tokenizer, data)
    stage_seconds = time.perf_counter() - start
    rows = defense.training_rows(data)
    torch.manual_seed(optim.seed)
    model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                       target_modules=lora.target_modules)
    params = trainable_parameters(model)
    device = params[0].device
    examples, prompts = encode_training_rows(rows, tokenizer, data.max_length)
    batch_size = optim.batch_size * optim.grad_accum
    user = RowBatches(None, tokenizer, batch_size=batch_size, max_length=data.max_length,
                      seed=optim.seed, what="user rows", device=device, examples=examples)
    user_steps = _total_steps(len(examples), optim)
    total = defense.total_steps(user_steps)
    optimizer, scheduler = build_optimizer(params, optim, total)
    defense.n_train, defense.train_prompts = len(examples), prompts
    defense.setup(model, tokenizer, data, optimizer)
    align: Optional[RowBatches] = None

    losses: list[float] = []
    model.train()
    bar = tqdm(range(total), desc=desc or defense.NAME, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        source = defense.source(step)
        if source == "user":
            batch, idx = user.next()
        else:
            if align is None:
                align = RowBatches(data.alignment, tokenizer, batch_size=batch_size, max_length=data.max_length,
                                   seed=data.seed + 5, what="alignment rows", device=device)
            batch, idx = align.next()
        loss = defense.loss(model, batch, idx, source)
        loss.backward()
        optimizer_step(params, optimizer, scheduler, optim.max_grad_norm,
                       after_backward=defense.after_backward, after_step=defense.after_step)
        if source == "user":
            losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1] if losses else float('nan'):.3f}", refresh=False)
    model.eval()
    curve = [sum(losses[i:i + 20]) / len(losses[i:i + 20]) for i in range(0, len(losses), 20)]
    run = {"defense": defense.describe(), "steps": total, "user_steps": user_steps,
           "training_examples": len(examples), "seconds": time.perf_counter() - start,
           "alignment_stage_seconds": stage_seconds, "loss_curve": curve,
           "final_loss": curve[-1] if curve else None, "summary": defense.summary()}
    return model, run
