"""The interface every defense implements, and the loss pieces they share.

A defense says which data it needs (``NEEDS``: user data, alignment data, the safety pool, the
base model before alignment) and in which stage it acts (``STAGE``: alignment, fine-tuning,
both, or post-fine-tuning). The one trainer
(`spard.trainer`) calls its hooks in this order:

    model = defense.alignment_stage(model, tokenizer, data)   # before LoRA fine-tuning
    rows  = defense.training_rows(data)                       # what the user step trains on
    defense.setup(model, tokenizer, data, optimizer, ctx)     # after LoRA, before step 1
    defense.load_state_dict(state)                            # when resuming
    every step:
        source = defense.source(step)                  # "user" or "alignment" (Lisa's phases)
        micro = ctx.streams[source].take(global batch) # this rank's micro-batches
        for mb, term in defense.loss_terms(model, micro, source):
            (term(model, mb) * world_size).backward()  # each term: a share of a global mean
        defense.after_backward()                       # gradient surgery (SafeGrad)
        clip, optimizer.step()
        defense.after_step(optimizer)                  # SPAG projection, BDS scheduler step
    model = defense.after_training(model, tokenizer, data, ctx)  # once, after the last step

Each loss term divides a sum over its micro-batch by a normaliser taken over the whole
effective batch (every micro-batch on every rank), so batch 4 x accumulation 1 and batch 2 x
accumulation 2 give the same gradient, and so do one and two processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from spard.training.batches import BatchStream, MicroBatch
from spard.distributed import all_reduce_sum, get_rank, get_world_size, global_count
from spard.formatting import IGNORE_INDEX, conversation_of, pad_id_of, prompt_of, response_of, split_conversation
from spard.spag import encode_rows, trainable_parameters

STAGES = ("alignment", "fine-tuning", "both", "post-fine-tuning")
"""Where a defense acts: before fine-tuning (``alignment_stage``), during it (the step hooks),
both, or after it (``after_training``: a repair of the fine-tuned model)."""
DATA_KINDS = ("user", "alignment", "safety_pool", "base_model")

LossTerm = Callable[[torch.nn.Module, MicroBatch], Tensor]


@dataclass
class DefenseData:
    """The data a defense may use. ``user``: the fine-tuning set as submitted ({prompt,
    response}, harmful rows included); ``safety_pool``: rows {prompt, safe, unsafe} (``unsafe``
    may be missing: refusal-only pools); ``alignment``: refusal rows {prompt, response} (by
    default the pool's safe answers)."""

    user: list[dict]
    safety_pool: list[dict] = field(default_factory=list)
    alignment: Optional[list[dict]] = None
    seed: int = 0
    max_length: int = 512
    micro_batch_size: Optional[int] = None
    """Rows per forward pass in an alignment stage (the trainer sets the fine-tuning one)."""
    base_weights: Optional[dict] = None
    """The base model's parameters (the weights before safety alignment), name -> tensor under
    the aligned model's parameter names (before LoRA): the alignment direction is the aligned
    weights minus these. Loaded only for defenses whose ``NEEDS`` has "base_model"."""

    def __post_init__(self):
        if not self.user:
            raise ValueError("DefenseData.user: the fine-tuning set is empty")
        # Rows in any shape spard.formatting encodes (prompt/response, TRL's messages and
        # prompt/completion, text); each checked here so a bad row fails before any work.
        for name in ("user", "alignment"):
            for i, row in enumerate(getattr(self, name) or ()):
                check_training_row(row, f"DefenseData.{name}[{i}]")
        self.safety_pool = [pool_row(r, f"DefenseData.safety_pool[{i}]") for i, r in enumerate(self.safety_pool)]
        if self.alignment is None:
            self.alignment = [{"prompt": r["prompt"], "response": r["safe"]} for r in self.safety_pool
                              if r.get("safe")]

    @property
    def harmful(self) -> list[dict]:
        """The pool's harmful demonstrations (prompt -> unsafe), for Booster/Antibody's
        alignment stage."""
        return [{"prompt": r["prompt"], "response": r["unsafe"]} for r in self.safety_pool if r.get("unsafe")]


def check_training_row(row, where: str) -> None:
    """One line naming the row when it is in none of the shapes training encodes."""
    prompt_of(row, where)
    if conversation_of(row) is None and isinstance(row.get("prompt"), str):
        response_of(row, where)


def pool_row(row, where: str) -> dict:
    """A safety-pool row as {prompt, safe[, unsafe]}: as written by spard.data.load_safety, a
    conversation ending with the refusal (``messages``, or TRL's prompt/completion message
    lists), a prompt with its refusal in ``response``/``completion``, or TRL's preference rows
    (``prompt``, ``chosen`` = the refusal, ``rejected`` = the harmful answer; strings or messages)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a dict row, got {type(row).__name__}: {row!r:.80}")
    if isinstance(row.get("prompt"), str) and isinstance(row.get("safe"), str):
        return row
    if "chosen" in row and "prompt" in row:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row.get("rejected")
        if isinstance(prompt, (list, tuple)) and isinstance(chosen, (list, tuple)):
            text, safe = split_conversation(list(prompt) + list(chosen), where)
            unsafe = (split_conversation(list(prompt) + list(rejected), where)[1]
                      if isinstance(rejected, (list, tuple)) else None)
        elif isinstance(prompt, str) and isinstance(chosen, str):
            text, safe, unsafe = prompt, chosen, rejected if isinstance(rejected, str) else None
        else:
            raise ValueError(f"{where}: a preference row needs 'prompt' and 'chosen' both strings or both "
                             f"message lists; got {type(prompt).__name__} and {type(chosen).__name__}")
        return {"prompt": text, "safe": safe, **({"unsafe": unsafe} if unsafe else {})}
    messages = conversation_of(row)
    if messages is not None:
        text, safe = split_conversation(messages, where)
        return {"prompt": text, "safe": safe}
    if isinstance(row.get("prompt"), str) and any(isinstance(row.get(k), str) for k in ("response", "completion")):
        return {**row, "safe": response_of(row, where)}
    raise ValueError(f"{where}: a safety-pool row needs a string 'prompt' and 'safe' (and 'unsafe' for "
                     "defenses that train against harmful answers), a 'messages' conversation ending with "
                     f"the refusal, or TRL's preference shape (prompt, chosen, rejected); keys: {sorted(row)}")


@dataclass
class TrainContext:
    """What the trainer lends a defense in ``setup``: the streams it draws batches from, the
    effective batch, the micro-batch size and the forward-pass precision."""

    streams: dict
    global_batch: int
    micro_batch_size: int
    pad_id: int
    device: torch.device
    autocast: Callable
    max_length: int
    resume_state: Optional[dict] = None
    """The defense's state in the checkpoint being resumed (None for a fresh run): setup may
    skip work the state replaces (a selection, a calibration)."""

    def stream(self, rows: Sequence[dict], tokenizer, *, seed: int, what: str) -> BatchStream:
        """A new stream over ``rows`` micro-batched like the user data."""
        return encoded_stream(rows, tokenizer, max_length=self.max_length, micro_batch_size=self.micro_batch_size,
                              seed=seed, device=self.device, what=what)


class Defense:
    """Base class: plain fine-tuning with every hook a no-op. Subclasses set NAME, STAGE,
    NEEDS and a ``Settings`` dataclass whose defaults are the paper's."""

    NAME = "base"
    STAGE = "fine-tuning"
    NEEDS: tuple[str, ...] = ("user",)
    SEARCH_SPACE: dict = {}
    """Setting name -> range (spard.space) that ``spard bench --tune-defenses`` searches; the
    papers' own sweeps where they give them."""
    n_train = 0
    """Training examples (set by the trainer before ``setup``; per-sample schedulers use it)."""
    train_prompts: Sequence[str] = ()
    """Prompts of the training examples in index order (set by the trainer)."""

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
        if "base_model" in self.NEEDS and data.base_weights is None:
            raise ValueError(f"defense {self.NAME!r} needs the base model (the weights before safety alignment): "
                             "set base_model (the config's model.base_model, the bench file's base_model)")
        if self.needs_harmful_answers() and not data.harmful:
            raise ValueError(f"defense {self.NAME!r} trains against harmful answers: its safety pool needs an "
                             "'unsafe' field")

    # -- hooks --------------------------------------------------------------------------------
    def alignment_stage(self, model, tokenizer, data: DefenseData):
        return model

    def training_rows(self, data: DefenseData) -> list[dict]:
        return list(data.user)

    def setup(self, model, tokenizer, data: DefenseData, optimizer, ctx: TrainContext) -> None:
        self.model, self.tokenizer, self.optimizer, self.ctx = model, tokenizer, optimizer, ctx
        self.params = trainable_parameters(model)

    def total_steps(self, user_steps: int) -> int:
        """Optimizer steps for a run whose user data needs ``user_steps`` steps."""
        return user_steps

    def source(self, step: int) -> str:
        return "user"

    def loss_terms(self, model, micro: Sequence[MicroBatch], source: str) -> Iterable[tuple[MicroBatch, LossTerm]]:
        """(micro-batch, loss) pairs of one step; each loss is that micro-batch's share of the
        step's objective (default: the token mean over the effective batch)."""
        return token_mean_terms(micro, self.ctx.device)

    def after_backward(self) -> dict:
        return {}

    def after_step(self, optimizer) -> dict:
        return {}

    def after_training(self, model, tokenizer, data: DefenseData, ctx: TrainContext):
        """The post-fine-tuning stage: runs once after the last optimizer step and before
        evaluation (repairs such as Antidote, Safety at One Shot, Panacea); returns the model.

        ``model`` is the one ``setup`` got (wrapped under DDP/FSDP: every rank runs the stage);
        change it in place and return it (the trainer, its checkpoints and a Hugging Face
        Trainer keep their reference). Checkpoints and `spard train`'s adapter hold the trainable
        (LoRA) parameters: a repair that should outlive a resume or reach a saved adapter edits
        those. The stage runs seeded (``torch.manual_seed(data.seed)``); a run killed during it
        reruns it from the last step's checkpoint, a run killed after it does not rerun it."""
        return model

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"defense {self.NAME!r}: unexpected checkpoint state {sorted(state)}")

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


