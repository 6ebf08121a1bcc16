"""The SPAG projector on several ranks (DDP and FSDP2): a global safety batch split across ranks,
reduced losses and gradients, one projection coefficient everywhere (docs/distributed.md)."""

from __future__ import annotations

import torch
import torch.distributed as dist

import spard_ext

from .training.checkpoint import ResumableOrder
from .distributed import (all_reduce_sum, broadcast_object, get_rank, get_world_size, is_distributed, is_sharded,
                          project_across_ranks, rank_share, unwrap)
from .spag import SafetyProjector


class DistributedSafetyProjector(SafetyProjector):
    """SafetyProjector whose safety batch is global and split across ranks.

    Works with a DDP-wrapped model (the safety pass runs on the inner module, its gradients
    are all-reduced) and with an FSDP2 model (the safety pass runs through FSDP, whose
    reduce-scatter leaves each rank its gradient shard). With one process it is exactly
    SafetyProjector. ``batch_size`` is the global safety batch and must be a multiple of
    the number of ranks (FSDP needs the same number of forward passes on every rank).
    """

    def __init__(self, model, safe_rows, tokenizer, *, process_group=None, seed: int = 0, **kwargs):
        group = process_group
        if group is None and is_distributed():
            group = dist.group.WORLD
        super().__init__(unwrap(model), safe_rows, tokenizer, process_group=group, seed=seed,
                         **kwargs)
        self.world_size, self.rank = get_world_size(group), get_rank(group)
        self.sharded = any(is_sharded(p) for p in self.params)
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size (the global safety batch) must be a multiple of the "
                             f"{self.world_size} ranks, got {self.batch_size}")
        if self.sharded and self.mode == "official":
            raise NotImplementedError("mode='official' steps the optimizer with per-tensor "
                                      "scaled gradients; under FSDP use mode='paper' (or DDP)")
        self.order = ResumableOrder(len(self.examples), seed=seed)  # one order on every rank

    def next_batch(self):
        # The global batch (the same order on every rank); this rank's share of it.
        return self._micro_batches(rank_share(self.order.take(self.batch_size), self.rank,
                                              self.world_size))

    def loss_and_grads(self, micro_batches, *, flat: bool = False):
        if not self._distributed():
            return super().loss_and_grads(micro_batches, flat=flat)
        total = self.reduce_count(sum(mb["n_tokens"] for mb in micro_batches)).clamp_min(1)
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        was_training = self._with_mode()
        try:
            if self.sharded:
                grads = self._sharded_grads(micro_batches, total, loss)
            else:
                grads = self._replicated_grads(micro_batches, total, loss, flat)
        finally:
            self.model.train(was_training)
        all_reduce_sum([loss], self.process_group)
        return loss, grads

    def _replicated_grads(self, micro_batches, total, loss, flat: bool = False):
        grads = [None] * len(self.params)
        with torch.enable_grad():
            for i, mb in enumerate(micro_batches):
                part = self._loss_sum(mb) / total
                g = torch.autograd.grad(part, self.params, allow_unused=True)
                grads = self._accumulate(grads, g, first=i == 0, flat=flat)
                loss += part.detach()
        if flat:  # the flat buffers already hold zeros for unused parameters: one collective each
            all_reduce_sum(self._grad_buffers, self.process_group)
            return grads
        # Every rank must all-reduce the same list: an unused parameter gets zeros. One packed
        # collective for all tensors (LoRA has hundreds of small ones).
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        all_reduce_sum(grads, self.process_group)
        return grads

    def _sharded_grads(self, micro_batches, total, loss):
        # FSDP only reduces gradients through backward(); the utility gradients in .grad
        # are put aside and restored, so the safety pass leaves them as they were.
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            with torch.enable_grad():
                for mb in micro_batches:
                    part = self._loss_sum(mb) / total
                    # FSDP averages over ranks; the loss is already a global mean: undo it.
                    (part * self.world_size).backward()
                    loss += part.detach()
            return [p.grad for p in self.params]
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g

    def _paper_step(self, loss, grads, optimizer):
        if not self._distributed():
            return super()._paper_step(loss, grads, optimizer)
        # ℓ is the same reduced value on every rank; a non-finite ℓ anywhere made it
        # non-finite everywhere, and b = +inf makes every rank step by 0.
        finite_loss = torch.isfinite(loss)
        b = torch.where(finite_loss, self.tau - loss, torch.full_like(loss, float("inf")))
        if self._on_layout(grads):  # replicated: no sums to all-reduce
            res = spard_ext.project_(self.layout, self._grad_buffers, b.float(), max_step=self._cap(optimizer))
            coef, sqnorm = res.coef, res.sqnorm
        else:
            coef, sqnorm = project_across_ranks(self.params, grads, b.float(),
                                                max_step=self._cap(optimizer), group=self.process_group)
        skipped = ~(finite_loss & torch.isfinite(sqnorm))
        return {"safety_loss": loss, "alpha": coef, "trigger": (coef > 0).float(),
                "grad_sqnorm": sqnorm, "skipped": skipped.float(),
                "safety_loss_after": loss - coef * sqnorm}

    def calibrate_tau(self, max_batches=None) -> float:
        tau = super().calibrate_tau(max_batches)
        # Every rank computed it; rank 0's value is used so α is bitwise equal everywhere.
        self.tau = float(broadcast_object(tau, src=0, group=self.process_group))
        return self.tau
