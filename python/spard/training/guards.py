"""Training guards: a non-finite loss, and rows that carry no loss.

- ``NonFiniteLossGuard``: a NaN or infinite training loss stops the run with an error naming the
  step (policy "error", the default), or that step's update is skipped and counted (policy
  "skip"). Under "error" the check costs no host synchronisation per step: a flag is kept on the
  device and read where the loop reads values anyway (logging steps, before each checkpoint and
  at the end), so a run never saves a checkpoint or an adapter made from a non-finite loss.
  "skip" must decide before the optimizer step, so it reads the loss on the host every step.
- ``check_finite_parameters``: a finite loss can still give non-finite weights (an overflow in
  the backward pass or the optimizer), and a skipped step cannot undo that. So the trainable
  parameters are checked before every checkpoint and at the end of a run, before any adapter is
  written: one fused reduction on the device and one host read, not one per tensor.
  ``check_all_skipped``: a run whose every step was skipped trained nothing; it fails too.
- ``check_dropped_rows``: rows whose response lies wholly beyond ``max_length`` carry no loss
  and are left out; say so loudly, and stop above a configurable share.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

log = logging.getLogger(__name__)

POLICIES = ("error", "skip")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite."""


class NonFiniteWeightsError(NonFiniteLossError):
    """The trainable parameters became NaN or infinite."""


class NonFiniteLossGuard:
    def __init__(self, policy: str = "error", start_step: int = 0, skipped: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"on_nonfinite_loss: expected one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.start_step, self.skipped = policy, int(start_step), int(skipped)
        self._seen: Optional[torch.Tensor] = None   # steps observed this session (device)
        self._first: Optional[torch.Tensor] = None  # first bad one among them, 0 = none (device)

    def allows_step(self, loss: torch.Tensor) -> bool:
        """Call once per step with the step's loss, before the optimizer step. False: skip the
        update (policy "skip" only)."""
        loss = loss.detach()
        self._bump(loss.device)
        if self.policy == "skip":
            if math.isfinite(float(loss)):  # one host read per step, the price of skipping
                return True
            self.skipped += 1
            log.warning("step %d: non-finite training loss; update skipped (%d so far)",
                        self.start_step + int(self._seen), self.skipped)
            return False
        bad = ~torch.isfinite(loss)
        self._first = torch.where(bad & (self._first == 0), self._seen, self._first)
        return True

    def _bump(self, device) -> None:
        if self._seen is None:
            self._seen = torch.zeros((), dtype=torch.long, device=device)
            self._first = torch.zeros_like(self._seen)
        self._seen += 1

    def check(self) -> None:
        """Raises NonFiniteLossError when a step's loss was not finite (policy "error")."""
        if self._first is None:
            return
        first = int(self._first)
        if first:
            step = self.start_step + first
            raise NonFiniteLossError(
                f"step {step}: the training loss is not finite (NaN or inf); the run is stopped before any "
                "checkpoint or adapter is written from it. Lower optim.lr or check the data; or set "
                "run.on_nonfinite_loss=skip to skip such steps (counted in the run summary)")


def check_finite_parameters(params, *, step: int) -> None:
    """Raises NonFiniteWeightsError when a tensor of ``params`` holds a NaN or an infinity.

    One fused reduction on the device (``torch._foreach_norm``: each tensor's L1 norm, summed in
    float64, so no finite float32 value overflows it while NaN and inf carry through), one host
    read. Sharded parameters (FSDP) are checked by their local shards, the counts summed over
    ranks: call it on every rank."""
    from ..distributed import all_reduce_sum, local_tensor

    tensors = [local_tensor(p.detach()) for p in params]
    if not tensors:
        return
    acc = torch.float32 if any(t.device.type == "mps" for t in tensors) else torch.float64  # mps: no float64
    norms = torch._foreach_norm(tensors, 1, dtype=acc)
    bad = (~torch.isfinite(torch.stack([n.to(tensors[0].device) for n in norms]))).sum().float().reshape(1)
    all_reduce_sum([bad])
    if bad.item():
        raise NonFiniteWeightsError(
            f"step {step}: the trainable parameters are not finite (NaN or inf) after the update, though the loss "
            "was checked; nothing is saved from them (no checkpoint, no adapter). Lower optim.lr, keep "
            "optim.max_grad_norm set, or check the data")


def check_all_skipped(steps: int, skipped: int) -> None:
    """Raises NonFiniteLossError when every one of ``steps`` steps was skipped (nothing trained)."""
    if steps > 0 and skipped >= steps:
        raise NonFiniteLossError(
            f"every one of the {steps} steps had a non-finite training loss and was skipped "
            "(run.on_nonfinite_loss=skip): nothing was trained, so no adapter is written. The base model or the "
            "data gives a NaN or infinite loss: check them")


def check_dropped_rows(n_rows: int, n_kept: int, *, what: str, max_length: int,
                       max_share: Optional[float], key: str = "data.max_dropped_share") -> int:
    """Reports rows left out because their response lies beyond ``max_length`` (a warning), and
    raises ValueError when their share exceeds ``max_share`` (None: never). Returns the count."""
    dropped = n_rows - n_kept
    if dropped <= 0:
        return 0
    share = dropped / n_rows
    msg = (f"{what}: {dropped} of {n_rows} rows ({share:.1%}) left out: their response lies wholly beyond "
           f"max_length={max_length} tokens, so they carry no loss")
    if max_share is not None and share > max_share:
        raise ValueError(f"{msg}; that is more than {key}={max_share:g}: raise model.max_length, shorten the "
                         f"rows, or raise {key}")
    log.warning("%s; raise model.max_length to keep them", msg)
    return dropped
