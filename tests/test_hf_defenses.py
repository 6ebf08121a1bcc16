"""Every defense inside a Hugging Face Trainer: DefenseCallback (step hooks) and
DefenseTrainer (the defense's loss), logs reaching the Trainer's log history, resume."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.defenses import DefenseData, make_defense
from spard.hf import STATE_FILE, DefenseCallback, DefenseCollator, DefenseTrainer, defense_dataset
from test_one_trainer import DEFENSES, pool_rows, user_rows
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import tiny_lora_model, tiny_tokenizer


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def hf_run(tmp_path, name, *, steps=4, save_steps=None, resume=None, subclass=True):
    from transformers import Trainer, TrainingArguments

    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    rows = user_rows()
    data = DefenseData(user=rows, safety_pool=pool_rows(), seed=3, max_length=64)
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


@pytest.mark.parametrize("name", ["sft", "lisa", "safegrad", "bds", "bds-neural", "antibody", "spard"])
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


@pytest.mark.parametrize("name", ["bds", "lisa", "spard"])
def test_defense_state_is_saved_in_trainer_checkpoints_and_resumed(tmp_path, name):
    full, _ = hf_run(tmp_path / "full", name)
    hf_run(tmp_path / "part", name, save_steps=2)
    assert (tmp_path / "part" / "checkpoint-2" / STATE_FILE).is_file()
    resumed, _ = hf_run(tmp_path / "part", name, resume=str(tmp_path / "part" / "checkpoint-2"))
    for k, v in trainable(full).items():
        torch.testing.assert_close(trainable(resumed)[k], v, rtol=0, atol=0)