def token_mean_terms(micro: Sequence[MicroBatch], device, *, across_ranks: bool = True):
    """Terms whose sum over every micro-batch (and rank) is the token-mean loss.
    ``across_ranks=False``: a batch this process holds whole (an alignment stage that every
    rank runs identically)."""
    count = sum(mb.n_tokens for mb in micro)
    total = (global_count(count, device) if across_ranks
             else torch.tensor(float(count), device=device)).clamp_min(1)

    def term(model, mb: MicroBatch) -> Tensor:
        return sample_losses(model, mb.batch)[0].sum() / total

    return [(mb, term) for mb in micro]


def gather_per_sample(values: Sequence[Tensor]) -> tuple[Tensor, slice]:
    """Per-sample values of this rank's micro-batches, concatenated over every rank in rank
    order (the effective batch's order), and where this rank's samples sit in it. Zero-padded
    all-reduces, so ranks may hold different numbers of samples."""
    local = torch.cat([v.detach().reshape(-1) for v in values])
    world = get_world_size()
    if world == 1:
        return local, slice(0, local.numel())
    sizes = torch.zeros(world, dtype=torch.float64, device=local.device)
    sizes[get_rank()] = local.numel()
    all_reduce_sum([sizes])
    sizes = [int(s) for s in sizes.tolist()]
    start = sum(sizes[:get_rank()])
    full = torch.zeros(sum(sizes), dtype=torch.float64, device=local.device)
    full[start:start + local.numel()] = local.double()
    all_reduce_sum([full])
    return full.to(local.dtype), slice(start, start + local.numel())


