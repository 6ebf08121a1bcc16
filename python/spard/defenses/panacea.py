"""Panacea (Wang et al., NeurIPS 2025): an adaptive perturbation, optimised during fine-tuning
and added to the model after it.

    max_w max_{||ε|| <= ρ}  λ (h(w + ε) - h(w)) - g(w)
    g: the fine-tuning loss (the user's batch); h: the harmful loss (a batch of harmful rows)
    every step t:
        ε_t = ρ ∇h(w_t) / ||∇h(w_t)||                         (the inner maximum, closed form)
        w_{t+1} = w_t - η (∇g(w_t) - λ (∇h(w_t + ε_t) - ∇h(w_t)))   (the trainer's optimizer)
    after fine-tuning: w_T + ε, the last step's ε (||ε|| = ρ)

Defaults are the paper's: ρ = 1, λ = 0.001, a harmful batch of 10 rows (its released code's).
Our reading fills a gap: the harmful rows are the safety pool's unsafe answers (the paper's
BeaverTails harmful set), and, as the released code does, the ε added at the end is the one of
the last step (computed at w_{T-1}) rather than a fresh one at w_T; the released code's clamp of
h(w + ε) at 5 is left out (the paper does not state it).

The perturbation and the gradients live on the trainable (LoRA) parameters. The harmful batch is
global and split across ranks like SafeGrad's alignment batch (its loss and gradient are global
token means); ||∇h|| is reduced over shards under FSDP; ε is checkpointed as whole tensors, so a
run resumed after its last step still adds it exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spard.distributed import all_reduce_sum, full_tensor, is_distributed, is_sharded, local_tensor
from spard.space import Float, require_int, require_number

from .base import Defense, DefenseData, TrainContext
from .safegrad import AlignmentGradient


class Panacea(Defense):
    NAME = "panacea"
    STAGE = "post-fine-tuning"
    NEEDS = ("user", "safety_pool")
    # Tuning space: the paper's sweeps of ρ and λ, by decades around its defaults.
    SEARCH_SPACE = {"rho": Float(0.1, 10.0, log=True), "lam": Float(1e-4, 1e-1, log=True)}

    @dataclass
    class Settings:
        rho: float = 1.0
        """ρ, the perturbation's L2 norm over the trainable parameters (paper: 1)."""
        lam: float = 0.001
        """λ, the weight of the harmful-loss increase (paper: 0.001)."""
        harmful_batch_size: int = 10
        """Harmful rows per step (the global batch; released code: 10)."""

    def validate(self) -> None:
        s = self.settings
        require_number("panacea rho", s.rho)
        require_number("panacea lam", s.lam)
        require_int("panacea harmful_batch_size", s.harmful_batch_size, 1)

    def needs_harmful_answers(self) -> bool:
        return True  # h is the loss on the pool's harmful answers

    def setup(self, model, tokenizer, data, optimizer, ctx) -> None:
        super().setup(model, tokenizer, data, optimizer, ctx)
        self.check_data(data)
        self.harm = AlignmentGradient(model, data.harmful, tokenizer, tau=0.0,
                                      batch_size=self.settings.harmful_batch_size,
                                      micro_batch_size=ctx.micro_batch_size, max_length=data.max_length,
                                      seed=data.seed + 7, progress=False)
        self.epsilon = None  # ε of the last step (the trainable parameters' layout)
        self.applied = False

    def perturbation(self, grads) -> tuple[list, torch.Tensor]:
        """ε = ρ g / ||g|| (None where a parameter has no gradient) and ||g||."""
        sq = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for g in grads:
            if g is not None:
                sq = sq + local_tensor(g).double().pow(2).sum()
        if any(g is not None and is_sharded(g) for g in grads) and is_distributed():
            all_reduce_sum([sq])  # shards' partial sums: the whole norm on every rank
        norm = sq.sqrt()
        scale = float(self.settings.rho / (norm + 1e-7))  # a number: DTensor gradients take it too
        return [None if g is None else g * scale for g in grads], norm

    @torch.no_grad()
    def _shift(self, eps, sign: float) -> None:
        for p, e in zip(self.params, eps):
            if e is not None:
                local_tensor(p).add_(local_tensor(e).to(p.dtype), alpha=sign)

    def after_backward(self) -> dict:
        s = self.settings
        batch = self.harm.next_batch()
        harm_loss, g_h = self.harm.loss_and_grads(batch)
        eps, g_norm = self.perturbation(g_h)
        saved = [local_tensor(p).detach().clone() for p in self.params]
        try:
            self._shift(eps, 1.0)  # w + ε
            harm_loss_eps, g_h_eps = self.harm.loss_and_grads(batch)
        finally:
            with torch.no_grad():  # w, bit for bit
                for p, v in zip(self.params, saved):
                    local_tensor(p).copy_(v)
        # ∇ of g(w) - λ (h(w + ε) - h(w)): the user gradient is in p.grad already.
        with torch.no_grad():
            for p, a, b in zip(self.params, g_h, g_h_eps):
                if a is None or b is None or p.grad is None:
                    continue
                local_tensor(p.grad).add_(local_tensor(b) - local_tensor(a), alpha=-s.lam)
        self.epsilon = [None if e is None else e.detach() for e in eps]
        return {"harmful_loss": harm_loss, "harmful_loss_perturbed": harm_loss_eps,
                "harmful_grad_norm": g_norm.float()}

    def after_training(self, model, tokenizer, data: DefenseData, ctx: TrainContext):
        if self.epsilon is None:
            raise ValueError("panacea: no perturbation to add (the run made no optimizer step)")
        if not self.applied:  # once, whatever calls the stage again on the same run
            self._shift(self.epsilon, 1.0)
            self.applied = True
        return model

    def epsilon_norm(self) -> float:
        """||ε|| over every parameter (a collective under FSDP)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for e in self.epsilon or []:
            if e is not None:
                sq = sq + local_tensor(e).double().pow(2).sum()
        if any(e is not None and is_sharded(e) for e in self.epsilon or []) and is_distributed():
            all_reduce_sum([sq])
        return float(sq.sqrt())

    def summary(self) -> dict:
        return {"epsilon_norm": self.epsilon_norm() if self.epsilon is not None else None,
                "applied": self.applied}

    def state_dict(self) -> dict:
        eps = None if self.epsilon is None else [None if e is None else full_tensor(e).cpu() for e in self.epsilon]
        return {"order": self.harm.order.state_dict(), "epsilon": eps, "applied": self.applied}

    def load_state_dict(self, state: dict) -> None:
        self.harm.order.load_state_dict(state["order"])
        self.applied = bool(state["applied"])
        if state["epsilon"] is None:
            self.epsilon = None
            return
        eps = []
        for p, e in zip(self.params, state["epsilon"]):
            if e is None:
                eps.append(None)
                continue
            e = e.to(device=local_tensor(p).device)
            if is_sharded(p):
                from torch.distributed.tensor import distribute_tensor
                e = distribute_tensor(e, p.device_mesh, p.placements)
            eps.append(e)
        self.epsilon = eps
