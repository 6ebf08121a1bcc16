"""SafeGrad (2025): gradient surgery. After the utility backward pass, the utility gradient u is
projected so that it does not increase the alignment loss to first order:
``u <- u - min(0, <u, s>) / ||s||² · s``, s = the alignment gradient (one fused
`spard_ext.project_` call with a = -s, b = 0). The alignment loss is the cross-entropy on
refusal rows, or (``alignment_loss="kl"``) the KL from the aligned model's next-token
distribution on them (the aligned model = the same model with the adapter disabled)."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import spard_ext

from .base import Defense, RowBatches, grads_of, mean_token_loss


class SafeGrad(Defense):
    NAME = "safegrad"
    STAGE = "fine-tuning"
    NEEDS = ("user", "alignment")

    @dataclass
    class Settings:
        alignment_batch_size: int = 8
        alignment_loss: str = "ce"
        """"ce" (refusal cross-entropy) or "kl" (KL to the aligned model's outputs)."""

    def validate(self) -> None:
        if self.settings.alignment_loss not in ("ce", "kl"):
            raise ValueError(f"safegrad alignment_loss must be 'ce' or 'kl', got {self.settings.alignment_loss!r}")
        if not isinstance(self.settings.alignment_batch_size, int) or self.settings.alignment_batch_size < 1:
            raise ValueError("safegrad alignment_batch_size must be an int >= 1")

    def setup(self, model, tokenizer, data, optimizer) -> None:
        super().setup(model, tokenizer, data, optimizer)
        self.check_data(data)
        self.batches = RowBatches(data.alignment, tokenizer, batch_size=self.settings.alignment_batch_size,
                                  max_length=data.max_length, seed=data.seed + 1, what="alignment rows",
                                  device=self.params[0].device)
        if self.settings.alignment_loss == "kl" and not hasattr(model, "disable_adapter"):
            raise ValueError("safegrad alignment_loss='kl' needs a peft model (the adapter is "
                             "disabled to get the aligned model's outputs)")

    def alignment_loss(self, model, batch) -> torch.Tensor:
        if self.settings.alignment_loss == "ce":
            return mean_token_loss(model, batch)
        return kl_to_reference(model, batch)

    def after_backward(self) -> dict:
        batch, _ = self.batches.next()
        s = grads_of(self.alignment_loss(self.model, batch), self.params)
        u = [p.grad for p in self.params]
        neg_s = [None if g is None or ui is None else -g for g, ui in zip(s, u)]
        res = spard_ext.project_(u, neg_s, 0.0, use_dot=True)
        self.log(surgery=float(res.coef > 0))
        return {"surgery": (res.coef > 0).float()}

    def summary(self) -> dict:
        hits = self.logs.get("surgery", [])
        return {"surgery_rate": sum(hits) / len(hits) if hits else 0.0}


def kl_to_reference(model, batch) -> torch.Tensor:
    """Token-mean KL(p_aligned || p_θ) over the labelled positions; p_aligned from the same peft
    model with its adapter disabled."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), (model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()):
        ref = model(**inputs).logits[:, :-1].float().log_softmax(-1)
    cur = model(**inputs).logits[:, :-1].float().log_softmax(-1)
    mask = (batch["labels"][:, 1:] != -100).float()
    kl = F.kl_div(cur, ref, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)
