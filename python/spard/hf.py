"""Every defense inside a Hugging Face ``Trainer`` (and trainers built on it, such as TRL's).

Defenses that act around the optimizer step (SPARD's projection, SafeGrad's gradient surgery,
BDS's scheduler step) run through :class:`DefenseCallback`:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DefenseCallback(make_defense("spard"), DefenseData(user=rows, safety_pool=pool))])

Defenses that change the loss (BDS's sample weights, Antibody's weights, Lisa's proximal term
and alignment phases) need the Trainer's loss: use :class:`DefenseTrainer`, a ``Trainer``
subclass that adds the callback itself and computes the loss with the defense's loss terms:

    trainer = DefenseTrainer(model=model, args=args, train_dataset=defense_dataset(rows, tokenizer),
                             data_collator=DefenseCollator(tokenizer), defense=make_defense("bds"),
                             defense_data=DefenseData(user=rows, safety_pool=pool))

The defense's logs (safety loss, alpha, trigger rate, weight entropy, surgery rate, ...) are
averaged over each logging window and added to the Trainer's logs as flat scalars
(``defense/alpha``, ``defense/trigger``, ...); the callback runs ahead of the ``report_to``
integrations, so TensorBoard, W&B and MLflow receive them. Its state is saved in every Trainer
checkpoint and restored on resume. A post-fine-tuning stage (``after_training``) runs in
``on_train_end``: after the last step and its checkpoint, before the caller evaluates or saves.

Differences from ``spard.trainer``: the Trainer clips before ``on_pre_optimizer_step``, so
SafeGrad's surgery follows the clipping (a projection never lengthens the gradient); and the
Trainer accumulates micro-batches itself, so weights that the spard trainer normalises over the
whole effective batch (Antibody's softmax, BDS-neural's) are normalised per micro-batch here.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from .training.batches import MicroBatch
from .callback import log_ahead_of_reporters
from .defenses.base import Defense, DefenseData, TrainContext, has_post_training
from .distributed import get_world_size
from .formatting import collate, encode_row, label_token_count, pad_id_of, prompt_of
from .training.precision import autocast_for
from .spag import logs_to_floats

STATE_FILE = "defense_state.pt"
INDEX_KEY = "sample_index"


def defense_dataset(rows, tokenizer, max_length: int = 512):
    """A ``datasets.Dataset`` of encoded rows (any shape of spard.formatting: prompt/response,
    TRL's messages or prompt/completion, text) with their index (BDS's scalar scheduler keeps
    one weight per training sample)."""
    from datasets import Dataset

    encoded = [encode_row(tokenizer, r, max_length, where=f"rows[{i}]") for i, r in enumerate(rows)]
    return Dataset.from_dict({"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded],
                              INDEX_KEY: list(range(len(encoded)))})


class DefenseCollator:
    """Pads ``input_ids``/``labels`` the way spard.trainer does and keeps ``sample_index``."""

    def __init__(self, tokenizer):
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, features):
        from .formatting import EncodedExample

        examples = [EncodedExample(f["input_ids"], f["labels"], False) for f in features]
        batch = collate(examples, self.pad_id)
        if INDEX_KEY in features[0]:
            batch[INDEX_KEY] = torch.tensor([f[INDEX_KEY] for f in features])
        return batch


class DefenseCallback(TrainerCallback):
    """Runs a defense's hooks in a Trainer: ``setup`` at the start of training,
    ``after_backward`` before the optimizer step, ``after_step`` right after it."""

    def __init__(self, defense: Defense, data: DefenseData, tokenizer=None):
        self.defense, self.data, self.tokenizer = defense, data, tokenizer
        self._window: list[dict] = []
        self.ready = False

    def on_train_begin(self, args, state, control, model=None, processing_class=None, optimizer=None, **kw):
        tokenizer = self.tokenizer or processing_class
        if tokenizer is None:
            raise ValueError("DefenseCallback needs a tokenizer: pass it, or give the Trainer a processing_class")
        log_ahead_of_reporters(self)  # its defense/* scalars must be in the logs before report_to writes them
        d = self.defense
        params = [p for p in model.parameters() if p.requires_grad]
        world = get_world_size()
        saved, streams = self._saved_state(args, state)
        ctx = TrainContext(streams={}, global_batch=args.per_device_train_batch_size * world,
                           micro_batch_size=args.per_device_train_batch_size, pad_id=pad_id_of(tokenizer),
                           device=params[0].device, autocast=autocast_for(model), max_length=self.data.max_length,
                           resume_state=saved)
        d.n_train = len(self.data.user)
        d.train_prompts = [prompt_of(r) for r in self.data.user]
        self._tokenizer = tokenizer
        with ctx.autocast():
            d.setup(model, tokenizer, self.data, getattr(optimizer, "optimizer", optimizer), ctx)
        if saved is not None:
            d.load_state_dict(saved)
            for name, stream_state in streams.items():
                ctx.streams[name].load_state_dict(stream_state)
        self.ready = True

    def on_pre_optimizer_step(self, args, state, control, **kw):
        with self.defense.ctx.autocast():
            self._pending = dict(self.defense.after_backward() or {})

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        with self.defense.ctx.autocast():
            logs = {**getattr(self, "_pending", {}), **(self.defense.after_step(inner) or {})}
        self._pending = {}
        if logs:
            self._window.append(logs)

    def on_log(self, args, state, control, logs=None, **kw):
        if not self._window or logs is None:
            return
        keys = sorted(set.intersection(*(set(w) for w in self._window)))
        n = len(self._window)
        sums = logs_to_floats({k: sum(torch.as_tensor(w[k]).float() for w in self._window) for k in keys})
        self._window = []
        extra = {f"defense/{k}": v / n for k, v in sums.items()}
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kw):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.ready and os.path.isdir(folder) and state.is_world_process_zero:
            from .training.checkpoint import _cpu
            tmp = os.path.join(folder, STATE_FILE + ".tmp")
            streams = {k: st.state_dict() for k, st in self.defense.ctx.streams.items()}
            torch.save(_cpu({"name": self.defense.NAME, "state": self.defense.state_dict(), "streams": streams}), tmp)
            os.replace(tmp, os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, model=None, **kw):
        if not self.ready:
            return
        record = {"step": state.global_step}
        d = self.defense
        if has_post_training(d):
            # After the last step (and its checkpoint, which holds the weights before the stage:
            # a run resumed from it runs the stage once), before the caller evaluates or saves.
            import time
            t = time.perf_counter()
            torch.manual_seed(self.data.seed)
            if d.after_training(model, self._tokenizer, self.data, d.ctx) is not model:
                raise TypeError(f"defense {d.NAME!r}: after_training must change the model in place and return it")
            record["defense/post_training_seconds"] = time.perf_counter() - t
        state.log_history.append({**record, "defense": d.summary()})

    def _saved_state(self, args, state) -> tuple[Optional[dict], dict]:
        """(the defense's state, its batch streams' states) in the checkpoint resumed from."""
        if state.global_step == 0:
            return None, {}
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resuming at step {state.global_step} but {path} is missing "
                                    "(the checkpoint was not made with this defense's callback)")
        saved = torch.load(path, weights_only=True)
        if saved["name"] != self.defense.NAME:
            raise ValueError(f"{path} holds the state of defense {saved['name']!r}, not {self.defense.NAME!r}")
        return saved["state"], saved.get("streams", {})


class DefenseTrainer(Trainer):
    """A ``Trainer`` whose training loss is the defense's (every defense works; the loss-changing
    ones need it). Each micro-batch's loss is its token mean (or the defense's weighted mean);
    the Trainer divides it by the accumulation steps."""

    def __init__(self, *args, defense: Defense, defense_data: DefenseData, **kwargs):
        self.defense = defense
        self.defense_callback = DefenseCallback(defense, defense_data)
        callbacks = list(kwargs.pop("callbacks", None) or []) + [self.defense_callback]
        super().__init__(*args, callbacks=callbacks, **kwargs)
        log_ahead_of_reporters(self.defense_callback, self.callback_handler)
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer scales it

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.model.training or not self.defense_callback.ready:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        d = self.defense
        source = d.source(self.state.global_step)
        if source == "user":
            batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
            indices = inputs[INDEX_KEY].tolist() if INDEX_KEY in inputs else list(range(len(batch["input_ids"])))
            micro = [MicroBatch(batch, indices, label_token_count(batch["labels"]))]
        else:  # Lisa's alignment phase: the defense's own stream replaces the user batch
            micro = d.ctx.streams[source].take(d.ctx.global_batch)
        world = get_world_size()
        # The terms are shares of a mean over every rank; DDP averages over ranks: scale by W.
        loss = sum(term(model, mb) for mb, term in d.loss_terms(model, micro, source)) * world
        return (loss, None) if return_outputs else loss
