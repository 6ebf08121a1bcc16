"""Safety at One Shot (Zhang et al., ICLR 2026): after fine-tuning, a few epochs on one safety
example restore the alignment.

    1. candidates C = ``candidates`` refusal rows (prompt -> safe answer) drawn with the seed
    2. the example: i* = argmax_{i in C} <∇ℓ_i(θ_ft), ḡ>,  ḡ = ∇ℓ_C(θ_ft)
    3. ``steps`` AdamW steps (lr η) on ℓ_{i*} alone; return the patched model

ℓ_i is the token-mean cross-entropy of row i, ℓ_C that of all the candidates' tokens. Our
reading fills a gap: the paper picks its one example by a bi-level selection whose outer
objective is the safety loss after training on the pick; step 2 is its first-order,
one-unrolled-step form (the row whose step lowers the candidates' refusal loss most), and for
"a few epochs" we take ``steps`` = 10 epochs over the one example, at the fine-tuning
learning rate.

Every rank runs the stage on the same rows (DDP: the inner module, no communication; FSDP: the
sharded model, whose gradient average over ranks of equal gradients is that gradient), so the
patched model is the single-process one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from spard.training.batches import micro_batches
from spard.distributed import all_reduce_sum, is_distributed, is_sharded, local_tensor, unwrap
from spard.formatting import pad_id_of
from spard.spag import encode_rows, trainable_parameters
from spard.space import Float, Int, require_int, require_number

from .base import Defense, DefenseData, TrainContext, sample_losses


def whole_set_grads(model, params: Sequence[torch.Tensor], micro, autocast) -> tuple[list, torch.Tensor]:
    """∇ of the token-mean loss over ``micro`` (micro-batches every rank holds whole), and the
    loss. Replicated parameters: autograd on the unwrapped module (no collective); sharded
    (FSDP2): backward through the model, whose reduce-scatter averages the ranks' equal
    gradients. ``p.grad`` is left as it was."""
    total = torch.tensor(float(sum(mb.n_tokens for mb in micro)), device=micro[0].batch["input_ids"].device)
    total = total.clamp_min(1)
    loss = torch.zeros((), dtype=torch.float32)
    if any(is_sharded(p) for p in params):
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            for mb in micro:
                with autocast():
                    part = sample_losses(model, mb.batch)[0].sum() / total
                part.backward()
                loss += part.detach().float().cpu()
            return [p.grad for p in params], loss
        finally:
            for p, g in zip(params, saved):
                p.grad = g
    inner = unwrap(model)
    grads: list = [None] * len(params)
    for mb in micro:
        with autocast():
            part = sample_losses(inner, mb.batch)[0].sum() / total
        g = torch.autograd.grad(part, params, allow_unused=True)
        grads = [gi if acc is None else (acc if gi is None else acc + gi) for acc, gi in zip(grads, g)]
        loss += part.detach().float().cpu()
    return grads, loss


def global_dot(a: Sequence, b: Sequence) -> torch.Tensor:
    """<a, b> over every parameter (local shards' partial sums all-reduced under FSDP)."""
    dot = torch.zeros((), dtype=torch.float64)
    sharded = False
    for x, y in zip(a, b):
        if x is None or y is None:
            continue
        sharded = sharded or is_sharded(x)
        dot = dot + (local_tensor(x).double() * local_tensor(y).double()).sum().cpu()
    if sharded and is_distributed():
        dot = dot.to(local_tensor(next(x for x in a if x is not None)).device)
        all_reduce_sum([dot])
        dot = dot.cpu()
    return dot


class OneShot(Defense):
    NAME = "oneshot"
    STAGE = "post-fine-tuning"
    NEEDS = ("user", "alignment")
    # Tuning space: the patch's length and step size around the defaults.
    SEARCH_SPACE = {"steps": Int(1, 40, log=True), "lr_scale": Float(0.1, 10.0, log=True)}

    @dataclass
    class Settings:
        steps: int = 10
        """Epochs over the one example (one optimizer step each; paper: "a few epochs")."""
        lr: Optional[float] = None
        """η of the patch; None: the fine-tuning optimizer's peak learning rate."""
        lr_scale: float = 1.0
        """η used = lr_scale × η (the tuning knob)."""
        candidates: int = 32
        """Refusal rows scored to pick the one example (fewer when the data has fewer)."""
        index: Optional[int] = None
        """Patch with this alignment row instead of the selection."""
        max_grad_norm: Optional[float] = 1.0

    def validate(self) -> None:
        s = self.settings
        require_int("oneshot steps", s.steps, 1)
        require_int("oneshot candidates", s.candidates, 1)
        for name in ("lr", "lr_scale", "max_grad_norm"):
            v = getattr(s, name)
            if v is not None or name == "lr_scale":
                require_number(f"oneshot {name}", v, low_open=True)
        if s.index is not None:
            require_int("oneshot index", s.index, 0, " (an alignment row)")

    def check_data(self, data: DefenseData) -> None:
        super().check_data(data)
        if self.settings.index is not None and self.settings.index >= len(data.alignment):
            raise ValueError(f"oneshot index: {self.settings.index} is beyond the {len(data.alignment)} "
                             "alignment rows")

    def learning_rate(self) -> float:
        s = self.settings
        lr = s.lr
        if lr is None:
            optimizer = getattr(self, "optimizer", None)
            if optimizer is None:
                raise ValueError("oneshot lr: give it, or run the defense through the trainer (which lends "
                                 "the fine-tuning learning rate)")
            group = optimizer.param_groups[0]
            lr = float(group.get("initial_lr", group["lr"]))
        return lr * float(s.lr_scale)

    # -- the selection --------------------------------------------------------------------------
    def candidate_rows(self, data: DefenseData) -> list[int]:
        n, k = len(data.alignment), self.settings.candidates
        return sorted(random.Random(data.seed).sample(range(n), min(k, n)))

    def select(self, model, tokenizer, data: DefenseData, ctx: TrainContext) -> tuple[int, list[float]]:
        """(alignment row of the one example, the candidates' scores <∇ℓ_i, ḡ>)."""
        cand = self.candidate_rows(data)
        rows = [data.alignment[i] for i in cand]
        examples, kept = encode_rows(rows, tokenizer, data.max_length, "alignment rows")
        cand = [cand[i] for i in kept]
        params = trainable_parameters(unwrap(model))
        pad = pad_id_of(tokenizer)

        def grads(indices):
            micro = micro_batches(examples, indices, pad_id=pad, micro_batch_size=ctx.micro_batch_size,
                                  device=ctx.device)
            return whole_set_grads(model, params, micro, ctx.autocast)[0]

        # Two passes keep two gradients in memory, not one per candidate.
        g_bar = grads(list(range(len(examples))))  # token mean over the candidates
        scores = [float(global_dot(grads([i]), g_bar)) for i in range(len(examples))]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # ties: the first
        return cand[best], scores

    # -- the stage ------------------------------------------------------------------------------
    def after_training(self, model, tokenizer, data: DefenseData, ctx: TrainContext):
        self.check_data(data)
        s = self.settings
        lr = self.learning_rate()
        was_training = model.training
        model.eval()  # the selection without dropout
        try:
            if s.index is not None:
                chosen, scores = s.index, []
            else:
                chosen, scores = self.select(model, tokenizer, data, ctx)
            example, _ = encode_rows([data.alignment[chosen]], tokenizer, data.max_length, "the one-shot example")
            micro = micro_batches(example, [0], pad_id=pad_id_of(tokenizer), micro_batch_size=1, device=ctx.device)
            params = trainable_parameters(unwrap(model))
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            losses = []
            model.train()  # the patch trains as fine-tuning did (LoRA dropout, seeded)
            devices = [ctx.device] if ctx.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(data.seed)
                for _ in range(s.steps):
                    g, loss = whole_set_grads(model, params, micro, ctx.autocast)
                    for p, gi in zip(params, g):
                        p.grad = gi
                    if s.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss))
        finally:
            model.train(was_training)
        self.patch = {"row": int(chosen), "prompt": data.alignment[chosen].get("prompt"), "lr": lr,
                      "scores": scores, "losses": losses}
        return model

    def summary(self) -> dict:
        p = getattr(self, "patch", None)
        if not p:
            return {}
        return {"one_shot_row": p["row"], "one_shot_prompt": p["prompt"], "patch_steps": len(p["losses"]),
                "patch_lr": p["lr"], "patch_loss_first": p["losses"][0] if p["losses"] else None,
                "patch_loss_last": p["losses"][-1] if p["losses"] else None}
