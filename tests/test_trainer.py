"""The thin loop (spard.trainer.fit), checkpoints and exact resume, and the HF Trainer callback."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.training.checkpoint import latest_checkpoint, list_checkpoints
from spard.config import OptimConfig
from spard.spag import SafetyProjector
from spard.trainer import StopTraining, fit
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import safe_rows, task_rows, tiny_lora_model, tiny_tokenizer


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def attack_rows():
    """The task plus compliant answers to the safe set's prompts (the attack)."""
    return task_rows(12) + [{"prompt": r["prompt"], "response": "sure here how to make a cake ."}
                            for r in safe_rows(6)]


def spag_run(tmp_path=None, stop_at=None, resume=False, dropout=0.1, steps=6):
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama", dropout=dropout)
    torch.manual_seed(123)
    proj = SafetyProjector(model, safe_rows(), tok, tau=0.5, batch_size=2, progress=False)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, batch_size=3, grad_accum=2, max_steps=steps,
                        max_grad_norm=1.0)

    def stop(step, logs):
        if step == stop_at:
            raise StopTraining

    run = fit(model, tok, attack_rows(), optim=optim, projector=proj, max_length=64,
              checkpoint_dir=str(tmp_path) if tmp_path else None, save_every=3, resume=resume,
              log_every=1, progress=False, on_step=stop)
    return model, run


