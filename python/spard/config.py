"""`spard train` configuration: dataclasses, YAML/JSON loading, ``key.path=value`` overrides.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, named by its dotted key path."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hugging Face model name or local folder of the aligned base model."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 | auto."""
    max_length: int = 512
    """Tokens per (prompt, response) example; longer ones are cut."""
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    task: str = ""
    """The user's clean task data (jsonl/json/parquet/datasets folder or hub name)."""
    task_split: Optional[str] = None
    task_limit: Optional[int] = None
    eval_prompts: Optional[str] = None
    """Evaluation harmful prompts: attack samples overlapping them are refused."""


@dataclass
class AttackConfig:
    corpus: Optional[str] = None
    """Harmful (prompt, unsafe) corpus mixed into the task data; None for benign fine-tuning."""
    ratio: float = 0.1
    """p_h: floor(ratio · |task|) harmful samples are added."""
    seed: int = 0


@dataclass
class SafetyConfig:
    pool: Optional[str] = None
    """The safety pool D_pool (prompt, safe, unsafe rows)."""
    limit: Optional[int] = None


@dataclass
class SelectionConfig:
    method: str = "rd-dpp"
    """rd-dpp | random | relevance | all (the whole pool)."""
    k: Optional[int] = None
    """Safe-set size; None means floor(p · |D_ft|)."""
    p: float = 0.03
    beta: float = 4.0
    embedder: Optional[str] = None
    """Embedding model name/path ("minilm": the bundled MiniLM); None embeds with the base model."""
    seed: int = 0
    cache_dir: Optional[str] = None


@dataclass
class LoraConfig:
    r: int = 32
    alpha: float = 8
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None
    """None: the attention projections (q, k, v, o) under the model's own names."""


@dataclass
class OptimConfig:
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    scheduler: str = "linear"
    """Any transformers.get_scheduler name (linear, cosine, constant_with_warmup, ...)."""
    warmup_steps: int = 100
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size · grad_accum)."""
    epochs: float = 1.0
    max_steps: Optional[int] = None
    """Optimizer steps; None derives them from epochs."""
    max_grad_norm: Optional[float] = 1.0
    seed: int = 0


@dataclass
class SpagConfig:
    enabled: bool = True
    """False trains plain SFT (no projection)."""
    mode: str = "paper"
    """paper | official (see docs/algorithms.md)."""
    tau: Optional[float] = None
    """Safety threshold τ; None calibrates it as the base model's mean loss on the safe set."""
    max_step: Optional[Union[float, str]] = None
    """Cap η_safe on α: None (exact projection), a number, or "lr"."""
    batch_size: int = 4
    micro_batch_size: Optional[int] = None
    delta: float = 0.1
    alpha_max: float = 1.0
    measure_after: bool = False
    seed: int = 0


@dataclass
class DefenseConfig:
    name: str = "spard"
    """Any registered defense (spard.defenses.REGISTRY): spard, sft, lisa, bds, antibody, ..."""
    settings: dict = field(default_factory=dict)
    """The defense's own settings (``--set defense.rho=0.5`` lands here); SPARD also reads the
    ``spag`` and ``selection`` sections."""


