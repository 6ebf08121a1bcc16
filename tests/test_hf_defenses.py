"""Every defense inside a Hugging Face Trainer: DefenseCallback (step hooks) and
DefenseTrainer (the defense's loss), logs reaching the Trainer's log history, resume."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import TrainerCallback

from spard.defenses import DefenseData, make_defense
from spard.hf import STATE_FILE, DefenseCallback, DefenseCollator, DefenseTrainer, defense_dataset
from test_one_trainer import DEFENSES, base_for, pool_rows, user_rows
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import tiny_lora_model, tiny_tokenizer


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def hf_run(tmp_path, name, *, steps=4, save_steps=None, resume=None, subclass=True):
    from transformers import Trainer, TrainingArguments

    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    rows = user_rows()
    data = DefenseData(user=rows, safety_pool=pool_rows(), seed=3, max_length=64, base_weights=base_for(name))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             disable_tqdm=True, seed=0, data_seed=0, remove_unused_columns=False)
    defense = make_defense(name, **DEFENSES[name])
    common = dict(model=model, args=args, train_dataset=defense_dataset(rows, tok, 64),
                  data_collator=DefenseCollator(tok), processing_class=tok)
    if subclass:
        trainer = DefenseTrainer(**common, defense=defense, defense_data=data)
    else:
        trainer = Trainer(**common, callbacks=[DefenseCallback(defense, data)])
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("name", ["sft", "lisa", "safegrad", "bds", "bds-neural", "antibody", "spard", "asft",
                                  "antibody+spard", "bds+spard", "lisa+safegrad+spard"])
def test_every_defense_trains_in_the_hf_trainer_and_logs(tmp_path, name):
    base, _ = hf_run(tmp_path / "base", "sft")
    model, trainer = hf_run(tmp_path / "run", name)
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 4
    if name != "sft":
        assert any(not torch.equal(trainable(model)[k], v) for k, v in trainable(base).items())
        assert any(k.startswith("defense/") for k in logged[-1]), logged[-1]
    assert "defense" in trainer.state.log_history[-1]


def test_step_hook_defenses_run_from_the_callback_in_a_plain_trainer(tmp_path):
    _, trainer = hf_run(tmp_path, "spard", subclass=False)
    logged = [r for r in trainer.state.log_history if "defense/safety_loss" in r]
    assert len(logged) == 4 and all(0 <= r["defense/trigger"] <= 1 for r in logged)


@pytest.mark.parametrize("name", ["bds", "lisa", "spard", "asft", "bds+spard", "lisa+safegrad+spard"])
def test_defense_state_is_saved_in_trainer_checkpoints_and_resumed(tmp_path, name):
    full, _ = hf_run(tmp_path / "full", name)
    hf_run(tmp_path / "part", name, save_steps=2)
    assert (tmp_path / "part" / "checkpoint-2" / STATE_FILE).is_file()
    resumed, _ = hf_run(tmp_path / "part", name, resume=str(tmp_path / "part" / "checkpoint-2"))
    for k, v in trainable(full).items():
        torch.testing.assert_close(trainable(resumed)[k], v, rtol=0, atol=0)


# ---------------------------------------------------------------------------- report_to backends
class Reporter(TrainerCallback):
    """Records the logs exactly as a report_to integration receives them: a callback placed before
    the defense's, where the Trainer puts TensorBoard, W&B and MLflow."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.seen.append(dict(logs or {}))


def reported_run(tmp_path, name, *, subclass=True, report_to=()):
    from transformers import Trainer, TrainingArguments

    tok = tiny_tokenizer()
    rows = user_rows()
    data = DefenseData(user=rows, safety_pool=pool_rows(), seed=3, max_length=64)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=list(report_to), use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0, data_seed=0, remove_unused_columns=False)
    reporter = Reporter()
    defense = make_defense(name, **DEFENSES[name])
    common = dict(model=tiny_lora_model("llama"), args=args, train_dataset=defense_dataset(rows, tok, 64),
                  data_collator=DefenseCollator(tok), processing_class=tok)
    if subclass:
        trainer = DefenseTrainer(**common, callbacks=[reporter], defense=defense, defense_data=data)
    else:
        trainer = Trainer(**common, callbacks=[reporter, DefenseCallback(defense, data)])
    trainer.train()
    return reporter.seen


@pytest.mark.parametrize("name,subclass", [("spard", True), ("bds", True), ("antibody", True), ("lisa", True),
                                           ("spard", False)])
def test_defense_scalars_reach_the_report_to_integrations(tmp_path, name, subclass):
    seen = [logs for logs in reported_run(tmp_path, name, subclass=subclass) if "loss" in logs]
    assert len(seen) == 2
    for logs in seen:
        keys = [k for k in logs if k.startswith("defense/")]
        assert keys, logs
        assert all(isinstance(logs[k], float) for k in keys)  # flat scalars, no nested dict
    assert not any(isinstance(v, dict) for logs in seen for v in logs.values())


@pytest.mark.parametrize("name", ["spard", "bds", "antibody", "lisa"])
def test_defense_scalars_reach_a_tensorboard_event_file(tmp_path, name, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    reported_run(tmp_path / "run", name, report_to=["tensorboard"])
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert "train/loss" in tags
    defense_tags = {t for t in tags if t.startswith("train/defense/")}
    assert defense_tags, sorted(tags)
