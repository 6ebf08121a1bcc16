"""SafeGrad (2025): gradient surgery. After the utility backward pass, the utility gradient u is
projected so that it does not increase the alignment loss to first order:
``u <- u - min(0, <u, s>) / ||s||² · s``, s = the alignment gradient (one fused
`spard_ext.project_` call with a = -s, b = 0). The alignment loss is the cross-entropy on
refusal rows, or (``alignment_loss="kl"``) the KL from the aligned model's next-token
distribution on them (the aligned model = the same model with the adapter disabled).

The alignment batch is micro-batched and, on several ranks, split across them: s is a global
token mean (all-reduced under DDP; under FSDP each rank holds its shard and <u, s>, ||s||² are
all-reduced partial sums, `spard.distributed.project_across_ranks`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spard.distributed import project_across_ranks
from spard.spag_distributed import DistributedSafetyProjector
from spard.space import Choice, require_int

from .base import Defense


class AlignmentGradient(DistributedSafetyProjector):
    """The alignment loss and its gradient over a global, micro-batched batch of refusal rows:
    the safety projector's machinery (one process, DDP or FSDP) with SafeGrad's loss."""

    def __init__(self, *args, loss: str = "ce", **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_kind = loss

    def _loss_sum(self, micro_batch):
        if self.loss_kind == "ce":
            return super()._loss_sum(micro_batch)
        return kl_sum_to_reference(self.model, micro_batch)


class SafeGrad(Defense):
    NAME = "safegrad"
    STAGE = "fine-tuning"
    NEEDS = ("user", "alignment")
    # Tuning space: the alignment loss the gradient surgery protects.
    SEARCH_SPACE = {"alignment_loss": Choice(("ce", "kl"))}

    @dataclass
    class Settings:
        alignment_batch_size: int = 8
        alignment_loss: str = "ce"
        """"ce" (refusal cross-entropy) or "kl" (KL to the aligned model's outputs)."""

    def validate(self) -> None:
        if self.settings.alignment_loss not in ("ce", "kl"):
            raise ValueError(f"safegrad alignment_loss must be 'ce' or 'kl', got {self.settings.alignment_loss!r}")
        require_int("safegrad alignment_batch_size", self.settings.alignment_batch_size, 1)

    def setup(self, model, tokenizer, data, optimizer, ctx) -> None:
        super().setup(model, tokenizer, data, optimizer, ctx)
        self.check_data(data)
        if self.settings.alignment_loss == "kl" and not hasattr(_peft(model), "disable_adapter"):
            raise ValueError("safegrad alignment_loss='kl' needs a peft model (the adapter is "
                             "disabled to get the aligned model's outputs)")
        self.gradient = AlignmentGradient(model, data.alignment, tokenizer, tau=0.0,
                                          batch_size=self.settings.alignment_batch_size,
                                          micro_batch_size=ctx.micro_batch_size, max_length=data.max_length,
                                          seed=data.seed + 1, progress=False,
                                          loss=self.settings.alignment_loss)

    def after_backward(self) -> dict:
        _, s = self.gradient.loss_and_grads(self.gradient.next_batch())
        u = [p.grad for p in self.params]
        neg_s = [None if g is None or ui is None else -g for g, ui in zip(s, u)]
        keep = [i for i, (g, ui) in enumerate(zip(neg_s, u)) if g is not None]
        coef, _ = project_across_ranks([u[i] for i in keep], [neg_s[i] for i in keep],
                                       torch.zeros((), device=self.ctx.device), use_dot=True)
        hit = (coef > 0).float()
        self.log(surgery=float(hit))
        return {"surgery": hit}

    def summary(self) -> dict:
        hits = self.logs.get("surgery", [])
        return {"surgery_rate": sum(hits) / len(hits) if hits else 0.0}

    def state_dict(self) -> dict:
        return {"order": self.gradient.order.state_dict(), "surgery": list(self.logs.get("surgery", []))}

    def load_state_dict(self, state: dict) -> None:
        self.gradient.order.load_state_dict(state["order"])
        self.logs["surgery"] = list(state["surgery"])


def _peft(model):
    from spard.distributed import unwrap
    return unwrap(model)


def kl_sum_to_reference(model, batch) -> torch.Tensor:
    """Summed KL(p_aligned || p_θ) over the labelled positions; p_aligned from the same peft
    model with its adapter disabled."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    peft = _peft(model)
    with torch.no_grad(), (peft.disable_adapter() if hasattr(peft, "disable_adapter") else nullcontext()):
        ref = model(**inputs).logits[:, :-1].float().log_softmax(-1)
    cur = model(**inputs).logits[:, :-1].float().log_softmax(-1)
    mask = (batch["labels"][:, 1:] != -100).float()
    kl = F.kl_div(cur, ref, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum()


def kl_to_reference(model, batch) -> torch.Tensor:
    """Token-mean KL(p_aligned || p_θ) over the labelled positions."""
    mask = (batch["labels"][:, 1:] != -100).float()
    return kl_sum_to_reference(model, batch) / mask.sum().clamp_min(1)
