"""The post-fine-tuning stage (Defense.after_training) in the one trainer and the Hugging Face
path: once after the last step, seeded, in checkpoints (a run killed during it reruns it, one
killed after it does not), its time reported."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.config import LoraConfig, OptimConfig
from spard.defenses import DefenseData
from spard.defenses.sft import SFT
from spard.trainer import run_defense
from test_one_trainer import pool_rows, user_rows
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import tiny_model, tiny_tokenizer


class Nudge(SFT):
    """SFT, then a seeded random nudge of the adapter (a stand-in for a repair)."""

    NAME = "nudge"
    STAGE = "post-fine-tuning"
    calls = 0
    fail = False

    def after_training(self, model, tokenizer, data, ctx):
        type(self).calls += 1
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        if type(self).fail:  # killed during the stage
            raise KeyboardInterrupt
        return model


@pytest.fixture(autouse=True)
def fresh_counts():
    Nudge.calls, Nudge.fail = 0, False
    yield


def train(defense, ckpt=None, resume=False, steps=4):
    data = DefenseData(user=user_rows(), safety_pool=pool_rows(), seed=3, max_length=64)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=2, grad_accum=2, max_steps=steps, seed=3,
                        weight_decay=0.0)
    model, run = run_defense(defense, tiny_model(), tiny_tokenizer(), data, optim=optim,
                             lora=LoraConfig(r=4, alpha=8, dropout=0.0), progress=False, checkpoint_dir=ckpt,
                             save_every=2, keep_checkpoints=10, resume=resume, log_every=1)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, run


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_stage_runs_once_after_the_last_step_and_its_time_is_reported():
    sft, run_sft = train(SFT())
    nudged, run = train(Nudge())
    assert Nudge.calls == 1
    assert all(not torch.equal(sft[k], nudged[k]) for k in sft)  # applied to the fine-tuned adapter
    torch.manual_seed(3)  # data.seed: the stage is seeded
    for k in sft:
        torch.testing.assert_close(nudged[k], sft[k] + 0.1 * torch.randn_like(sft[k]), rtol=0, atol=0)
    assert run["post_training_seconds"] >= 0 and run_sft["post_training_seconds"] is None
    assert run["loss_curve"] == run_sft["loss_curve"]  # the steps themselves are SFT's


def test_a_run_killed_during_the_stage_reruns_it_from_the_last_checkpoint(tmp_path):
    full, _ = train(Nudge(), ckpt=str(tmp_path / "a"))
    Nudge.calls, Nudge.fail = 0, True
    with pytest.raises(KeyboardInterrupt):
        train(Nudge(), ckpt=str(tmp_path / "b"))
    Nudge.calls, Nudge.fail = 0, False
    resumed, run = train(Nudge(), ckpt=str(tmp_path / "b"), resume=True)
    assert run["resumed_from"].endswith("checkpoint-4") and Nudge.calls == 1
    assert_same(resumed, full)


def test_a_run_killed_after_the_stage_does_not_apply_it_twice(tmp_path):
    full, _ = train(Nudge(), ckpt=str(tmp_path))
    Nudge.calls = 0
    resumed, run = train(Nudge(), ckpt=str(tmp_path), resume=True)
    assert run["resumed_from"].endswith("checkpoint-4") and Nudge.calls == 0
    assert run["post_training_seconds"] == 0.0
    assert_same(resumed, full)


def test_a_run_resumed_from_a_middle_checkpoint_runs_it_once(tmp_path):
    full, _ = train(Nudge(), ckpt=str(tmp_path / "a"))
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    Nudge.calls = 0
    resumed, run = train(Nudge(), ckpt=str(tmp_path / "b"), resume=True)
    assert run["resumed_from"].endswith("checkpoint-2") and Nudge.calls == 1
    assert_same(resumed, full)


def test_a_stage_that_returns_another_model_is_refused():
    class Replace(SFT):
        def after_training(self, model, tokenizer, data, ctx):
            return torch.nn.Linear(1, 1)

    with pytest.raises(TypeError, match="in place"):
        train(Replace())


# ---------------------------------------------------------------------------- Hugging Face Trainer
def hf_run(tmp_path, *, save_steps=None, resume=None, subclass=True):
    from transformers import Trainer, TrainingArguments

    from spard.hf import DefenseCallback, DefenseCollator, DefenseTrainer, defense_dataset
    from test_spag import tiny_lora_model

    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    rows = user_rows()
    data = DefenseData(user=rows, safety_pool=pool_rows(), seed=3, max_length=64)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             disable_tqdm=True, seed=0, data_seed=0, remove_unused_columns=False)
    common = dict(model=model, args=args, train_dataset=defense_dataset(rows, tok, 64),
                  data_collator=DefenseCollator(tok), processing_class=tok)
    if subclass:
        trainer = DefenseTrainer(**common, defense=Nudge(), defense_data=data)
    else:
        trainer = Trainer(**common, callbacks=[DefenseCallback(Nudge(), data)])
    trainer.train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer


@pytest.mark.parametrize("subclass", [True, False])
def test_the_hf_trainer_runs_the_stage_at_the_end(tmp_path, subclass):
    nudged, trainer = hf_run(tmp_path, subclass=subclass)
    assert Nudge.calls == 1
    assert trainer.state.log_history[-1]["defense/post_training_seconds"] >= 0


def test_the_hf_trainer_resumed_from_its_last_checkpoint_runs_the_stage_once(tmp_path):
    full, _ = hf_run(tmp_path / "full")
    hf_run(tmp_path / "part", save_steps=4)
    Nudge.calls = 0
    resumed, _ = hf_run(tmp_path / "part", save_steps=4, resume=str(tmp_path / "part" / "checkpoint-4"))
    assert Nudge.calls == 1
    for k, v in full.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0)