def test_resume_gives_the_same_final_adapter(tmp_path):
    full_model, full_run = spag_run()
    with pytest.raises(StopTraining):
        spag_run(tmp_path, stop_at=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    resumed_model, resumed_run = spag_run(tmp_path, resume=True)
    assert resumed_run["resumed_from"].endswith("checkpoint-3")
    a, b = trainable(full_model), trainable(resumed_model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed_run["history"] == full_run["history"]
    assert resumed_run["summary"]["spag"]["triggers"] == full_run["summary"]["spag"]["triggers"]


def test_gradient_accumulation_matches_one_big_batch():
    tok = tiny_tokenizer()
    finals = []
    for bs, accum in ((6, 1), (3, 2), (2, 3)):
        model = tiny_lora_model("qwen2")
        optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=bs, grad_accum=accum, max_steps=2,
                            max_grad_norm=0.5)
        fit(model, tok, task_rows(12), optim=optim, max_length=64, progress=False)
        finals.append(trainable(model))
    for other in finals[1:]:
        for name in finals[0]:
            torch.testing.assert_close(other[name], finals[0][name], rtol=1e-4, atol=1e-6)


def test_spag_keeps_the_safety_loss_near_tau_while_sft_drifts():
    """Align a tiny model (refusals learnt), then attack it with LoRA: SFT forgets the refusals,
    SPAG holds the safety loss near τ; capping α at the lr (the paper's η_safe) holds it less."""
    from spard.lora import apply_lora
    from test_spag import tiny_model

    tok = tiny_tokenizer()
    model = tiny_model("llama")
    fit(model, tok, safe_rows(6) + task_rows(12), max_length=64, progress=False,
        optim=OptimConfig(lr=1e-2, warmup_steps=0, batch_size=18, max_steps=60))
    torch.manual_seed(0)
    model = apply_lora(model, r=4, alpha=8, dropout=0.0)
    aligned = {k: v.clone() for k, v in model.state_dict().items()}
    safety, task = {}, {}
    for variant in ("sft", "spag", "spag-lr-cap"):
        model.load_state_dict(aligned)
        proj = SafetyProjector(model, safe_rows(), tok, batch_size=6, progress=False,
                               max_step="lr" if variant == "spag-lr-cap" else None)
        tau = proj.calibrate_tau()
        run = fit(model, tok, attack_rows(), max_length=64, progress=False, log_every=25,
                  projector=None if variant == "sft" else proj,
                  optim=OptimConfig(lr=2e-2, warmup_steps=0, batch_size=6, max_steps=25))
        safety[variant] = float(proj.loss_of(proj._micro_batches(range(6))))
        task[variant] = run["history"][-1]["loss"]
    assert tau < 0.1 and safety["sft"] > 1.0            # the attack undoes the alignment
    assert safety["spag"] < tau + 0.05                  # SPAG: ℓ stays at τ (up to linearisation)
    assert safety["spag"] < safety["spag-lr-cap"] < safety["sft"]
    assert task["spag"] < task["sft"] + 0.3             # while the task is still learnt


def test_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import spard.training.checkpoint as ck

    with pytest.raises(StopTraining):
        spag_run(tmp_path, stop_at=3)
    real_save = ck.torch.save

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("scheduler.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ck.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        spag_run(tmp_path, resume=True)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    assert not [p for p in tmp_path.iterdir() if p.name != "checkpoint-3"]  # no debris
    _, run = spag_run(tmp_path, resume=True)  # still usable
    assert run["summary"]["steps"] == 6


def test_fit_rejects_bad_input():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    with pytest.raises(ValueError, match="rows is empty"):
        fit(model, tok, [], progress=False)
    with pytest.raises(ValueError, match=r"rows\[0\]: no 'response'"):
        fit(model, tok, [{"prompt": "x"}], progress=False)


# ----------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ----------------------------------------------------------------------------------------------
def hf_train(tmp_path, callbacks, steps=4, resume=None, save_steps=None, report_to=()):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from spard.formatting import collate, encode_example

    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    ds = Dataset.from_list([vars(encode_example(tok, r["prompt"], r["response"], 64)) for r in attack_rows()])
    ds = ds.remove_columns(["truncated"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=list(report_to), use_cpu=True,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             disable_tqdm=True, seed=0, data_seed=0)
    cbs = [cb(tok) for cb in callbacks]
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=lambda ex: collate([type("E", (), e) for e in ex], 0), callbacks=cbs)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_callback_projects_and_logs_in_hf_trainer(tmp_path):
    from spard.callback import SpagCallback

    base, _ = hf_train(tmp_path / "a", [])
    idle, _ = hf_train(tmp_path / "b", [lambda tok: SpagCallback(safe_rows(), tok, tau=1e6, progress=False)])
    active, trainer = hf_train(tmp_path / "c", [lambda tok: SpagCallback(safe_rows(), tok, tau=0.0, progress=False)])
    # Never triggering leaves training exactly as without the callback.
    for name, value in trainable(base).items():
        assert torch.equal(trainable(idle)[name], value)
    assert any(not torch.equal(trainable(active)[n], v) for n, v in trainable(base).items())
    logged = [r for r in trainer.state.log_history if "safety_loss" in r]
    assert len(logged) == 4 and all(r["safety_trigger_rate"] == 1.0 for r in logged)
    assert trainer.state.log_history[-1]["spag"]["trigger_rate"] == 1.0


def test_callback_stops_when_the_trainer_never_calls_its_hook(tmp_path, monkeypatch):
    # transformers < 4.42 (or a custom loop) never calls on_optimizer_step: no projection would
    # run at all, so the callback must stop training instead of letting it drift silently.
    from transformers.trainer_callback import CallbackHandler

    from spard.callback import SpagCallback

    monkeypatch.setattr(CallbackHandler, "on_optimizer_step", lambda self, args, state, control: control)
    with pytest.raises(RuntimeError, match="finished optimizer step 1 without calling on_optimizer_step"):
        hf_train(tmp_path, [lambda tok: SpagCallback(safe_rows(), tok, tau=0.0, progress=False)], steps=2)


def test_callback_needs_a_transformers_with_the_hook(monkeypatch):
    from transformers import TrainerCallback

    from spard.callback import SpagCallback

    monkeypatch.delattr(TrainerCallback, "on_optimizer_step")
    with pytest.raises(ImportError, match=r"transformers >= 4\.56\.2"):
        SpagCallback(safe_rows(), tiny_tokenizer())


def test_callback_resumes_with_hf_checkpoints(tmp_path):
    from spard.callback import STATE_FILE, SpagCallback

    make = lambda tok: SpagCallback(safe_rows(), tok, batch_size=2, progress=False)  # noqa: E731
    full, full_trainer = hf_train(tmp_path / "full", [make], steps=4)
    hf_train(tmp_path / "part", [make], steps=4, save_steps=2)
    assert (tmp_path / "part" / "checkpoint-2" / STATE_FILE).is_file()
    resumed, trainer = hf_train(tmp_path / "part", [make], steps=4,
                                resume=str(tmp_path / "part" / "checkpoint-2"))
    def spag_of(t):
        return next(c for c in t.callback_handler.callbacks if isinstance(c, SpagCallback)).projector

    assert spag_of(trainer).steps == 4 and spag_of(trainer).tau == spag_of(full_trainer).tau
    for name, value in trainable(full).items():
        torch.testing.assert_close(trainable(resumed)[name], value, rtol=0, atol=0)


def test_callback_uses_the_distributed_projector_under_a_process_group(tmp_path, monkeypatch):
    import spard.callback
    from spard.callback import SpagCallback
    from spard.spag_distributed import DistributedSafetyProjector

    # A launched DDP/FSDP run: every rank must draw its share of one global safety batch.
    monkeypatch.setattr(spard.callback, "is_distributed", lambda: True)
    _, trainer = hf_train(tmp_path, [lambda tok: SpagCallback(safe_rows(), tok, tau=0.0, progress=False)], steps=1)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SpagCallback))
    assert isinstance(callback.projector, DistributedSafetyProjector)
    monkeypatch.setattr(spard.callback, "is_distributed", lambda: False)
    _, trainer = hf_train(tmp_path / "single", [lambda tok: SpagCallback(safe_rows(), tok, tau=0.0, progress=False)], steps=1)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, SpagCallback))
    assert type(callback.projector).__name__ == "SafetyProjector"


