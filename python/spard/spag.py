"""SPAG: after each utility step, project the trainable parameters onto the linearised safety
constraint ``L_safe(θ) <= τ`` (docs/algorithms.md, "SPAG").

    projector = SafetyProjector(model, safe_rows, tokenizer)   # τ calibrated on the safe set
    ...
    optimizer.step()
    projector.step()          # θ <- θ - min(max(ℓ - τ, 0) / ||g||², η_safe) · g

The safety gradients are taken with ``torch.autograd.grad`` over the trainable parameters, so
the utility ``.grad`` tensors are never touched (paper form). Nothing in ``step()`` reads a
device value on the host in the paper form: the logs are 0-d tensors.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

import spard_ext

from .training.checkpoint import ResumableOrder
from .formatting import IGNORE_INDEX, EncodedExample, collate, encode_row, label_token_count, pad_id_of

MODES = ("paper", "official")
MaxStep = Union[float, str, None]


# ----------------------------------------------------------------------------------------------
# Loss over response tokens
# ----------------------------------------------------------------------------------------------
def token_loss_sum(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Summed next-token cross-entropy over the labelled tokens (fp32).

    Summing (instead of the model's own mean) lets micro-batches and accumulation steps be
    weighted by tokens, so the result does not depend on how a batch is split.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def encode_rows(rows: Sequence[dict], tokenizer, max_length: int, what: str) -> tuple[list[EncodedExample], list[int]]:
    """Encodes rows of any shape spard.formatting.encode_row takes: {prompt, response} (``safe``
    stands in for ``response``), conversational ``messages``, or ``text``.

    Rows whose response is cut off entirely by ``max_length`` carry no loss and are left out;
    returns (examples, indices of the rows kept). Raises when nothing is left.
    """
    out, kept = [], []
    for i, row in enumerate(rows):
        ex = encode_row(tokenizer, row, max_length, where=f"{what}[{i}]")
        if any(label != IGNORE_INDEX for label in ex.labels[1:]):
            out.append(ex)
            kept.append(i)
    if rows and not out:
        raise ValueError(f"{what}: every row's response lies beyond max_length={max_length} tokens")
    return out, kept


def trainable_parameters(model: torch.nn.Module) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (requires_grad=False everywhere): "
                         "apply LoRA (spard.lora.apply_lora) or unfreeze some parameters first")
    return params


# ----------------------------------------------------------------------------------------------
# The projector
# ----------------------------------------------------------------------------------------------
class SafetyProjector:
    """Projects the trainable parameters onto ``{θ : ℓ + <g, θ - θ+> <= τ}`` after each step.

    Args:
        model: any Hugging Face causal LM (a peft model included); its trainable parameters are
            the ones projected.
        safe_rows: the safe set D_safe, rows with ``prompt`` and ``response`` (or ``safe``).
        tokenizer: the model's tokenizer (prompts are rendered with spard.formatting).
        tau: the safety threshold τ >= 0; None calibrates it (``calibrate_tau``) on first use.
        max_step: the trust-region cap η_safe on α. None (default) is the exact projection
            onto the linearised constraint; a float caps α; "lr" uses the optimizer's current
            learning rate, as in the paper (with Adam that cap is usually far too small to act,
            because it bounds a raw-gradient step while the lr scales a normalised one).
        batch_size: safety samples per step; micro_batch_size splits them for memory.
        mode: "paper" (global half-space projection, applied to the parameters) or "official"
            (per-tensor scaled safety gradient fed to the same optimizer, with tolerance
            ``delta``, cap ``alpha_max`` and clipping at ``max_grad_norm``).
        optimizer: needed for mode="official" and max_step="lr" (or pass it to ``step``).
        measure_after: also evaluate ℓ after the projection (one extra forward pass) for logs;
            otherwise the log holds the linear prediction ``ℓ - α ||g||²``.
        use_eval_mode: compute the safety loss with dropout off (the model's mode is restored).
        process_group: torch.distributed group under data-parallel training: the safety loss
            and gradients are all-reduced so every rank applies the same projection (each rank
            draws its own ``batch_size`` samples). ``spard.spag_distributed.DistributedSafetyProjector``
            takes a global batch split across ranks and handles DDP and FSDP models.
        seed: seeds the order in which safety batches are drawn.
        flat_params: lay the trainable parameters out as views of one flat buffer
            (``spard_ext.FlatLayout``, built at the first step) and keep the safety gradient in a
            buffer of the same layout, so the projection is one call on one tensor instead of
            two lists of hundreds (far less host time per step). None (default): on in the paper
            mode whenever the parameters allow it (not for sharded FSDP / ZeRO-3 parameters);
            True: on, or one line saying why it cannot be; False: off. The parameters stay the
            same objects; one replaced or moved later is laid out again at the next step.
    """

    def __init__(self, model: torch.nn.Module, safe_rows: Sequence[dict], tokenizer, *,
                 tau: Optional[float] = None, max_step: MaxStep = None, batch_size: int = 4,
                 micro_batch_size: Optional[int] = None, mode: str = "paper",
                 delta: float = 0.1, alpha_max: float = 1.0, max_grad_norm: Optional[float] = 1.0,
                 max_length: int = 512, optimizer: Optional[torch.optim.Optimizer] = None,
                 measure_after: bool = False, use_eval_mode: bool = False,
                 process_group=None, seed: int = 0, progress: bool = True,
                 flat_params: Optional[bool] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tau is not None and not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
            raise ValueError(f"tau must be a finite number >= 0 (or None to calibrate), got {tau!r}")
        if not (max_step is None or max_step == "lr"
                or (isinstance(max_step, (int, float)) and math.isfinite(max_step) and max_step >= 0)):
            raise ValueError(f"max_step must be None (no cap), a number >= 0 or 'lr', got {max_step!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        micro_batch_size = batch_size if micro_batch_size is None else micro_batch_size
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be an int >= 1, got {micro_batch_size!r}")
        if not (math.isfinite(delta) and math.isfinite(alpha_max) and delta >= 0 and alpha_max >= 0):
            raise ValueError(f"delta and alpha_max must be finite numbers >= 0, got {delta} and {alpha_max}")
        if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            # a negative norm would flip the safety gradient's sign when clipping
            raise ValueError(f"max_grad_norm must be None or a finite number >= 0, got {max_grad_norm!r}")
        if flat_params not in (None, True, False):
            raise ValueError(f"flat_params must be None (automatic), True or False, got {flat_params!r}")
        if flat_params and mode != "paper":
            raise ValueError("flat_params=True applies to mode='paper' (the official mode feeds per-tensor "
                             "safety gradients to the optimizer)")
        if safe_rows is None or len(safe_rows) == 0:
            raise ValueError("safe_rows is empty: SPAG needs at least one safety sample")

        self.model = model
        self.process_group = process_group
        self.params = trainable_parameters(model)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = names if len(names) == len(self.params) else None  # for messages
        self._flat_asked = flat_params is True
        self.flat_params = self._resolve_flat(flat_params, mode)
        self.layout: Optional[spard_ext.FlatLayout] = None  # built at the first step
        self._grad_buffers: Optional[list[Tensor]] = None  # the safety gradient, laid out flat
        self._grad_views: Optional[list[Tensor]] = None
        self.examples, kept = encode_rows(safe_rows, tokenizer, max_length, "safe_rows")
        self.dropped = len(safe_rows) - len(kept)
        self.pad_id = pad_id_of(tokenizer)
        self.tau = None if tau is None else float(tau)
        self.max_step, self.mode = max_step, mode
        self.batch_size, self.micro_batch_size = batch_size, micro_batch_size
        self.delta, self.alpha_max, self.max_grad_norm = float(delta), float(alpha_max), max_grad_norm
        self.optimizer = optimizer
        self.measure_after, self.use_eval_mode = measure_after, use_eval_mode
        self.progress = progress
        if self._distributed():  # each rank draws its own safety samples
            seed += torch.distributed.get_rank(group=process_group) * 7919
        self.order = ResumableOrder(len(self.examples), seed=seed)
        self.device = self.params[0].device
        self.steps = 0
        self.nonfinite_skipped = 0  # official mode: steps skipped on a non-finite ℓ or gradient
        self._triggers = torch.zeros((), dtype=torch.float32, device=self.device)

    def _resolve_flat(self, flat_params: Optional[bool], mode: str) -> bool:
        if flat_params is False or mode != "paper":
            return False
        problem = spard_ext.flat.layout_problem(self.params, "trainable parameters", self.param_names)
        if problem and flat_params:
            raise ValueError(f"flat_params=True: {problem}")
        return problem is None

    def _refresh_layout(self) -> bool:
        """Builds the flat layout at the first step; lays it out again when a parameter changed.
        Returns whether the step runs on it: parameters that can no longer be laid out (sharded
        or wrapped after the projector was built) turn the automatic mode back to lists."""
        try:
            if self.layout is None:
                self.layout = spard_ext.FlatLayout(self.params, name="trainable parameters", names=self.param_names)
            elif not self.layout.refresh():
                return True
        except ValueError:
            if self._flat_asked:
                raise
            self.flat_params, self.layout = False, None
            self._grad_buffers = self._grad_views = None
            return False
        self._grad_buffers = self.layout.zeros()
        self._grad_views = self.layout.views(self._grad_buffers)
        return True

    def _accumulate(self, grads: list[Optional[Tensor]], g: Sequence[Optional[Tensor]], first: bool,
                    flat: bool) -> list[Optional[Tensor]]:
        """Adds one micro-batch's gradients ``g`` to ``grads`` (None: nothing yet) and returns
        them; ``flat``: into the layout's gradient buffers (zeroed first), returned as views."""
        if not flat:
            return [gi if acc is None else (acc if gi is None else acc.add_(gi)) for acc, gi in zip(grads, g)]
        if first:
            torch._foreach_zero_(self._grad_buffers)
        pairs = [(v, gi) for v, gi in zip(self._grad_views, g) if gi is not None]
        if pairs:
            torch._foreach_add_([v for v, _ in pairs], [gi for _, gi in pairs])
        return self._grad_views

    def _on_layout(self, grads) -> bool:
        """Whether ``grads`` are the layout's gradient views (the step projects the flat buffers)."""
        return self.flat_params and grads is self._grad_views

    # -- safety batches ------------------------------------------------------------------------
    def _micro_batches(self, indices: Sequence[int]) -> list[dict]:
        # Token counts are taken on the host before the copy, so no device value is read back.
        out = []
        for start in range(0, len(indices), self.micro_batch_size):
            chunk = [self.examples[i] for i in indices[start:start + self.micro_batch_size]]
            batch = collate(chunk, self.pad_id)
            n_tokens = label_token_count(batch["labels"])
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            batch["n_tokens"] = n_tokens
            out.append(batch)
        return out

    def next_batch(self) -> list[dict]:
        """The next safety batch, as micro-batches."""
        return self._micro_batches(self.order.take(self.batch_size))

    # -- distributed hooks (identity on one process) --------------------------------------------
    def _distributed(self) -> bool:
        return (self.process_group is not None and torch.distributed.is_available()
                and torch.distributed.is_initialized())

    def reduce_count(self, count: int) -> Tensor:
        """Labelled tokens over all ranks (the safety loss is a mean over every rank's batch)."""
        t = torch.tensor(float(count), device=self.device)
        if self._distributed():
            torch.distributed.all_reduce(t, group=self.process_group)
        return t

    def reduce_sum(self, tensors: list[Tensor]) -> None:
        """Sums tensors over ranks in place (loss sums and gradients of replicated parameters)."""
        if self._distributed():
            for t in tensors:
                torch.distributed.all_reduce(t, group=self.process_group)

    # -- loss and gradient ----------------------------------------------------------------------
    def _loss_sum(self, micro_batch: dict[str, Tensor]) -> Tensor:
        """Summed token loss of one micro-batch (subclasses change the loss: SafeGrad's KL)."""
        return token_loss_sum(self.model, micro_batch)

    def _with_mode(self):
        was_training = self.model.training
        if self.use_eval_mode and was_training:
            self.model.eval()
        return was_training

    def loss_and_grads(self, micro_batches: list[dict[str, Tensor]], *,
                       flat: bool = False) -> tuple[Tensor, list[Optional[Tensor]]]:
        """ℓ (token mean over the whole safety batch, all ranks) and ∇ℓ over the trainable params.

        ``flat`` (the step's own call, with the layout built): the gradients are accumulated in
        the layout's gradient buffers and returned as views of them (zeros for unused
        parameters), which the next call overwrites."""
        total = self.reduce_count(sum(mb["n_tokens"] for mb in micro_batches))
        loss = torch.zeros((), dtype=torch.float32, device=self.device)
        grads: list[Optional[Tensor]] = [None] * len(self.params)
        was_training = self._with_mode()
        try:
            with torch.enable_grad():
                for i, mb in enumerate(micro_batches):
                    part = self._loss_sum(mb) / total.clamp_min(1)
                    g = torch.autograd.grad(part, self.params, allow_unused=True)
                    grads = self._accumulate(grads, g, first=i == 0, flat=flat)
                    loss += part.detach()
        finally:
            self.model.train(was_training)
        if flat:
            self.reduce_sum([loss] + self._grad_buffers)
            return loss, grads
        present = [g for g in grads if g is not None]
        self.reduce_sum([loss] + present)
        return loss, grads

    @torch.no_grad()
    def loss_of(self, micro_batches: list[dict[str, Tensor]]) -> Tensor:
        total = self.reduce_count(sum(mb["n_tokens"] for mb in micro_batches))
        was_training = self._with_mode()
        try:
            loss = sum(self._loss_sum(mb) for mb in micro_batches) / total.clamp_min(1)
        finally:
            self.model.train(was_training)
        self.reduce_sum([loss])
        return loss

    # -- τ ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_tau(self, max_batches: Optional[int] = None) -> float:
        """τ = the current model's mean safety loss over the safe set (eval mode, no dropout).

        Call it on the aligned model before fine-tuning (the paper's choice: τ ≈ that loss).
        """
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        batches = range(0, len(self.examples), self.micro_batch_size)
        if max_batches is not None:
            batches = batches[:max_batches]
        try:
            for start in tqdm(batches, desc="calibrating tau", disable=not self.progress, leave=False):
                mb = self._micro_batches(range(start, min(start + self.micro_batch_size, len(self.examples))))[0]
                loss_sum += token_loss_sum(self.model, mb).double()
                count += mb["n_tokens"]
        finally:
            self.model.train(was_training)
        self.tau = float(loss_sum / max(count, 1))
        return self.tau

    # -- the step --------------------------------------------------------------------------------
    def _cap(self, optimizer) -> Optional[float]:
        if self.max_step == "lr":
            if optimizer is None:
                raise ValueError("max_step='lr' needs the optimizer (SafetyProjector(optimizer=...) "
                                 "or step(optimizer=...))")
            return float(optimizer.param_groups[0]["lr"])
        return None if self.max_step is None else float(self.max_step)

    def step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Tensor]:
        """One safety step; call it right after ``optimizer.step()``. Returns 0-d tensor logs:
        safety_loss (ℓ before), safety_loss_after, alpha, trigger (0/1), grad_sqnorm."""
        optimizer = optimizer or self.optimizer
        if self.tau is None:
            self.calibrate_tau()
        batch = self.next_batch()
        if self.flat_params and self._refresh_layout():
            loss, grads = self.loss_and_grads(batch, flat=True)
        else:
            loss, grads = self.loss_and_grads(batch)
        if self.mode == "paper":
            logs = self._paper_step(loss, grads, optimizer)
        else:
            logs = self._official_step(loss, grads, optimizer)
        if self.measure_after:
            logs["safety_loss_after"] = self.loss_of(batch)
        self.steps += 1
        self._triggers += logs["trigger"]
        return logs

    def _paper_step(self, loss: Tensor, grads, optimizer) -> dict[str, Tensor]:
        # θ+ is the origin of the linearisation: x = θ, a = g, b = τ - ℓ, no <a, x> term.
        b = (self.tau - loss).to(torch.float32)
        if self._on_layout(grads):  # one tensor per group, not two lists
            res = spard_ext.project_(self.layout, self._grad_buffers, b, max_step=self._cap(optimizer), use_dot=False)
        else:
            res = spard_ext.project_(self.params, grads, b, max_step=self._cap(optimizer), use_dot=False)
        return {"safety_loss": loss, "alpha": res.coef, "trigger": (res.coef > 0).float(),
                "grad_sqnorm": res.sqnorm,
                "safety_loss_after": loss - res.coef * res.sqnorm}  # linear prediction

    def _official_step(self, loss: Tensor, grads, optimizer) -> dict[str, Tensor]:
        """The released code's step, in its order: the raw safety gradient is clipped to
        ``max_grad_norm`` (global norm) first, then each tensor is scaled by
        ``α_p = min((ℓ - τ) / (||g_p|| + 1e-8), α_max)`` (norms of the clipped gradient) and fed to
        the optimizer. A non-finite ℓ or gradient skips the step (counted in ``summary()``)."""
        if optimizer is None:
            raise ValueError("mode='official' steps the optimizer with the safety gradient: pass "
                             "SafetyProjector(optimizer=...) or step(optimizer=...)")
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        sqnorm = sum((g.float().pow(2).sum() for g in grads if g is not None), zero)
        # The trigger decides whether the optimizer steps: one host read of ℓ and ||g||².
        loss_host, sqnorm_host = torch.stack([loss.detach().float(), sqnorm]).tolist()
        no_step = {"safety_loss": loss, "alpha": zero, "trigger": zero, "grad_sqnorm": sqnorm,
                   "safety_loss_after": loss}
        if not (math.isfinite(loss_host) and math.isfinite(sqnorm_host)):
            self.nonfinite_skipped += 1  # a NaN step would write NaN into every parameter
            return no_step
        excess = loss_host - self.tau
        if excess <= self.delta:
            return no_step
        clip = 1.0
        if self.max_grad_norm:  # torch's clip_grad_norm_ coefficient, on the raw safety gradient
            clip = min(1.0, float(self.max_grad_norm) / (math.sqrt(sqnorm_host) + 1e-6))
        saved = [p.grad for p in self.params]
        alphas = []
        try:
            for p, g in zip(self.params, grads):
                if g is None:
                    p.grad = None
                    continue
                g = g * clip if clip < 1.0 else g
                alpha = torch.clamp(excess / (g.float().norm() + 1e-8), max=self.alpha_max)
                alphas.append(alpha)
                p.grad = (g * alpha).to(p.dtype)
            optimizer.step()
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
        mean_alpha = torch.stack(alphas).mean() if alphas else zero
        return {"safety_loss": loss, "alpha": mean_alpha, "trigger": zero + 1, "grad_sqnorm": sqnorm,
                "safety_loss_after": loss}

    # -- bookkeeping -------------------------------------------------------------------------------
    def summary(self) -> dict:
        triggers = float(self._triggers)
        return {"tau": self.tau, "mode": self.mode, "max_step": self.max_step, "steps": self.steps,
                "safe_examples": len(self.examples), "safe_rows_beyond_max_length": self.dropped,
                "nonfinite_skipped": self.nonfinite_skipped,
                "triggers": int(round(triggers)),
                "trigger_rate": triggers / self.steps if self.steps else 0.0}

    def state_dict(self) -> dict:
        return {"tau": self.tau, "steps": self.steps, "triggers": float(self._triggers),
                "nonfinite_skipped": self.nonfinite_skipped, "order": self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tau = None if state["tau"] is None else float(state["tau"])
        self.steps = int(state["steps"])
        self._triggers.fill_(float(state["triggers"]))
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self.order.load_state_dict(state["order"])


def logs_to_floats(logs: dict[str, Tensor]) -> dict[str, float]:
    """Host copies of a step's logs (one sync, for printing or JSON)."""
    if not logs:
        return {}
    keys = list(logs)
    values = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32).reshape(()).cpu() for k in keys])
    return dict(zip(keys, values.tolist()))
