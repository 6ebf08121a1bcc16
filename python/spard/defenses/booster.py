"""Booster (Huang et al., 2024): an alignment stage that attenuates the harmful perturbation.

Each alignment step uses the gradient
``g_align(θ) + λ (∇L_harm(θ) - ∇L_harm(θ - α ĝ_harm))``, ĝ_harm = ∇L_harm(θ)/||∇L_harm(θ)||:
it trains on refusals while making one normalised harmful step reduce the harmful loss less.
The stage trains a LoRA adapter on the aligned model and merges it, so fine-tuning then starts
from the boosted weights. Antibody's alignment stage (spard.defenses.antibody) adds a refusal
term and an adaptive λ to the same gradient; both share ``perturbation_alignment``.
"""

from __future__ import annotations

from dataclasses import dataclass
from contextlib import nullcontext
from typing import Optional, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from spard.training.batches import MicroBatch
from spard.formatting import label_token_count
from spard.spag import trainable_parameters
from spard.space import Float, require_int, require_number

from .base import Defense, DefenseData, encoded_stream, flat_norm, token_mean_terms


@dataclass
class PerturbationLog:
    lam: list
    harmful_loss: list
    harmful_loss_after_step: list


def accumulated_grads(model, params, micro: Sequence[MicroBatch], autocast=nullcontext) -> tuple[list, Tensor]:
    """∇ of the token-mean loss over the micro-batches (summed pass by pass), and the loss."""
    grads: list[Optional[Tensor]] = [None] * len(params)
    loss = torch.zeros(())
    # Every rank runs the alignment stage on the whole batch: no reduction across ranks.
    for mb, term in token_mean_terms(micro, params[0].device, across_ranks=False):
        with autocast():
            part = term(model, mb)
        g = torch.autograd.grad(part, params, allow_unused=True)
        grads = [gi if acc is None else (acc if gi is None else acc + gi) for acc, gi in zip(grads, g)]
        loss = loss + part.detach().cpu()
    return grads, loss


def perturbation_gradients(model, params, align_batch, harm_batch, *, alpha: float,
                           refusal_batch=None, autocast=nullcontext):
    """(g_align, ∇L_harm(θ), ∇L_harm(θ - α ĝ), ∇L_refusal(θ - α ĝ) or None, logs). Each batch is
    a list of micro-batches (or one collated batch). The parameters are perturbed in place and
    restored exactly before returning."""
    align_batch, harm_batch = _as_micro(align_batch), _as_micro(harm_batch)
    g_align, _ = accumulated_grads(model, params, align_batch, autocast)
    g_harm, harm = accumulated_grads(model, params, harm_batch, autocast)
    scale = alpha / flat_norm(g_harm).clamp_min(1e-12)
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, g_harm):
                if g is not None:
                    p.sub_(scale.to(p.dtype) * g)
        g_harm_after, harm_after = accumulated_grads(model, params, harm_batch, autocast)
        g_ref = (accumulated_grads(model, params, _as_micro(refusal_batch), autocast)[0]
                 if refusal_batch is not None else None)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return g_align, g_harm, g_harm_after, g_ref, {"harmful_loss": float(harm), "harmful_loss_after": float(harm_after)}


def _as_micro(batch) -> list[MicroBatch]:
    if isinstance(batch, dict):  # one collated batch
        return [MicroBatch(batch, list(range(batch["input_ids"].shape[0])),
                           label_token_count(batch["labels"]))]
    return list(batch)


def combine(g_align, g_harm, g_harm_after, lam: float, g_ref=None, refusal_weight: float = 0.0):
    out = []
    for i, ga in enumerate(g_align):
        parts = [t for t in (ga,) if t is not None]
        if g_harm[i] is not None and g_harm_after[i] is not None:
            parts.append(lam * (g_harm[i] - g_harm_after[i]))
        if g_ref is not None and g_ref[i] is not None and refusal_weight:
            parts.append(refusal_weight * g_ref[i])
        out.append(sum(parts) if parts else None)
    return out


