"""SPAG for Hugging Face ``Trainer`` (and trainers built on it) through a callback.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[SpagCallback(safe_rows, tokenizer)])

The projection runs in ``on_optimizer_step``, right after ``optimizer.step()`` and before the
scheduler step and ``zero_grad``, exactly where the thin loop (spard.trainer.fit) runs it. That
hook exists since transformers 4.42 (SPARD needs 4.56.2: see docs/install.md);
a Trainer that never calls it (an older transformers, or a custom training loop) would silently
train without any projection, so the callback raises at the end of the first optimizer step when
the hook did not run.
The projector's state (τ, safety-batch order, counters) is saved as ``spag_state.json`` in every
Trainer checkpoint and restored when training resumes from one.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Callable, Optional, Sequence

import transformers
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .distributed import is_distributed
from .spag_distributed import DistributedSafetyProjector
from .formatting import format_rows
from .io import write_json_atomic
from .spag import SafetyProjector, logs_to_floats

STATE_FILE = "spag_state.json"
log = logging.getLogger(__name__)


def log_ahead_of_reporters(callback: TrainerCallback, handler: Optional[CallbackHandler] = None) -> bool:
    """Moves ``callback`` to the front of the Trainer's callbacks, so the scalars its ``on_log``
    adds to the logs are there when the ``report_to`` integrations (TensorBoard, W&B, MLflow, ...)
    read them: the Trainer puts those integrations before the callbacks a user passes, and each
    one writes the logs as it finds them. ``handler``: the Trainer's ``callback_handler``; None
    finds it from inside a callback event (the handler is dispatching that event). Returns False
    when it cannot be found (the callback's scalars then reach only the callbacks after it)."""
    if handler is None:
        frame = inspect.currentframe()
        try:
            f = frame.f_back if frame is not None else None
            while f is not None and handler is None:
                candidate = f.f_locals.get("self")
                if isinstance(candidate, CallbackHandler):
                    handler = candidate
                f = f.f_back
        finally:
            del frame
    if handler is None or callback not in handler.callbacks:
        log.warning("%s could not move ahead of the Trainer's report_to callbacks: its metrics reach only the "
                    "callbacks after it", type(callback).__name__)
        return False
    if handler.callbacks[0] is not callback:
        # A new list: the handler may be iterating over the old one right now (this very event).
        handler.callbacks = [callback] + [c for c in handler.callbacks if c is not callback]
    return True


class SpagCallback(TrainerCallback):
    """Builds a :class:`SafetyProjector` on the Trainer's model at ``on_train_begin``.

    ``safe_rows``: a list of dicts or a ``datasets.Dataset``, in any row shape of
    spard.formatting (prompt/response, conversational ``messages``, ``text``). TRL ``SFTTrainer``
    users who train with a ``formatting_func`` pass the same function here: each safety row is
    laid out by it, and the safety loss covers the row's response inside that text.
    Other keyword arguments are those of SafetyProjector (tau, max_step, batch_size, mode, ...).
    ``calibrate=True`` (the default when tau is None) sets τ from the model at the start of a
    fresh run. Per-step logs are averaged over each logging window and added to the Trainer's
    logs as ``safety_loss``, ``safety_alpha``, ``safety_trigger_rate`` (flat scalars, ahead of the
    ``report_to`` integrations, so TensorBoard, W&B and MLflow record them).
    """

    def __init__(self, safe_rows: Sequence[dict], tokenizer=None, *, resume_from: Optional[str] = None,
                 formatting_func: Optional[Callable[[dict], str]] = None, **projector_kwargs):
        if not hasattr(TrainerCallback, "on_optimizer_step"):
            raise ImportError(f"SpagCallback needs transformers >= 4.56.2 (it projects in TrainerCallback."
                              f"on_optimizer_step, which 4.42 added); installed: {transformers.__version__}. "
                              f"Upgrade: pip install 'transformers>=4.56.2'")
        if not safe_rows:
            raise ValueError("safe_rows is empty: SPAG needs at least one safety sample")
        # With the SFTTrainer's formatting_func the safety batch reads exactly like the training text.
        self.safe_rows = format_rows(safe_rows, formatting_func) if formatting_func else list(safe_rows)
        self.tokenizer = tokenizer
        self.resume_from = resume_from
        self.projector_kwargs = projector_kwargs
        self.projector: Optional[SafetyProjector] = None
        self._window: list[dict] = []
        self._hook_calls = 0  # on_optimizer_step calls in this run
        self._checked = False

    # -- lifecycle -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None, **kw):
        tokenizer = self.tokenizer or processing_class or kw.get("tokenizer")  # "tokenizer" before 4.46
        if tokenizer is None:
            raise ValueError("SpagCallback needs a tokenizer: pass it, or give the Trainer a processing_class")
        log_ahead_of_reporters(self)  # its logs must be in place before report_to writes them
        kwargs = dict(self.projector_kwargs)
        kwargs.setdefault("max_grad_norm", args.max_grad_norm or None)
        kwargs.setdefault("progress", not args.disable_tqdm)
        # Under DDP/FSDP every rank must project with the same global safety batch and α.
        projector_class = DistributedSafetyProjector if is_distributed() else SafetyProjector
        self.projector = projector_class(model, self.safe_rows, tokenizer, **kwargs)
        self._hook_calls, self._checked = 0, False
        saved = self._saved_state(args, state)
        if saved is not None:
            self.projector.load_state_dict(saved)
        elif self.projector.tau is None:
            self.projector.calibrate_tau()

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        # Under accelerate the optimizer is wrapped; the official form steps the inner one.
        inner = getattr(optimizer, "optimizer", optimizer)
        self._hook_calls += 1
        self._window.append(self.projector.step(inner))

    def on_step_end(self, args, state, control, **kw):
        # After the first optimizer step: no projection ran, so none ever will. Stop, don't drift.
        if not self._checked:
            self._checked = True
            if self._hook_calls == 0:
                raise RuntimeError(
                    f"SpagCallback: the Trainer finished optimizer step {state.global_step} without calling "
                    f"on_optimizer_step, so no safety projection ran. That hook exists since transformers 4.42 "
                    f"(installed: {transformers.__version__}); a custom training loop must call "
                    f"callback_handler.on_optimizer_step(...) right after optimizer.step()."
                )

    def on_log(self, args, state, control, logs=None, **kw):
        if not self._window or logs is None or "loss" not in logs:
            return
        n = len(self._window)
        sums = logs_to_floats({k: sum(w[k] for w in self._window) for k in ("safety_loss", "alpha", "trigger")})
        self._window = []
        extra = {"safety_loss": sums["safety_loss"] / n, "safety_alpha": sums["alpha"] / n,
                 "safety_trigger_rate": sums["trigger"] / n}
        logs.update(extra)
        # The Trainer appended its log record before calling on_log: complete that record too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kw):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.projector is not None and os.path.isdir(folder) and state.is_world_process_zero:
            write_json_atomic(os.path.join(folder, STATE_FILE), self.projector.state_dict())

    def on_train_end(self, args, state, control, **kw):
        if self.projector is not None:
            state.log_history.append({"step": state.global_step, "spag": self.projector.summary()})

    # -- resume ------------------------------------------------------------------------------------
    def _saved_state(self, args, state) -> Optional[dict]:
        """The projector state of the checkpoint the Trainer resumed from, if any."""
        if self.resume_from is not None:
            path = os.path.join(self.resume_from, STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resume_from={self.resume_from!r} has no {STATE_FILE}")
        elif state.global_step > 0:  # the Trainer loaded a checkpoint before on_train_begin
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resuming at step {state.global_step} but {path} is missing: "
                                        "pass SpagCallback(resume_from=<checkpoint folder>)")
        else:
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)
