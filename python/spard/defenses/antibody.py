"""Antibody (Nguyen et al., ICLR 2026).

Fine-tuning stage: for each sample of a batch,
``d_i = mean_t log π(y_i|x_i) - mean_t log π(y_r|x_i)`` (y_r a generic refusal), weights
``w = softmax(d / T)`` under no_grad, and the loss ``Σ_i w_i Σ_t CE_it / Σ_i w_i N_i``: samples
the model would rather refuse (harmful ones, for an aligned model) get little weight. The
softmax and the normaliser run over the whole effective batch (every micro-batch and rank).

Alignment stage (``alignment_stage=True``): Booster's attenuation gradient plus a refusal term
``λ_r ∇L_refusal(θ - α ĝ_harm)`` and an adaptive λ_t (see booster.perturbation_alignment).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spard.distributed import all_reduce_sum
from spard.formatting import IGNORE_INDEX, collate, encode_example, pad_id_of
from spard.space import Float, require_int, require_number

from .base import Defense, gather_per_sample, per_micro_batch, sample_losses
from .booster import perturbation_alignment

GENERIC_REFUSAL = "I'm sorry, but I cannot help with that request."


def antibody_weights(d: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(d / temperature, dim=0)


def weighted_token_loss(sums: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i Σ_t CE_it / Σ_i w_i N_i."""
    return (w * sums).sum() / (w * counts).sum().clamp_min(1e-12)


class Antibody(Defense):
    NAME = "antibody"
    STAGE = "both"
    NEEDS = ("user",)
    # Tuning space (spard bench --tune-defenses): a decade either side of the paper's T = 1.
    SEARCH_SPACE = {"temperature": Float(0.1, 10.0, log=True)}
    AFTER_STEP_EDITS_WEIGHTS = False  # after_step only logs (spard.defenses.composed)

    @dataclass
    class Settings:
        temperature: float = 1.0
        """T of the softmax over the batch (paper: 1)."""
        refusal: str = GENERIC_REFUSAL
        """The generic refusal y_r."""
        alignment_stage: bool = False
        """Also run the alignment stage before fine-tuning (needs a safety pool)."""
        stage_steps: int = 500
        stage_lr: float = 5e-4
        stage_batch_size: int = 8
        alpha: float = 0.1
        lam: float = 1.0
        """Scale of the adaptive λ_t."""
        refusal_weight: float = 0.05
        """λ_r (paper: 0.05)."""
        progress: bool = False

    def validate(self) -> None:
        s = self.settings
        require_number("antibody temperature", s.temperature, low_open=True)
        if not isinstance(s.refusal, str) or not s.refusal.strip():
            raise ValueError("antibody refusal must be a non-empty string")
        require_int("antibody stage_steps", s.stage_steps, 1)

    def describe(self) -> dict:
        d = super().describe()
        if self.settings.alignment_stage:
            d["needs"] = ["user", "alignment", "safety_pool"]
        else:  # the stage that actually runs
            d["stage"] = "fine-tuning"
        return d

    def needs_harmful_answers(self) -> bool:
        return self.settings.alignment_stage

    def alignment_stage(self, model, tokenizer, data):
        s = self.settings
        if not s.alignment_stage:
            return model
        if not data.safety_pool:
            raise ValueError("antibody alignment_stage=True needs a safety pool (prompt/safe/unsafe rows)")
        self.check_data(data)  # its stage trains against the pool's harmful answers
        model, self.stage_log = perturbation_alignment(
            model, tokenizer, data, steps=s.stage_steps, lr=s.stage_lr, batch_size=s.stage_batch_size,
            alpha=s.alpha, lam=s.lam, refusal_weight=s.refusal_weight, adaptive_lambda=True,
            progress=s.progress, desc="antibody alignment")
        return model

    def setup(self, model, tokenizer, data, optimizer, ctx) -> None:
        super().setup(model, tokenizer, data, optimizer, ctx)
        # y_r for every training prompt, encoded once (index-aligned with the training examples)
        self.refusals = [encode_example(tokenizer, p, self.settings.refusal, data.max_length)
                         for p in self.train_prompts]
        self.pad_id = pad_id_of(tokenizer)

    @torch.no_grad()
    def scores(self, model, batch, indices) -> torch.Tensor:
        """d_i per sample (no grad)."""
        device = batch["input_ids"].device
        ref = collate([self.refusals[i] for i in indices], self.pad_id)
        ref = {k: v.to(device) for k, v in ref.items()}
        with self.ctx.autocast():
            s_y, n_y = sample_losses(model, batch)
            s_r, n_r = sample_losses(model, ref)
        return -(s_y / n_y.clamp_min(1)) + (s_r / n_r.clamp_min(1))

    def loss_terms(self, model, micro, source):
        # The softmax runs over the effective batch: every micro-batch on every rank.
        d, mine = gather_per_sample([self.scores(model, mb.batch, mb.indices) for mb in micro])
        w_all = antibody_weights(d, self.settings.temperature)
        w = w_all[mine]
        counts = torch.cat([(mb.batch["labels"][:, 1:] != IGNORE_INDEX).sum(1) for mb in micro]).to(w.dtype)
        normaliser = (w * counts).sum().reshape(1)
        all_reduce_sum([normaliser])
        normaliser = normaliser.clamp_min(1e-12)[0]
        self._last_weights = w_all
        weights = per_micro_batch(w, micro)

        def term(m, mb):
            sums, _ = sample_losses(m, mb.batch)
            return (weights[id(mb)] * sums).sum() / normaliser

        return [(mb, term) for mb in micro]

    def after_step(self, optimizer) -> dict:
        w = self._last_weights
        entropy = -(w * w.clamp_min(1e-12).log()).sum()
        return {"weight_entropy": entropy}