def grads_of(loss: Tensor, params: Sequence[Tensor]) -> list[Optional[Tensor]]:
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def flat_dot(a: Sequence[Optional[Tensor]], b: Sequence[Optional[Tensor]]) -> Tensor:
    return sum(((x.float() * y.float()).sum() for x, y in zip(a, b) if x is not None and y is not None),
               torch.zeros(()))


def flat_norm(a: Sequence[Optional[Tensor]]) -> Tensor:
    return flat_dot(a, a).sqrt()


def per_micro_batch(values: Tensor, micro: Sequence[MicroBatch]) -> dict[int, Tensor]:
    """Per-sample ``values`` of this rank's micro-batches (concatenated in order), split back:
    ``id(micro_batch) -> its slice``."""
    return dict(zip(map(id, micro), values.split([len(mb) for mb in micro])))


def has_post_training(defense: "Defense") -> bool:
    """Whether ``defense`` has a post-fine-tuning stage (overrides ``after_training``; a
    composition: whether a member has one)."""
    members = getattr(defense, "members", None)  # spard.defenses.composed.Composed
    if members is not None:
        return any(has_post_training(m) for m in members)
    return type(defense).after_training is not Defense.after_training


def base_weights_of(model: torch.nn.Module) -> dict:
    """A model's parameters as ``DefenseData.base_weights`` (name -> detached tensor)."""
    return {n: p.detach() for n, p in model.named_parameters()}


def check_base_weights(model: torch.nn.Module, base: Optional[dict], what: str = "base_model") -> None:
    """One line naming the first parameter of the aligned ``model`` (before LoRA) that the base
    weights lack or hold with another shape."""
    if base is None:
        return
    for name, p in model.named_parameters():
        if name not in base:
            raise ValueError(f"{what}: has no parameter {name!r} of the aligned model (another architecture?)")
        if tuple(base[name].shape) != tuple(p.shape):
            raise ValueError(f"{what}: parameter {name!r} has shape {tuple(base[name].shape)}, the aligned "
                             f"model's {tuple(p.shape)}")


def encoded_stream(rows: Sequence[dict], tokenizer, *, max_length: int, micro_batch_size: int, seed: int,
                   device, what: str) -> BatchStream:
    """A batch stream over ``rows`` encoded for training (rows beyond ``max_length`` left out)."""
    examples, _ = encode_rows(rows, tokenizer, max_length, what)
    return BatchStream(examples, pad_id=pad_id_of(tokenizer), micro_batch_size=micro_batch_size,
                       seed=seed, device=device, what=what)


__all__ = ["DATA_KINDS", "STAGES", "Defense", "DefenseData", "LossTerm", "MicroBatch", "TrainContext",
           "base_weights_of", "check_base_weights", "encoded_stream", "flat_dot", "flat_norm", "gather_per_sample",
           "grads_of", "has_post_training", "mean_token_loss",
           "per_micro_batch", "sample_losses", "token_losses", "token_mean_terms"]