@dataclass
class RunConfig:
    output_dir: str = ""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end)."""
    keep_checkpoints: int = 2
    log_every: int = 10
    resume: bool = False
    """Continue from the newest checkpoint in output_dir/checkpoints."""
    device: str = "auto"
    progress: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    spag: SpagConfig = field(default_factory=SpagConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "TrainConfig":
        """Checks values that need no file access; raises ConfigError naming the key."""
        def need(cond, key, expected, value):
            if not cond:
                raise ConfigError(f"{key}: expected {expected}, got {value!r}")

        need(bool(self.model.name_or_path), "model.name_or_path", "a model name or path", self.model.name_or_path)
        need(self.model.dtype in ("float32", "bfloat16", "float16", "auto"), "model.dtype",
             "float32 | bfloat16 | float16 | auto", self.model.dtype)
        need(self.model.max_length >= 2, "model.max_length", "an int >= 2", self.model.max_length)
        need(bool(self.data.task), "data.task", "the task data path or name", self.data.task)
        need(0 <= self.attack.ratio, "attack.ratio", "a number >= 0", self.attack.ratio)
        need(self.selection.method in ("rd-dpp", "random", "relevance", "all"), "selection.method",
             "rd-dpp | random | relevance | all", self.selection.method)
        need(self.selection.k is None or self.selection.k >= 1, "selection.k", "None or an int >= 1", self.selection.k)
        need(0 < self.selection.p <= 1, "selection.p", "a fraction in (0, 1]", self.selection.p)
        need(self.lora.r >= 1, "lora.r", "an int >= 1", self.lora.r)
        need(self.lora.alpha > 0, "lora.alpha", "a number > 0", self.lora.alpha)
        need(0 <= self.lora.dropout < 1, "lora.dropout", "a number in [0, 1)", self.lora.dropout)
        need(self.optim.lr > 0, "optim.lr", "a number > 0", self.optim.lr)
        need(self.optim.batch_size >= 1, "optim.batch_size", "an int >= 1", self.optim.batch_size)
        need(self.optim.grad_accum >= 1, "optim.grad_accum", "an int >= 1", self.optim.grad_accum)
        need(self.optim.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0", self.optim.warmup_steps)
        need(self.optim.max_steps is None or self.optim.max_steps >= 1, "optim.max_steps",
             "None or an int >= 1", self.optim.max_steps)
        need(self.optim.epochs > 0, "optim.epochs", "a number > 0", self.optim.epochs)
        need(len(self.optim.betas) == 2, "optim.betas", "two numbers", self.optim.betas)
        need(self.spag.mode in ("paper", "official"), "spag.mode", "paper | official", self.spag.mode)
        need(self.spag.tau is None or (math.isfinite(self.spag.tau) and self.spag.tau >= 0), "spag.tau",
             "None (calibrate) or a number >= 0", self.spag.tau)
        ms = self.spag.max_step
        need(ms is None or ms == "lr" or (isinstance(ms, (int, float)) and ms >= 0), "spag.max_step",
             "None, a number >= 0 or 'lr'", ms)
        need(self.spag.batch_size >= 1, "spag.batch_size", "an int >= 1", self.spag.batch_size)
        need(self.spag.micro_batch_size is None or self.spag.micro_batch_size >= 1,
             "spag.micro_batch_size", "None or an int >= 1", self.spag.micro_batch_size)
        self._validate_defense()
        if self.spag.enabled and self.defense.name.startswith("spard"):
            need(bool(self.safety.pool), "safety.pool", "the safety pool path (SPAG needs a safe set)",
                 self.safety.pool)
        need(bool(self.run.output_dir), "run.output_dir", "an output folder", self.run.output_dir)
        need(self.run.save_every >= 0, "run.save_every", "an int >= 0", self.run.save_every)
        need(self.run.log_every >= 1, "run.log_every", "an int >= 1", self.run.log_every)
        return self


    def _validate_defense(self) -> None:
        from .defenses import REGISTRY, make_defense

        if self.defense.name not in REGISTRY:
            raise ConfigError(f"defense.name: expected one of {', '.join(REGISTRY)}, got {self.defense.name!r}")
        try:
            make_defense(self.defense.name, **self.defense.settings)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"defense: {e}") from None


# ----------------------------------------------------------------------------------------------
# Building from dicts, files and overrides
# ----------------------------------------------------------------------------------------------
def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Light type check / coercion for the field types used above."""
    origin = typing.get_origin(tp)
    if origin is Union:
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _check_type(value, opt, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of the allowed types")
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {', '.join(where + k for k in unknown)} "
                          f"(known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    data = dict(data or {})
    if isinstance(data.get("defense"), dict):
        # defense.KEY=VALUE: every key but the name is one of the defense's own settings
        section = dict(data["defense"])
        settings = section.pop("settings", None) or {}
        if not isinstance(settings, dict):
            raise ConfigError(f"defense.settings: expected a mapping, got {settings!r}")
        name = section.pop("name", DefenseConfig.name)
        data["defense"] = {"name": name, "settings": {**settings, **section}}
    elif isinstance(data.get("defense"), str):
        data["defense"] = {"name": data["defense"]}
    return _build(TrainConfig, data, "")


def load_config_file(path: str | os.PathLike) -> dict:
    """Reads a YAML or JSON config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def set_key(data: dict, key: str, value: Any) -> None:
    """Sets a dotted key (``section.key``) in a nested config dict."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {key!r}: empty key")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part} is not a section")
    node[parts[-1]] = value


def apply_override(data: dict, assignment: str) -> None:
    """Applies ``section.key=value`` (value parsed as YAML: numbers, true/false, null, lists)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    set_key(data, key, value)


def load_config(path: Optional[str | os.PathLike] = None, overrides: typing.Sequence[str] = (),
                values: Optional[dict[str, Any]] = None) -> TrainConfig:
    """Config file (optional) + ``key=value`` overrides + typed ``{dotted key: value}``
    -> a validated TrainConfig."""
    data = load_config_file(path) if path else {}
    for assignment in overrides:
        apply_override(data, assignment)
    for key, value in (values or {}).items():
        set_key(data, key, value)
    return config_from_dict(data).validate()


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Writes the resolved config (YAML for .yaml/.yml, else JSON), atomically."""
    from .io import write_json_atomic, write_text_atomic

    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    else:
        write_json_atomic(path, config.to_dict())
