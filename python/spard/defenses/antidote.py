"""Antidote (Huang et al., 2024/ICLR 2025): after fine-tuning, one-shot pruning of the weights
that carry the harmful behaviour.

    1. re-alignment set D_h = up to ``calibration_rows`` harmful rows (prompt -> unsafe answer)
    2. one forward pass of the fine-tuned model over D_h; for every fine-tuned weight matrix W
       (the LoRA A and B of each adapted layer) with input X:  S_ij = |W_ij| · ||X_j||_2
       (the Wanda score, X_j = input feature j over every non-padding token of D_h)
    3. in each output row i, the ⌈r · n_in⌉ weights of largest S_ij are set to 0 (mask ratio r)

Defaults: r = 0.1 and 2,000 re-alignment rows, the released code's SST-2 setting (its GSM8K
script uses r = 0.05). Our reading fills a gap: the paper prunes "the harmful parameters" of
the fine-tuned model; like the released code we score and prune the LoRA matrices (the weights
fine-tuning changed), per output row as Wanda groups them, from one forward pass rather than
Wanda's layer-by-layer propagation (the same activations, since nothing is pruned before the
masks are all computed).

Every rank runs the same forward pass (DDP: the inner module; FSDP: the sharded model, whose
layers gather their weights as they run); scores are computed on the whole (gathered) matrices
and each rank zeroes its own shard, so the pruned model is the single-process one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from spard.training.batches import micro_batches
from spard.distributed import full_tensor, is_sharded, local_tensor, unwrap
from spard.formatting import pad_id_of
from spard.spag import encode_rows
from spard.space import Float, require_int, require_number

from .base import Defense, DefenseData, TrainContext


def pruned_count(n_in: int, ratio: float) -> int:
    """Weights pruned per output row: ⌈r · n_in⌉ (at most the row)."""
    return min(n_in, math.ceil(n_in * ratio - 1e-9))


def wanda_mask(weight: torch.Tensor, input_norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """A bool mask of the weights to prune: in each row, the ``pruned_count`` largest
    |W_ij| · ||X_j|| (ties: the lower column first, a stable sort)."""
    score = weight.detach().abs().float() * input_norm.float().reshape(1, -1)
    k = pruned_count(score.shape[1], ratio)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        order = torch.sort(-score, dim=1, stable=True).indices[:, :k]
        mask.scatter_(1, order, True)
    return mask


def lora_linears(model) -> dict[str, torch.nn.Linear]:
    """The fine-tuned weight matrices: every trainable LoRA A / B linear layer, by name."""
    out = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, torch.nn.Linear) and ".lora_" in f".{name}" and module.weight.requires_grad:
            out[name] = module
    return out


class Antidote(Defense):
    NAME = "antidote"
    STAGE = "post-fine-tuning"
    NEEDS = ("user", "safety_pool")
    # Tuning space: the mask ratio a decade around the paper's 0.05-0.1.
    SEARCH_SPACE = {"mask_ratio": Float(0.01, 0.3, log=True)}

    @dataclass
    class Settings:
        mask_ratio: float = 0.1
        """r, the share of each fine-tuned weight row pruned (released code: 0.1 SST-2, 0.05 GSM8K)."""
        calibration_rows: int = 2000
        """Harmful rows the Wanda scores are taken over (paper: 2,000; fewer when the pool has fewer)."""

    def validate(self) -> None:
        s = self.settings
        require_number("antidote mask_ratio", s.mask_ratio, low_open=True, high=1.0)
        require_int("antidote calibration_rows", s.calibration_rows, 1)

    def needs_harmful_answers(self) -> bool:
        return True  # the re-alignment set is the pool's harmful answers

    def calibration(self, data: DefenseData) -> list[dict]:
        harmful = data.harmful
        n = min(self.settings.calibration_rows, len(harmful))
        return [harmful[i] for i in sorted(random.Random(data.seed).sample(range(len(harmful)), n))]

    @torch.no_grad()
    def input_norms(self, model, tokenizer, data: DefenseData, ctx: TrainContext, layers: dict) -> dict:
        """||X_j||_2 per input feature of every layer, over the non-padding tokens of D_h."""
        examples, _ = encode_rows(self.calibration(data), tokenizer, data.max_length, "harmful rows")
        micro = micro_batches(examples, list(range(len(examples))), pad_id=pad_id_of(tokenizer),
                              micro_batch_size=ctx.micro_batch_size, device=ctx.device)
        sq = {name: torch.zeros(m.in_features, dtype=torch.float64, device=ctx.device) for name, m in layers.items()}
        current = {}

        def hook(name):
            def record(_module, inputs, _output):
                x = inputs[0].detach().double()
                keep = current["mask"].reshape(-1)
                sq[name] += x.reshape(-1, x.shape[-1])[keep].pow(2).sum(0)
            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
        # FSDP runs the sharded model (its layers gather their weights); otherwise the inner module.
        runner = model if any(is_sharded(m.weight) for m in layers.values()) else unwrap(model)
        try:
            for mb in micro:
                current["mask"] = mb.batch["attention_mask"].bool()
                with ctx.autocast():
                    runner(input_ids=mb.batch["input_ids"], attention_mask=mb.batch["attention_mask"])
        finally:
            for h in handles:
                h.remove()
        return {name: v.sqrt() for name, v in sq.items()}

    def after_training(self, model, tokenizer, data: DefenseData, ctx: TrainContext):
        self.check_data(data)
        layers = lora_linears(model)
        if not layers:
            raise ValueError("antidote prunes the fine-tuned LoRA matrices: the model has no trainable LoRA layers")
        was_training = model.training
        model.eval()
        try:
            norms = self.input_norms(model, tokenizer, data, ctx, layers)
        finally:
            model.train(was_training)
        pruned = total = 0
        with torch.no_grad():
            for name, m in layers.items():
                w = m.weight
                mask = wanda_mask(full_tensor(w.detach()), norms[name], self.settings.mask_ratio)
                if is_sharded(w):  # this rank's rows of the mask (FSDP2 shards dim 0)
                    from torch.distributed.tensor import distribute_tensor
                    mask = distribute_tensor(mask, w.device_mesh, w.placements).to_local()
                local_tensor(w).masked_fill_(mask.to(local_tensor(w).device), 0)
                pruned += pruned_count(m.in_features, self.settings.mask_ratio) * m.out_features
                total += m.weight.numel()
        self.report = {"pruned_weights": pruned, "fine_tuned_weights": total, "layers": len(layers)}
        return model

    def summary(self) -> dict:
        return dict(getattr(self, "report", {}))