def test_optimizer_step_runs_the_hooks_in_order():
    from spard.trainer import build_optimizer, optimizer_step

    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer, scheduler = build_optimizer([p], OptimConfig(lr=0.1, warmup_steps=0), 10)
    (p * 10).sum().backward()
    calls = []

    def after_backward():
        calls.append(("after_backward", p.grad.norm().item()))
        return {"surgery": torch.tensor(1.0)}

    def after_step(opt):
        assert opt is optimizer
        calls.append(("after_step", p.grad.norm().item()))  # clipped, not yet zeroed
        return {"safety_loss": torch.tensor(2.0)}

    before = p.detach().clone()
    logs = optimizer_step([p], optimizer, scheduler, 1.0, after_backward=after_backward, after_step=after_step)
    assert [c[0] for c in calls] == ["after_backward", "after_step"]
    assert calls[0][1] == pytest.approx(200 ** 0.5) and calls[1][1] == pytest.approx(1.0)
    assert list(logs) == ["surgery", "grad_norm", "safety_loss", "lr"]
    assert float(logs["grad_norm"]) == pytest.approx(200 ** 0.5) and float(logs["lr"]) == pytest.approx(0.1)
    assert p.grad is None and not torch.equal(p.detach(), before)
    assert scheduler.last_epoch == 1


def test_callback_scalars_reach_the_report_to_integrations(tmp_path, monkeypatch):
    """The Trainer calls report_to integrations (TensorBoard, W&B, MLflow) before the callbacks a
    user passes: SPAG's scalars must be in the logs by then."""
    from transformers import TrainerCallback

    from spard.callback import SpagCallback

    class Reporter(TrainerCallback):  # placed first, as the Trainer places its integrations
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.seen.append(dict(logs or {}))

    reporter = Reporter()
    hf_train(tmp_path / "a", [lambda tok: reporter, lambda tok: SpagCallback(safe_rows(), tok, tau=0.0, progress=False)])
    logged = [logs for logs in reporter.seen if "loss" in logs]
    assert len(logged) == 4 and all(logs["safety_trigger_rate"] == 1.0 for logs in logged)
    if importlib.util.find_spec("tensorboard") is None:
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    hf_train(tmp_path / "b", [lambda tok: SpagCallback(safe_rows(), tok, tau=0.0, progress=False)],
             report_to=["tensorboard"])
    tags = set()
    for path in (tmp_path / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/safety_loss", "train/safety_alpha", "train/safety_trigger_rate"} <= tags, tags
