"""Config validation: every number finite and in range, named by its key."""

import math

import pytest

from spard.config import (ConfigError, LoraConfig, OptimConfig, TrainConfig, build_section, load_config,
                          validate_optim)

BASE = ["model.name_or_path=m", "data.task=t", "safety.pool=p", "run.output_dir=o"]


@pytest.mark.parametrize("override, key", [
    ("optim.lr=inf", "optim.lr"), ("optim.lr='inf'", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=nan", "optim.lr"), ("optim.lr=1e999", "optim.lr"), ("optim.lr=-1e-4", "optim.lr"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"), ("optim.max_grad_norm=.inf", "optim.max_grad_norm"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("optim.epochs=inf", "optim.epochs"), ("attack.ratio=.nan", "attack.ratio"),
    ("spag.max_step=inf", "spag.max_step"), ("spag.tau=.inf", "spag.tau"), ("spag.delta=-1", "spag.delta"),
    ("spag.alpha_max=0", "spag.alpha_max"), ("selection.beta=nan", "selection.beta"),
    ("lora.alpha=inf", "lora.alpha"), ("lora.dropout=1.0", "lora.dropout"),
    ("data.max_dropped_share=1.5", "data.max_dropped_share"), ("run.on_nonfinite_loss=ignore", "run.on_nonfinite_loss"),
    ("attack.on_overlap=ignore", "attack.on_overlap"), ("run.keep_checkpoints=-1", "run.keep_checkpoints"),
])
def test_bad_numbers_are_refused_by_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        load_config(None, BASE + [override])


def test_valid_edge_values_pass():
    cfg = load_config(None, BASE + ["optim.max_grad_norm=0", "optim.max_grad_norm=null", "attack.on_overlap=drop",
                                    "run.on_nonfinite_loss=skip", "data.max_dropped_share=0"])
    assert cfg.optim.max_grad_norm is None and cfg.attack.on_overlap == "drop"


def test_python_api_objects_are_checked_too():
    cfg = TrainConfig()
    cfg.model.name_or_path, cfg.data.task, cfg.safety.pool, cfg.run.output_dir = "m", "t", "p", "o"
    cfg.optim = OptimConfig(lr=math.inf)
    with pytest.raises(ConfigError, match="optim.lr: expected a finite number > 0"):
        cfg.validate()
    cfg.optim = OptimConfig(max_grad_norm=-1.0)
    with pytest.raises(ConfigError, match="optim.max_grad_norm"):
        cfg.validate()
    cfg.optim, cfg.lora = OptimConfig(), LoraConfig(alpha=float("nan"))
    with pytest.raises(ConfigError, match="lora.alpha"):
        cfg.validate()


def test_sections_built_from_dicts_for_the_bench():
    optim = build_section(OptimConfig, {"lr": "5e-3", "epochs": 2}, "optim")
    assert optim.lr == 5e-3 and optim.epochs == 2.0
    with pytest.raises(ConfigError, match="optim.lr: expected a finite number, got 'inf'"):
        build_section(OptimConfig, {"lr": "inf"}, "optim")
    with pytest.raises(ConfigError, match="unknown config key.*optim.lrr"):
        build_section(OptimConfig, {"lrr": 1}, "optim")
    with pytest.raises(ConfigError, match="optim.max_grad_norm"):
        validate_optim(OptimConfig(max_grad_norm=-2.0))
