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

from .base import Defense, RowBatches, mean_token_loss, sample_losses


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
        if not s.weight_lr > 0:
            raise ValueError(f"bds weight_lr must be > 0, got {s.weight_lr!r}")
        if not isinstance(s.alignment_batch_size, int) or s.alignment_batch_size < 1:
            raise ValueError("bds alignment_batch_size must be an int >= 1")

    def setup(self, model, tokenizer, data, optimizer) -> None:
        super().setup(model, tokenizer, data, optimizer)
        self.check_data(data)
        device = self.params[0].device
        self.align_batches = RowBatches(data.alignment, tokenizer, batch_size=self.settings.alignment_batch_size,
                                        max_length=data.max_length, seed=data.seed + 2,
                                        what="alignment rows", device=device)
        self.n_user = self.n_train  # examples in the user step's order (set by the runner)
        if self.settings.scheduler == "scalar" and self.n_user < 1:
            raise ValueError("bds: n_train (the number of user examples) must be set before setup; "
                             "run_defense sets it")
        if self.settings.scheduler == "scalar":
            self.logits = torch.zeros(self.n_user, device=device, requires_grad=True)
            self.weight_params = [self.logits]
        else:
            self.scorer = SampleScorer(len(tokenizer), self.settings.encoder_dim).to(device)
            self.weight_params = list(self.scorer.parameters())
        self.weight_opt = torch.optim.AdamW(self.weight_params, lr=self.settings.weight_lr)
        self._pending = None

    def weights(self, batch, indices) -> torch.Tensor:
        if self.settings.scheduler == "scalar":
            w_all = self.n_user * torch.softmax(self.logits, dim=0)
            return w_all[torch.as_tensor(indices, device=w_all.device)]
        scores = self.scorer(batch["input_ids"], batch["attention_mask"])
        return scores.numel() * torch.softmax(scores, dim=0)

    def loss(self, model, batch, indices, source):
        sums, counts = sample_losses(model, batch)
        per_sample = sums / counts.clamp_min(1)
        w = self.weights(batch, indices)
        user = (w.detach() * per_sample).mean()
        align_batch, _ = self.align_batches.next()
        self._pending = (batch, list(indices), per_sample.detach())
        return mean_token_loss(model, align_batch) + user

    def after_step(self, optimizer) -> dict:
        batch, indices, per_sample = self._pending
        self.weight_opt.zero_grad(set_to_none=True)
        objective = (self.weights(batch, indices) * per_sample).mean()
        objective.backward()
        self.weight_opt.step()
        self._pending = None
        return {}

    def sample_weights(self) -> torch.Tensor:
        """Current weights of all user samples (scalar scheduler)."""
        if self.settings.scheduler != "scalar":
            raise ValueError("sample_weights: only the scalar scheduler keeps one weight per sample")
        return (self.n_user * torch.softmax(self.logits.detach(), 0)).cpu()