def perturbation_alignment(model, tokenizer, data: DefenseData, *, steps: int, lr: float, batch_size: int,
                           alpha: float, lam: float, refusal_weight: float = 0.0, adaptive_lambda: bool = False,
                           ema: float = 0.9, lora_r: int = 8, lora_alpha: float = 16, max_grad_norm: float = 1.0,
                           progress: bool = True, desc: str = "alignment stage"):
    """Runs the Booster/Antibody alignment stage on a LoRA adapter and returns the merged model.

    Each batch of ``batch_size`` rows is split into micro-batches of ``data.micro_batch_size``
    (the fine-tuning micro-batch) whose gradients are summed. With ``adaptive_lambda`` the
    weight is λ_t = lam · EMA(||g_align||) / EMA(||Δ_harm||), so the attenuation term keeps a
    fixed scale relative to the alignment gradient. The stage is seeded by ``data.seed`` (it
    runs again, identically, when a run resumes)."""
    from spard.lora import apply_lora
    from spard.training.precision import autocast_for

    if not data.alignment or not data.harmful:
        raise ValueError("the alignment stage needs alignment rows and harmful rows (a safety pool with "
                         "'safe' and 'unsafe' answers)")
    device = next(model.parameters()).device
    torch.manual_seed(data.seed)
    peft = apply_lora(model, r=lora_r, alpha=lora_alpha, dropout=0.0)
    autocast = autocast_for(peft)
    params = trainable_parameters(peft)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pool = [r for r in data.safety_pool if r.get("unsafe") and r.get("safe")]
    harmful = [{"prompt": r["prompt"], "response": r["unsafe"]} for r in pool]
    refusals = [{"prompt": r["prompt"], "response": r["safe"]} for r in pool]
    micro = data.micro_batch_size or batch_size

    def stream(rows, seed, what):
        return encoded_stream(rows, tokenizer, max_length=data.max_length, micro_batch_size=micro, seed=seed,
                              device=device, what=what)

    align = stream(data.alignment, data.seed + 3, "alignment rows")
    harm = stream(harmful, data.seed + 4, "harmful rows")
    refuse = None
    if refusal_weight:
        refuse = stream(refusals, data.seed + 4, "refusal rows")
        if len(refuse) != len(harm):
            raise ValueError("harmful and refusal rows of the pool must all fit max_length (they are paired)")
    ema_align = ema_delta = None
    log = {"lambda": [], "harmful_loss": [], "harmful_loss_after": []}
    peft.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        whole = {"rank": 0, "world_size": 1}  # every rank runs the stage on the whole batch
        ab = align.take(batch_size, **whole)
        hb = harm.take(batch_size, **whole)
        rb = refuse.take(batch_size, **whole) if refuse is not None else None  # same seed: paired rows
        g_align, g_h, g_h2, g_ref, logs = perturbation_gradients(peft, params, ab, hb, alpha=alpha,
                                                                 refusal_batch=rb, autocast=autocast)
        lam_t = lam
        if adaptive_lambda:
            na = float(flat_norm(g_align))
            nd = float(flat_norm([None if a is None or b is None else a - b for a, b in zip(g_h, g_h2)]))
            ema_align = na if ema_align is None else ema * ema_align + (1 - ema) * na
            ema_delta = nd if ema_delta is None else ema * ema_delta + (1 - ema) * nd
            lam_t = lam * ema_align / max(ema_delta, 1e-12)
        total = combine(g_align, g_h, g_h2, lam_t, g_ref, refusal_weight)
        for p, g in zip(params, total):
            p.grad = g
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log["lambda"].append(lam_t)
        log["harmful_loss"].append(logs["harmful_loss"])
        log["harmful_loss_after"].append(logs["harmful_loss_after"])
    merged = peft.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged, log


class Booster(Defense):
    NAME = "booster"
    STAGE = "alignment"
    NEEDS = ("user", "alignment", "safety_pool")
    # Tuning space: λ and α around the paper's 5 and 0.1 (its ablations vary both by decades).
    SEARCH_SPACE = {"lam": Float(0.5, 20.0, log=True), "alpha": Float(0.01, 0.5, log=True)}

    @dataclass
    class Settings:
        steps: int = 500
        """Alignment-stage steps."""
        lr: float = 5e-4
        batch_size: int = 8
        lam: float = 5.0
        """λ, the weight of the attenuation term (paper: 5)."""
        alpha: float = 0.1
        """α, the size of the normalised harmful step (paper: 0.1)."""
        lora_r: int = 8
        lora_alpha: float = 16
        progress: bool = False

    def validate(self) -> None:
        s = self.settings
        require_int(f"{self.NAME} steps", s.steps, 1)
        for name in ("lr", "alpha"):
            require_number(f"{self.NAME} {name}", getattr(s, name), low_open=True)
        require_number(f"{self.NAME} lam", s.lam)

    def needs_harmful_answers(self) -> bool:
        return True

    def alignment_stage(self, model, tokenizer, data):
        self.check_data(data)
        s = self.settings
        model, self.stage_log = perturbation_alignment(
            model, tokenizer, data, steps=s.steps, lr=s.lr, batch_size=s.batch_size, alpha=s.alpha,
            lam=s.lam, lora_r=s.lora_r, lora_alpha=s.lora_alpha, progress=s.progress, desc="booster")
        return model

    def summary(self) -> dict:
        log = getattr(self, "stage_log", None)
        if not log:
            return {}
        return {"alignment_steps": len(log["lambda"]), "final_harmful_loss": log["harmful_loss"][-1],
                "final_harmful_loss_after_step": log["harmful_loss_after"][-1]}
