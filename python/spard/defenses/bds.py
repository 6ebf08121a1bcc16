"""BDS, the Bayesian Data Scheduler (Hu et al., NeurIPS 2025).

Per-sample weights ``w = N·softmax(a)`` over the N user samples (``a`` starts equal). The model
steps on ``mean_j ℓ_align,j + mean_i w_i ℓ_i``; then ``a`` takes its own AdamW step on
``mean_i w_i(a) ℓ_i`` with the losses detached, which lowers the weight of samples whose loss
stays high while the model also trains on refusals (the harmful ones).

``scheduler="neural"`` is the amortised variant: a small encoder (mean of token embeddings,
then an MLP) scores each sample, weights are ``B·softmax(scores)`` over the batch, so the
scheduler transfers to samples it has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spard.distributed import all_reduce_sum
from spard.space import Float, require_int, require_number

from .base import Defense, gather_per_sample, per_micro_batch, sample_losses, token_mean_terms


class SampleScorer(nn.Module):
    """The amortised scheduler's encoder: token embeddings averaged over the sample's
    non-padding tokens, then a two-layer MLP to one score."""

    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1))
        nn.init.zeros_(self.head[-1].weight)  # equal weights at the start, like a = 0
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, input_ids, attention_mask):
        emb = self.embed.weight[input_ids]
        m = attention_mask.unsqueeze(-1).to(emb.dtype)
        pooled = (emb * m).sum(1) / m.sum(1).clamp_min(1)
        return self.head(pooled).squeeze(-1)


class BDS(Defense):
    NAME = "bds"
    STAGE = "fine-tuning"
    NEEDS = ("user", "alignment")
    # Tuning space: the scheduler's learning rate around the paper's 5e-3.
    SEARCH_SPACE = {"weight_lr": Float(1e-3, 5e-2, log=True)}
    AFTER_STEP_EDITS_WEIGHTS = False  # after_step steps the scheduler's own weights (spard.defenses.composed)

    @dataclass
    class Settings:
        scheduler: str = "scalar"
        """"scalar" (one logit per user sample) or "neural" (the amortised encoder)."""
        weight_lr: float = 5e-3
        """AdamW learning rate of the scheduler (paper: 5e-3)."""
        alignment_batch_size: int = 10
        """Alignment samples per step (paper: 10 alignment + 10 user)."""
        encoder_dim: int = 64

    def validate(self) -> None:
        s = self.settings
        if s.scheduler not in ("scalar", "neural"):
            raise ValueError(f"bds scheduler must be 'scalar' or 'neural', got {s.scheduler!r}")
        require_number("bds weight_lr", s.weight_lr, low_open=True)
        require_int("bds alignment_batch_size", s.alignment_batch_size, 1)

    def setup(self, model, tokenizer, data, optimizer, ctx) -> None:
        super().setup(model, tokenizer, data, optimizer, ctx)
        self.check_data(data)
        device = ctx.device
        self.align = ctx.stream(data.alignment, tokenizer, seed=data.seed + 2, what="alignment rows")
        self.n_user = self.n_train  # examples in the user stream's order (set by the trainer)
        if self.settings.scheduler == "scalar" and self.n_user < 1:
            raise ValueError("bds: n_train (the number of user examples) must be set before setup")
        if self.settings.scheduler == "scalar":
            self.logits = torch.zeros(self.n_user, device=device, requires_grad=True)
            self.weight_params = [self.logits]
        else:
            self.scorer = SampleScorer(len(tokenizer), self.settings.encoder_dim).to(device)
            self.weight_params = list(self.scorer.parameters())
        self.weight_opt = torch.optim.AdamW(self.weight_params, lr=self.settings.weight_lr)
        self._pending = None

    # -- weights over the effective batch ----------------------------------------------------------
    def _scores(self, micro) -> torch.Tensor:
        return torch.cat([self.scorer(mb.batch["input_ids"], mb.batch["attention_mask"]) for mb in micro])

    def _weights_of(self, scores_or_indices: torch.Tensor) -> torch.Tensor:
        """Weights of the samples: N·softmax(a)[i] (scalar) or B·softmax(scores) (neural)."""
        if self.settings.scheduler == "scalar":
            return (self.n_user * torch.softmax(self.logits, dim=0))[scores_or_indices]
        return scores_or_indices.numel() * torch.softmax(scores_or_indices, dim=0)

    def loss_terms(self, model, micro, source):
        device = self.ctx.device
        indices = torch.tensor([i for mb in micro for i in mb.indices], dtype=torch.float64, device=device)
        global_indices, mine = gather_per_sample([indices])
        global_indices = global_indices.long()
        if self.settings.scheduler == "scalar":
            w = self._weights_of(global_indices).detach()[mine]
        else:
            with torch.no_grad():
                scores, _ = gather_per_sample([self._scores(micro)])
            w = self._weights_of(scores)[mine]
        n_eff = global_indices.numel()
        weights = per_micro_batch(w, micro)
        losses: dict[int, torch.Tensor] = {}
        self._pending = (micro, global_indices, mine, losses)

        def user_term(m, mb):
            sums, counts = sample_losses(m, mb.batch)
            per_sample = sums / counts.clamp_min(1)
            losses[id(mb)] = per_sample.detach()
            return (weights[id(mb)] * per_sample).sum() / n_eff

        # The alignment batch is micro-batched and token-averaged over every rank too.
        align = self.align.take(self.settings.alignment_batch_size)
        return [(mb, user_term) for mb in micro] + token_mean_terms(align, device)

    def after_step(self, optimizer) -> dict:
        """The scheduler's own step on mean_i w_i(a) ℓ_i over the effective batch (losses fixed)."""
        micro, global_indices, mine, losses = self._pending
        per_sample, _ = gather_per_sample([losses[id(mb)] for mb in micro])
        self.weight_opt.zero_grad(set_to_none=True)
        if self.settings.scheduler == "scalar":
            objective = (self._weights_of(global_indices) * per_sample).mean()
            objective.backward()  # the same global objective on every rank: no reduction
        else:
            # d objective / d score over the global batch, then each rank backpropagates its own
            # samples' scores and the scorer's gradients are summed over ranks.
            with torch.no_grad():
                scores, _ = gather_per_sample([self._scores(micro)])
            scores = scores.detach().requires_grad_(True)
            objective = (self._weights_of(scores) * per_sample).mean()
            (coef,) = torch.autograd.grad(objective, scores)
            (self._scores(micro) * coef[mine]).sum().backward()
            all_reduce_sum([p.grad for p in self.weight_params if p.grad is not None])
        self.weight_opt.step()
        self._pending = None
        w = self._weights_of(global_indices if self.settings.scheduler == "scalar" else scores).detach()
        p = w / w.sum()
        return {"weight_entropy": -(p * p.clamp_min(1e-12).log()).sum()}

    def sample_weights(self) -> torch.Tensor:
        """Current weights of all user samples (scalar scheduler)."""
        if self.settings.scheduler != "scalar":
            raise ValueError("sample_weights: only the scalar scheduler keeps one weight per sample")
        return (self.n_user * torch.softmax(self.logits.detach(), 0)).cpu()

    def state_dict(self) -> dict:
        weights = ({"logits": self.logits.detach()} if self.settings.scheduler == "scalar"
                   else {"scorer": self.scorer.state_dict()})
        return {**weights, "weight_opt": self.weight_opt.state_dict(), "align": self.align.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            if self.settings.scheduler == "scalar":
                self.logits.copy_(state["logits"])
            else:
                self.scorer.load_state_dict(state["scorer"])
        self.weight_opt.load_state_dict(state["weight_opt"])
        self.align.load_state_dict(state["align"])
