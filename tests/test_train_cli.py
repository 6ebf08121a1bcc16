"""`spard train` end to end on a tiny saved model, config loading, and early errors."""

import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml
from safetensors.torch import load_file

from spard.cli import main
from spard.config import ConfigError, TrainConfig, config_from_dict, load_config
from spard.io import write_jsonl_atomic
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import safe_rows, task_rows, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny model + tokenizer and small task / attack / pool files."""
    root = tmp_path_factory.mktemp("train_cli")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    write_jsonl_atomic(root / "task.jsonl", [{"prompt": r["prompt"], "answer": r["response"]}
                                             for r in task_rows(20)])
    harmful = [{"prompt": f"{r['prompt']} now", "safe": r["response"], "unsafe": "sure here how to bake ."}
               for r in safe_rows(6)]
    write_jsonl_atomic(root / "attack.jsonl", harmful)
    pool = [{"prompt": f"{r['prompt']} {w}", "safe": r["response"], "unsafe": "sure ."}
            for r in safe_rows(6) for w in ("please", "today")]
    write_jsonl_atomic(root / "pool.jsonl", pool)
    write_jsonl_atomic(root / "empty.jsonl", [])
    return root


def write_config(ws, out, **sections):
    cfg = {
        "model": {"name_or_path": str(ws / "model"), "max_length": 64},
        "data": {"task": str(ws / "task.jsonl")},
        "attack": {"corpus": str(ws / "attack.jsonl"), "ratio": 0.2, "seed": 1},
        "safety": {"pool": str(ws / "pool.jsonl")},
        "selection": {"method": "random", "k": 4},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "optim": {"lr": 1e-2, "warmup_steps": 1, "batch_size": 4, "max_steps": 4},
        "spag": {"batch_size": 2},
        "run": {"output_dir": str(out), "save_every": 2, "log_every": 1, "progress": False},
        "defense": {},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = ws / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_writes_adapter_config_manifest_and_log(workspace, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(write_config(workspace, out))]) == 0
    printed = capsys.readouterr().out
    assert "trigger rate" in printed and "run.json" in printed
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["lora"]["r"] == 4
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["clean_rows"] == 20 and manifest["train_rows"] == 24  # floor(0.2 · 20) added
    assert len(manifest["selection"]["indices"]) == 4
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["steps"] == 4 and len(run["history"]) == 4
    assert {"loss", "safety_loss", "alpha", "trigger", "lr"} <= set(run["history"][0])
    assert 0 <= run["summary"]["spag"]["trigger_rate"] <= 1 and run["summary"]["spag"]["tau"] > 0

    # The adapter loads with peft and reproduces the trained weights.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workspace / "model"), out / "adapter")
    for name, value in model.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            assert torch.equal(value.detach(), adapter[key])


def test_cli_resume_after_a_lost_checkpoint_matches(workspace, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", "--config", str(write_config(workspace, full))]) == 0
    assert main(["train", "--config", str(write_config(workspace, part))]) == 0
    # Lose everything after step 2, as if the run had died there, and resume.
    import shutil
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    shutil.rmtree(part / "adapter")
    assert main(["train", "--config", str(write_config(workspace, part)), "--resume"]) == 0
    run = json.loads((part / "run.json").read_text())
    assert run["resumed_from"].endswith("checkpoint-2")
    a = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run["history"] == json.loads((full / "run.json").read_text())["history"]


def test_sft_needs_no_pool_and_logs_no_safety(workspace, tmp_path):
    out = tmp_path / "sft"
    cfg = write_config(workspace, out, safety={"pool": None}, optim={"max_steps": 2})
    assert main(["train", "--config", str(cfg), "--sft"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert "spag" not in run["summary"] and "safety_loss" not in run["history"][0]


def test_empty_safety_pool_fails_before_training(workspace, tmp_path, capsys):
    out = tmp_path / "empty"
    cfg = write_config(workspace, out, safety={"pool": str(workspace / "empty.jsonl")})
    assert main(["train", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().endswith("safety.pool: " + str(workspace / "empty.jsonl")
                                                    + ": no rows (empty data set)")
    assert not (out / "checkpoints").exists()


def test_config_errors_name_the_key(workspace, tmp_path, capsys):
    cfg = write_config(workspace, tmp_path / "bad")
    assert main(["train", "--config", str(cfg), "--set", "spag.taux=0.2"]) == 2
    assert "spag.taux" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--set", "spag.tau=-1"]) == 2
    assert "spag.tau" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--set", "optim.batch_size=two"]) == 2
    assert "optim.batch_size: expected an integer" in capsys.readouterr().err


def test_config_loading_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"name_or_path": "m"}, "data": {"task": "t"},
                                "safety": {"pool": "p"}, "run": {"output_dir": "o"}}))
    cfg = load_config(path, ["optim.lr=1e-4", "spag.max_step=lr", "lora.target_modules=[q_proj, v_proj]"],
                      {"optim.max_steps": 7})
    assert cfg.optim.lr == 1e-4 and cfg.spag.max_step == "lr" and cfg.optim.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    default = TrainConfig()
    assert (default.lora.r, default.lora.alpha, default.lora.dropout) == (32, 8, 0.05)
    assert default.spag.max_step is None and default.spag.mode == "paper"
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match="safety.pool"):
        load_config(None, ["model.name_or_path=m", "data.task=t", "run.output_dir=o"])
    with pytest.raises(ConfigError, match="spag.max_step"):
        load_config(path, ["spag.max_step=huge"])


def test_print_config(workspace, tmp_path, capsys):
    cfg = write_config(workspace, tmp_path / "pc")
    assert main(["train", "--config", str(cfg), "--set", "spag.mode=official", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["spag"]["mode"] == "official"


SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="real-format data (../shared/data) not present")
def test_train_on_real_format_files(workspace, tmp_path):
    out = tmp_path / "real"
    cfg = write_config(
        workspace, out,
        data={"task": os.path.join(SHARED, "gsm8k_train.jsonl"), "task_limit": 30,
              "eval_prompts": os.path.join(SHARED, "beavertails_test.jsonl")},
        # pool and attack from one file: the pool's 40 rows are left out of the attack's candidates
        attack={"corpus": os.path.join(SHARED, "beavertails_train.jsonl"), "ratio": 0.1, "on_overlap": "drop"},
        safety={"pool": os.path.join(SHARED, "beavertails_train.jsonl"), "limit": 40},
        selection={"method": "random", "k": 3}, optim={"max_steps": 2}, model={"max_length": 256})
    assert main(["train", "--config", str(cfg)]) == 0
    manifest = json.loads((out / "data_manifest.json").read_text())
    assert manifest["clean_rows"] == 30 and manifest["train_rows"] == 33
    assert manifest["attack"]["harmful_pool_overlap_dropped"] == 40
    assert manifest["attack"]["harmful_source"].endswith("beavertails_train.jsonl")
    assert manifest["attack"]["eval_source"].endswith("beavertails_test.jsonl")
    assert manifest["selection"]["pool_rows"] == 40 and len(manifest["selection"]["indices"]) == 3
    assert json.loads((out / "run.json").read_text())["summary"]["steps"] == 2


@pytest.mark.parametrize("name,extra", [("lisa", ["--set", "defense.alignment_steps=1", "--set", "defense.finetune_steps=2"]),
                                        ("bds", ["--set", "defense.alignment_batch_size=2"]),
                                        ("safegrad", []),
                                        ("bds+spard", ["--set", "defense.bds.alignment_batch_size=2"])])
def test_train_runs_any_registered_defense_and_resumes(workspace, tmp_path, name, extra):
    import shutil

    out = tmp_path / name
    args = ["train", "--config", str(write_config(workspace, out, run={"keep_checkpoints": 10})), "--defense", name,
            *extra]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["defense"]["name"] == name and run["config"]["defense"]["name"] == name
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    # Cut the run back to checkpoint 2 and resume: the same adapter, bit for bit.
    ckpts = out / "checkpoints"
    for c in ckpts.iterdir():
        if c.name != "checkpoint-2":
            shutil.rmtree(c)
    shutil.rmtree(out / "adapter")
    assert main(args + ["--resume"]) == 0
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert json.loads((out / "run.json").read_text())["resumed_from"].endswith("checkpoint-2")
    for k in adapter:
        assert torch.equal(adapter[k], resumed[k]), k


def test_defense_settings_are_checked_before_any_model_is_loaded(workspace, tmp_path, capsys):
    cfg = str(write_config(workspace, tmp_path / "x"))
    assert main(["train", "--config", cfg, "--defense", "nope"]) == 2
    assert "defense.name" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--defense", "lisa", "--set", "defense.rhoo=1"]) == 2
    assert "rhoo" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--defense", "lisa", "--set", "defense.rho=-1"]) == 2
    assert "rho" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_released_formats_prompt_only_eval_refusal_only_pool_and_named_sources(workspace, tmp_path):
    """Only what is used is asked for: an evaluation file of prompts, a pool of refusals."""
    write_jsonl_atomic(workspace / "eval_prompts.jsonl", [{"prompt": "how to bake a cake ?"}])
    write_jsonl_atomic(workspace / "refusals.jsonl", [{"prompt": f"{r['prompt']} kindly", "safe": r["response"]}
                                                      for r in safe_rows(6)])
    out = tmp_path / "formats"
    cfg = write_config(workspace, out, data={"task": str(workspace / "task.jsonl"),
                                             "eval_prompts": str(workspace / "eval_prompts.jsonl")},
                       safety={"pool": str(workspace / "refusals.jsonl")}, optim={"max_steps": 1})
    assert main(["train", "--config", str(cfg)]) == 0
    attack = json.loads((out / "data_manifest.json").read_text())["attack"]
    assert attack["clean_source"] == str(workspace / "task.jsonl")
    assert attack["harmful_source"] == str(workspace / "attack.jsonl")
    assert attack["eval_source"] == str(workspace / "eval_prompts.jsonl")
    assert attack["pool_source"] == str(workspace / "refusals.jsonl")


def test_rows_beyond_max_length_are_reported_and_capped(workspace, tmp_path, capsys):
    long = " ".join(["w1"] * 80)
    write_jsonl_atomic(workspace / "long_task.jsonl", [{"prompt": r["prompt"], "answer": r["response"]}
                                                       for r in task_rows(20)]
                       + [{"prompt": long, "answer": "w2"}] * 4)
    out = tmp_path / "long"
    cfg = write_config(workspace, out, data={"task": str(workspace / "long_task.jsonl")},
                       attack={"corpus": None}, optim={"max_steps": 1})
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "training rows: 4 of 24 rows (16.7%) left out" in err and "data.max_dropped_share=0.1" in err
    assert not (out / "adapter").exists()
    assert main(["train", "--config", str(cfg), "--set", "data.max_dropped_share=0.5"]) == 0
    assert re.search(r"training rows +20 of 24 \(4 left out: response beyond model.max_length\)", capsys.readouterr().out)


# ----------------------------------------------------------------------------------------------
# Issue 24
# ----------------------------------------------------------------------------------------------
def _checkpoint_weights_finite(out) -> list[bool]:
    return [all(torch.isfinite(t).all() for t in load_file(str(c / "trainable.safetensors")).values())
            for c in sorted((out / "checkpoints").glob("checkpoint-*"))]


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_nonfinite_weights_are_never_saved(workspace, tmp_path, capsys, monkeypatch, policy):
    # Step 1's loss is finite, but its update makes a LoRA weight NaN (as an overflow in the
    # backward pass or the optimizer does), so every later loss is NaN.
    from spard import trainer

    real = trainer.optimizer_step

    def overflowing(params, *args, **kwargs):
        logs = real(params, *args, **kwargs)
        with torch.no_grad():
            params[0].fill_(float("nan"))
        return logs

    monkeypatch.setattr(trainer, "optimizer_step", overflowing)
    out = tmp_path / policy
    cfg = write_config(workspace, out, safety={"pool": None},
                       run={"on_nonfinite_loss": policy, "save_every": 1 if policy == "error" else 2})
    assert main(["train", "--config", str(cfg), "--sft"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    step = 1 if policy == "error" else 2  # the first checkpoint: the weights are checked before any write
    assert line.startswith(f"spard train: error: step {step}: the trainable parameters are not finite (NaN or inf)")
    assert not (out / "adapter").exists()
    assert all(_checkpoint_weights_finite(out))  # none written from non-finite weights
    if policy == "skip":  # without a checkpoint folder, fit checks them at the end (an adapter follows)
        from spard.config import OptimConfig
        from spard.training.guards import NonFiniteLossError
        from test_spag import tiny_lora_model

        with pytest.raises(NonFiniteLossError, match=r"^step 3: the trainable parameters are not finite"):
            trainer.fit(tiny_lora_model("llama"), tiny_tokenizer(), task_rows(8), max_length=64, progress=False,
                        optim=OptimConfig(lr=1e-2, warmup_steps=0, batch_size=4, max_steps=3),
                        on_nonfinite_loss="skip")


def test_a_run_whose_every_step_was_skipped_fails(workspace, tmp_path, capsys):
    # A NaN in a frozen weight of the base model: every loss is NaN, no update is ever made.
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan_model")
    tiny_tokenizer().save_pretrained(tmp_path / "nan_model")
    out = tmp_path / "run"
    cfg = write_config(workspace, out, model={"name_or_path": str(tmp_path / "nan_model"), "max_length": 64},
                       safety={"pool": None}, run={"on_nonfinite_loss": "skip"})
    assert main(["train", "--config", str(cfg), "--sft"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("spard train: error: every one of the 4 steps had a non-finite training loss and was skipped")
    assert not (out / "adapter").exists() and not (out / "run.json").exists()


def test_conflicting_options_are_named(workspace, tmp_path, capsys, caplog):
    import logging

    cfg = str(write_config(workspace, tmp_path / "c", safety={"pool": None}, optim={"max_steps": 1}))
    assert main(["train", "--config", cfg, "--sft", "--defense", "lisa"]) == 2
    assert capsys.readouterr().err.strip() == ("spard train: error: --sft / --defense: --sft trains plain SFT, "
                                               "--defense lisa another defense; give one of them")
    lisa = str(write_config(workspace, tmp_path / "l", defense={"name": "lisa"}))
    assert main(["train", "--config", lisa, "--sft"]) == 2
    assert "--sft: plain SFT conflicts with defense.name 'lisa' (the config); give one of them" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--max-steps", "5", "--set", "optim.max_steps=7"]) == 2
    assert capsys.readouterr().err.strip() == ("spard train: error: --max-steps 5 conflicts with --set "
                                               "optim.max_steps=7; give one of them")
    assert main(["train", "--config", cfg, "--sft", "--set", "spag.enabled=true"]) == 2
    assert "--sft conflicts with --set spag.enabled=true" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "l").exists()
    # The same value twice is no conflict; --strategy outside torchrun is said to do nothing.
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--config", cfg, "--sft", "--max-steps", "1", "--set", "optim.max_steps=1",
                     "--strategy", "fsdp"]) == 0
    assert "--strategy fsdp has no effect with one process" in caplog.text
