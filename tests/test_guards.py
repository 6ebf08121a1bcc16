"""Training guards: a non-finite loss stops the run (or skips the update under an explicit
option); rows that carry no loss are reported, and stop the run above a set share."""

import logging
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard import trainer
from spard.training.checkpoint import list_checkpoints
from spard.config import OptimConfig
from spard.training.guards import NonFiniteLossError, check_dropped_rows
from spard.trainer import fit
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import task_rows, tiny_lora_model, tiny_tokenizer


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_exploding_run_stops_with_the_step_and_saves_nothing_after_it(tmp_path):
    import re

    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    optim = OptimConfig(lr=1e30, warmup_steps=0, batch_size=4, max_steps=6, max_grad_norm=None)
    with pytest.raises(NonFiniteLossError, match=r"^step \d: the training loss is not finite") as info:
        fit(model, tok, task_rows(12), optim=optim, max_length=64, checkpoint_dir=str(tmp_path), save_every=1,
            log_every=10, progress=False)
    bad = int(re.match(r"step (\d)", str(info.value)).group(1))
    assert [c.name for c in list_checkpoints(tmp_path)] == [f"checkpoint-{s}" for s in range(max(1, bad - 2), bad)]


def _poison(monkeypatch, bad_steps):
    """Makes the utility loss (and gradients) NaN on the given steps (1-based)."""
    real = trainer._loss_and_backward
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):
        logs = real(model, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad_steps:
            logs["loss"] = logs["loss"] * float("nan")
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        return logs

    monkeypatch.setattr(trainer, "_loss_and_backward", poisoned)


def test_nan_loss_is_an_error_by_default(monkeypatch):
    _poison(monkeypatch, {3})
    model = tiny_lora_model("llama")
    optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=4, max_steps=5)
    with pytest.raises(NonFiniteLossError, match="^step 3:.*run.on_nonfinite_loss=skip"):
        fit(model, tiny_tokenizer(), task_rows(12), optim=optim, max_length=64, log_every=100, progress=False)


def test_nan_loss_steps_are_skipped_and_counted_when_asked(monkeypatch, caplog):
    _poison(monkeypatch, {2, 4})
    model = tiny_lora_model("llama")
    optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=4, max_steps=5)
    with caplog.at_level(logging.WARNING):
        run = fit(model, tiny_tokenizer(), task_rows(12), optim=optim, max_length=64, log_every=1,
                  progress=False, on_nonfinite_loss="skip")
    assert run["summary"]["nonfinite_steps_skipped"] == 2 and run["summary"]["steps"] == 5
    assert _finite(model)
    assert all(math.isfinite(h["loss"]) for h in run["history"] if "loss" in h)
    assert "step 2: non-finite training loss; update skipped" in caplog.text


def test_rows_beyond_max_length_are_reported_and_capped(caplog):
    tok = tiny_tokenizer()
    long_prompt = " ".join(["w1"] * 80)
    rows = task_rows(8) + [{"prompt": long_prompt, "response": "w2 w3"} for _ in range(2)]
    optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=4, max_steps=1)
    with caplog.at_level(logging.WARNING):
        run = fit(tiny_lora_model("llama"), tok, rows, optim=optim, max_length=32, progress=False,
                  max_dropped_share=0.25)
    assert run["summary"]["rows_beyond_max_length"] == 2 and run["summary"]["examples"] == 8
    assert "training rows: 2 of 10 rows (20.0%) left out" in caplog.text
    with pytest.raises(ValueError, match=r"2 of 10 rows \(20.0%\) left out.*data.max_dropped_share=0.1"):
        fit(tiny_lora_model("llama"), tok, rows, optim=optim, max_length=32, progress=False, max_dropped_share=0.1)


def test_check_dropped_rows():
    assert check_dropped_rows(10, 10, what="x", max_length=8, max_share=0.0) == 0
    assert check_dropped_rows(10, 9, what="x", max_length=8, max_share=None) == 1
    with pytest.raises(ValueError, match="safe set: 1 of 2 rows"):
        check_dropped_rows(2, 1, what="safe set", max_length=8, max_share=0.1)
