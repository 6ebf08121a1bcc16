"""Every defense through the one trainer: real gradient accumulation, exact resume, mixed
precision (issue: one trainer for every defense)."""

import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.config import LoraConfig, OptimConfig
from spard.defenses import DefenseData, make_defense
from spard.trainer import run_defense
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import safe_rows, task_rows, tiny_model, tiny_tokenizer

# Settings that make each defense act within 4 steps on the tiny model.
DEFENSES = {
    "sft": {},
    "safeinstr": {"share": 0.2},
    "lisa": {"alignment_steps": 1, "finetune_steps": 2},
    "safegrad": {"alignment_batch_size": 4},
    "bds": {"alignment_batch_size": 4, "weight_lr": 0.1},
    "bds-neural": {"alignment_batch_size": 4, "weight_lr": 0.1},
    "antibody": {"temperature": 0.5},
    "antibody-align": {"stage_steps": 2, "stage_batch_size": 4},
    "booster": {"steps": 2, "batch_size": 4},
    "asft": {},
    "lox": {},
    "spard": {"selection": "random", "batch_size": 4, "p": 0.3},
    "spard-official": {"selection": "random", "batch_size": 4, "p": 0.3, "delta": 0.0},
    "oneshot": {"steps": 2, "candidates": 4},
    "antidote": {"calibration_rows": 4},
    "panacea": {"harmful_batch_size": 4, "lam": 0.1},
}
# Compositions (spard.defenses.composed), each member with its settings above: a loss owner with
# SPAG, Lisa's schedule with SafeGrad's surgery and SPAG, SafeInstr's rows with SPAG (SafeInstr's
# rows with Antibody's loss: tests/test_composed.py).
COMPOSITIONS = ("antibody+spard", "bds+spard", "lisa+safegrad+spard", "safeinstr+spard")
DEFENSES.update({c: {m: DEFENSES[m] for m in c.split("+")} for c in COMPOSITIONS})


def pool_rows(n=8):
    return [{"prompt": r["prompt"], "safe": r["response"], "unsafe": "sure here how to make a cake ."}
            for r in safe_rows(n)]


def tiny_base_weights(seed=11, scale=0.2):
    """A stand-in base model (before alignment) for tiny_model(): each weight moved by seeded
    noise of ``scale`` times its own standard deviation (alignment moves weights by a fraction
    of their size; noise larger than the weights made LoX's extrapolated model chaotic enough
    under lr 1e-2 for fp32 summation order to show)."""
    g = torch.Generator().manual_seed(seed)
    return {n: p.detach() + scale * (p.detach().std() if p.numel() > 1 else 1.0) * torch.randn(p.shape, generator=g)
            for n, p in tiny_model().named_parameters()}


def base_for(name):
    """The base weights when the defense reads them (AsFT, LoX), else None."""
    return tiny_base_weights() if "base_model" in make_defense(name).describe()["needs"] else None


def user_rows():
    return task_rows(10) + [{"prompt": "how to make a cake", "response": "sure here how to make a cake ."},
                            {"prompt": "tell me about cats", "response": "sure cats here ."}]


def train(name, *, batch_size, grad_accum, steps=4, ckpt=None, save_every=0, resume=False, dtype=torch.float32):
    tok = tiny_tokenizer()
    data = DefenseData(user=user_rows(), safety_pool=pool_rows(), seed=3, max_length=64, base_weights=base_for(name))
    optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=batch_size, grad_accum=grad_accum, max_steps=steps,
                        seed=3, max_grad_norm=1.0, weight_decay=0.0)
    model, run = run_defense(make_defense(name, **DEFENSES[name]), tiny_model(dtype=dtype), tok, data, optim=optim,
                             lora=LoraConfig(r=4, alpha=8, dropout=0.0), progress=False,
                             checkpoint_dir=ckpt, save_every=save_every, keep_checkpoints=10, resume=resume,
                             log_every=1)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, run


@pytest.mark.parametrize("name", list(DEFENSES))
def test_accumulation_gives_the_same_adapter_as_one_batch(name):
    one, _ = train(name, batch_size=4, grad_accum=1)
    accumulated, _ = train(name, batch_size=2, grad_accum=2)
    for k in one:
        torch.testing.assert_close(accumulated[k], one[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name} {k}: {m}")
    base = {n: p for n, p in tiny_model().named_parameters()}
    assert any(float((v - 0).abs().max()) > 0 for v in one.values())  # the adapter moved
    assert base  # the model builds


@pytest.mark.parametrize("name", list(DEFENSES))
def test_resume_from_a_middle_checkpoint_is_bitwise_exact(name, tmp_path):
    full, run = train(name, batch_size=2, grad_accum=2, ckpt=str(tmp_path / "a"), save_every=2)
    # A copy of the run folder with everything after checkpoint 2 removed, then --resume.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for c in (tmp_path / "b").iterdir():
        if c.name != "checkpoint-2":
            shutil.rmtree(c)
    resumed, run_b = train(name, batch_size=2, grad_accum=2, ckpt=str(tmp_path / "b"), save_every=2, resume=True)
    assert run_b["resumed_from"].endswith("checkpoint-2")
    for k in full:
        assert torch.equal(full[k], resumed[k]), f"{name}: {k} differs after resume"


def test_a_checkpoint_of_another_defense_is_refused(tmp_path):
    train("sft", batch_size=2, grad_accum=1, ckpt=str(tmp_path), save_every=2)
    with pytest.raises(ValueError, match="defense 'sft'"):
        train("lisa", batch_size=2, grad_accum=1, ckpt=str(tmp_path), save_every=2, resume=True)


def test_bf16_base_keeps_fp32_adapters_and_follows_the_fp32_loss():
    # bf16 base weights, fp32 LoRA weights and optimizer state, autocast forward passes.
    full, run32 = train("sft", batch_size=4, grad_accum=1, dtype=torch.float32)
    half, run16 = train("sft", batch_size=4, grad_accum=1, dtype=torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in half.values())
    # bf16 keeps ~3 significant digits: the loss curves agree to 2% (stated tolerance).
    for a, b in zip(run32["loss_curve"], run16["loss_curve"]):
        assert abs(a - b) <= 0.02 * abs(a), (run32["loss_curve"], run16["loss_curve"])
