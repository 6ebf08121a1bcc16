"""The interface every defense implements, and the loss pieces they share.

A defense says which data it needs (``NEEDS``: user data, alignment data, the safety pool) and
in which stage it acts (``STAGE``: alignment, fine-tuning or both). The runner
(`spard.defenses.loop.run_defense`) calls its hooks in this order:

    model = defense.alignment_stage(model, tokenizer, data)   # before LoRA fine-tuning
    rows  = defense.training_rows(data)                       # what the user step trains on
    defense.setup(model, tokenizer, data, optimizer)          # after LoRA, before step 1
    every step:
        source = defense.source(step)          # "user" or "alignment" (Lisa's phases)
        loss = defense.loss(model, batch, idx, source);  loss.backward()
        defense.after_backward()               # gradient surgery (SafeGrad)
        clip, optimizer.step()
        defense.after_step(optimizer)          # SPAG projection, BDS scheduler step
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from spard.checkpoint import ResumableOrder
from spard.formatting import IGNORE_INDEX, collate, pad_id_of
from spard.spag import encode_rows, trainable_parameters

STAGES = ("alignment", "fine-tuning", "both")
DATA_KINDS = ("user", "alignment", "safety_pool")


@dataclass
class DefenseData:
    """The data a defense may use. ``user``: the fine-tuning set as submitted ({prompt,
    response}, harmful rows included); ``safety_pool``: rows {prompt, safe, unsafe};
    ``alignment``: refusal rows {prompt, response} (by default the pool's safe answers)."""

    user: list[dict]
    safety_pool: list[dict] = field(default_factory=list)
    alignment: Optional[list[dict]] = None
    seed: int = 0
    max_length: int = 512

    def __post_init__(self):
        if not self.user:
            raise ValueError("DefenseData.user: the fine-tuning set is empty")
        if self.alignment is None:
            self.alignment = [{"prompt": r["prompt"], "response": r["safe"]} for r in self.safety_pool]

    @property
    def harmful(self) -> list[dict]:
        """The pool's harmful demonstrations (prompt -> unsafe), for Booster/Antibody's
        alignment stage."""
        return [{"prompt": r["prompt"], "response": r["unsafe"]} for r in self.safety_pool if r.get("unsafe")]


class Defense:
    """Base class: plain fine-tuning with every hook a no-op. Subclasses set NAME, STAGE,
    NEEDS and a ``Settings`` dataclass whose defaults are the paper's."""

    NAME = "base"
    STAGE = "fine-tuning"
    NEEDS: tuple[str, ...] = ("user",)
    n_train = 0
    """Training examples (set by the runner before ``setup``; per-sample schedulers use it)."""
    train_prompts: Sequence[str] = ()
    """Prompts of the training examples in index order (set by the runner)."""

    @dataclass
    class Settings:
        pass

    def __init__(self, **settings):
        fields = {f.name for f in dataclasses.fields(self.Settings)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ValueError(f"defense {self.NAME!r}: unknown setting(s) {unknown}; "
                             f"known: {sorted(fields) or 'none'}")
        self.settings = self.Settings(**settings)
        self.validate()
        self.logs: dict[str, list[float]] = {}

    def validate(self) -> None:
        """Raises ValueError naming a bad setting."""

    def describe(self) -> dict:
        return {"name": self.NAME, "stage": self.STAGE, "needs": list(self.NEEDS),
                "settings": dataclasses.asdict(self.settings)}

    def needs_harmful_answers(self) -> bool:
        """Whether an alignment stage trains against the pool's harmful answers (``unsafe``):
        Booster, Antibody with its stage. Other defenses need only the refusals."""
        return self.STAGE in ("alignment", "both") and "safety_pool" in self.describe()["needs"]

    def check_data(self, data: DefenseData) -> None:
        if "alignment" in self.NEEDS and not data.alignment:
            raise ValueError(f"defense {self.NAME!r} needs alignment data (refusal rows): "
                             "give a safety pool or alignment rows")
        if "safety_pool" in self.NEEDS and not data.safety_pool:
            raise ValueError(f"defense {self.NAME!r} needs a safety pool (prompt/safe rows)")
        if self.needs_harmful_answers() and not data.harmful:
            raise ValueError(f"defense {self.NAME!r} trains against harmful answers: its safety pool needs an "
                             "'unsafe' field")

    # -- hooks --------------------------------------------------------------------------------
    def alignment_stage(self, model, tokenizer, data: DefenseData):
        return model

    def training_rows(self, data: DefenseData) -> list[dict]:
        return list(data.user)

    def setup(self, model, tokenizer, data: DefenseData, optimizer) -> None:
        self.model, self.tokenizer, self.optimizer = model, tokenizer, optimizer
        self.params = trainable_parameters(model)

    def total_steps(self, user_steps: int) -> int:
        """Optimizer steps for a run whose user data needs ``user_steps`` steps."""
        return user_steps

    def source(self, step: int) -> str:
        return "user"

    def loss(self, model, batch: dict, indices: Sequence[int], source: str) -> Tensor:
        return mean_token_loss(model, batch)

    def after_backward(self) -> dict:
        return {}

    def after_step(self, optimizer) -> dict:
        return {}

    def summary(self) -> dict:
        return {}

    def log(self, **values) -> None:
        for k, v in values.items():
            self.logs.setdefault(k, []).append(float(v))


# ----------------------------------------------------------------------------------------------
# Loss pieces
# ----------------------------------------------------------------------------------------------
def token_losses(model, batch: dict) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy [B, T-1] (0 on unlabelled positions) and the label mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    return ce, (labels != IGNORE_INDEX)


def sample_losses(model, batch: dict) -> tuple[Tensor, Tensor]:
    """(summed loss per sample [B], labelled tokens per sample [B])."""
    ce, mask = token_losses(model, batch)
    return ce.sum(dim=1), mask.sum(dim=1)


def mean_token_loss(model, batch: dict) -> Tensor:
    sums, counts = sample_losses(model, batch)
    return sums.sum() / counts.sum().clamp_min(1)


class RowBatches:
    """Endless, seeded batches over encoded rows (reshuffled every pass)."""

    def __init__(self, rows: Sequence[dict], tokenizer, *, batch_size: int, max_length: int,
                 seed: int, what: str, device=None, examples=None):
        if examples is None:
            if not rows:
                raise ValueError(f"{what}: no rows")
            examples, _ = encode_rows(rows, tokenizer, max_length, what)
        self.examples = list(examples)
        self.pad_id = pad_id_of(tokenizer)
        self.batch_size = batch_size
        self.order = ResumableOrder(len(self.examples), seed=seed)
        self.device = device

    def __len__(self) -> int:
        return len(self.examples)

    def batch_of(self, indices: Sequence[int]) -> dict:
        b = collate([self.examples[i] for i in indices], self.pad_id)
        return {k: v.to(self.device) for k, v in b.items()} if self.device is not None else b

    def next(self) -> tuple[dict, list[int]]:
        idx = list(self.order.take(self.batch_size))
        return self.batch_of(idx), idx


def grads_of(loss: Tensor, params: Sequence[Tensor]) -> list[Optional[Tensor]]:
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def flat_dot(a: Sequence[Optional[Tensor]], b: Sequence[Optional[Tensor]]) -> Tensor:
    return sum(((x.float() * y.float()).sum() for x, y in zip(a, b) if x is not None and y is not None),
               torch.zeros(()))


def flat_norm(a: Sequence[Optional[Tensor]]) -> Tensor:
    return flat_dot(a, a).sqrt()
