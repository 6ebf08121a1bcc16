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


SPAG_DEFENSES = ("spard", "spard-official", "spard-random", "spard-relevance", "spard-dpp", "spard-k-center",
                 "spard-behavior-aware", "spard-lr-cap")
"""Defenses that train under SPAG: ``spag.enabled=false`` (``--sft``) makes them plain SFT."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hugging Face model name or local folder of the aligned base model."""
    dtype: str = "float32"
    """float32 | bfloat16 | float16 | auto."""
    max_length: int = 512
    """Tokens per (prompt, response) example; longer ones are cut."""
    trust_remote_code: bool = False
    base_model: Optional[str] = None
    """The model before safety alignment (Hugging Face name or folder; same architecture): the
    alignment direction of AsFT and LoX is the aligned weights minus its weights. Loaded (on
    the host) only for the defenses that need it."""


@dataclass
class DataConfig:
    task: str = ""
    """The user's clean task data (jsonl/json/parquet/datasets folder or hub name)."""
    task_split: Optional[str] = None
    task_limit: Optional[int] = None
    eval_prompts: Optional[str] = None
    """Evaluation harmful prompts (only ``prompt`` is needed; ``unsafe`` / ``safe`` answers, when
    present, are compared too): attack samples overlapping them are refused."""
    max_dropped_share: float = 0.1
    """Rows whose response lies wholly beyond model.max_length carry no loss and are left out;
    the run stops when more than this share of the training rows (or of the safe set) is."""


@dataclass
class AttackConfig:
    kind: str = "harmful-mix"
    """The attack (spard.attack.ATTACKS, docs/attacks.md): harmful-mix | pure-harmful | benign |
    benign-outliers | identity-shift | keyword-evasive."""
    corpus: Optional[str] = None
    """Harmful (prompt, unsafe) corpus mixed into the task data; None for benign fine-tuning."""
    benign: Optional[str] = None
    """Benign (prompt, response) rows, another source than the task: benign-outliers picks the
    least likely of them under the base model, identity-shift recasts them."""
    ratio: float = 0.1
    """p_h: floor(ratio · |task|) harmful samples are added."""
    seed: int = 0
    on_overlap: str = "error"
    """Attack rows overlapping the evaluation items or the safety pool (prompt or answer):
    "error" stops the run, "drop" leaves them out of the candidates."""


@dataclass
class SafetyConfig:
    pool: Optional[str] = None
    """The safety pool D_pool: rows with ``prompt`` and ``safe`` (a refusal); ``unsafe`` is
    optional (SPAG uses the refusals only)."""
    limit: Optional[int] = None


@dataclass
class SelectionConfig:
    method: str = "rd-dpp"
    """rd-dpp | random | relevance | dpp | k-center | behavior-aware (spard.selectors) | all (the
    whole pool)."""
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
    """Any registered defense (spard.defenses.REGISTRY): spard, sft, lisa, bds, antibody, ...; or
    several joined by '+' (antibody+spard, spard.defenses.composed; the top-level ``defenses:``
    list says the same)."""
    settings: dict = field(default_factory=dict)
    """The defense's own settings (``--set defense.rho=0.5`` lands here; a composition's per
    member: ``--set defense.spard.p=0.05``); SPARD also reads the ``spag`` and ``selection``
    sections."""


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
    overwrite: bool = False
    """Replace the outputs of another run (or an earlier session of this one) in output_dir."""
    on_nonfinite_loss: str = "error"
    """A NaN or infinite training loss: "error" stops the run (naming the step), "skip" skips
    that optimizer step and counts it in the run summary."""


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
        need(bool(self.model.name_or_path), "model.name_or_path", "a model name or path", self.model.name_or_path)
        need(self.model.dtype in ("float32", "bfloat16", "float16", "auto"), "model.dtype",
             "float32 | bfloat16 | float16 | auto", self.model.dtype)
        need(_int(self.model.max_length) and self.model.max_length >= 2, "model.max_length", "an int >= 2",
             self.model.max_length)
        need(self.model.base_model is None or bool(str(self.model.base_model).strip()), "model.base_model",
             "None or a model name or path", self.model.base_model)
        need(bool(self.data.task), "data.task", "the task data path or name", self.data.task)
        need(self.data.task_limit is None or (_int(self.data.task_limit) and self.data.task_limit >= 1),
             "data.task_limit", "None or an int >= 1", self.data.task_limit)
        need(_finite(self.data.max_dropped_share) and 0 <= self.data.max_dropped_share <= 1,
             "data.max_dropped_share", "a share in [0, 1]", self.data.max_dropped_share)
        need(_finite(self.attack.ratio) and 0 <= self.attack.ratio, "attack.ratio", "a finite number >= 0",
             self.attack.ratio)
        from .attack import attack_names
        need(self.attack.kind in attack_names(), "attack.kind", " | ".join(attack_names()), self.attack.kind)
        need(self.attack.on_overlap in ("error", "drop"), "attack.on_overlap", "error | drop", self.attack.on_overlap)
        need(self.safety.limit is None or (_int(self.safety.limit) and self.safety.limit >= 1),
             "safety.limit", "None or an int >= 1", self.safety.limit)
        from .defenses.spard import SELECTION_METHODS
        need(self.selection.method in (*SELECTION_METHODS, "all"), "selection.method",
             " | ".join((*SELECTION_METHODS, "all")), self.selection.method)
        need(self.selection.k is None or (_int(self.selection.k) and self.selection.k >= 1), "selection.k",
             "None or an int >= 1", self.selection.k)
        need(_finite(self.selection.p) and 0 < self.selection.p <= 1, "selection.p", "a fraction in (0, 1]",
             self.selection.p)
        need(_finite(self.selection.beta) and self.selection.beta >= 0, "selection.beta", "a finite number >= 0",
             self.selection.beta)
        validate_lora(self.lora)
        validate_optim(self.optim)
        need(self.spag.mode in ("paper", "official"), "spag.mode", "paper | official", self.spag.mode)
        need(self.spag.tau is None or (_finite(self.spag.tau) and self.spag.tau >= 0), "spag.tau",
             "None (calibrate) or a finite number >= 0", self.spag.tau)
        ms = self.spag.max_step
        need(ms is None or ms == "lr" or (_finite(ms) and ms >= 0), "spag.max_step",
             "None, a finite number >= 0 or 'lr'", ms)
        need(_int(self.spag.batch_size) and self.spag.batch_size >= 1, "spag.batch_size", "an int >= 1",
             self.spag.batch_size)
        need(self.spag.micro_batch_size is None or self.spag.micro_batch_size >= 1,
             "spag.micro_batch_size", "None or an int >= 1", self.spag.micro_batch_size)
        need(_finite(self.spag.delta) and self.spag.delta >= 0, "spag.delta", "a finite number >= 0", self.spag.delta)
        need(_finite(self.spag.alpha_max) and self.spag.alpha_max > 0, "spag.alpha_max", "a finite number > 0",
             self.spag.alpha_max)
        self._validate_defense()
        if self.spag.enabled and any(m.startswith("spard") for m in self.defense.name.split("+")):
            need(bool(self.safety.pool), "safety.pool", "the safety pool path (SPAG needs a safe set)",
                 self.safety.pool)
        need(bool(self.run.output_dir), "run.output_dir", "an output folder", self.run.output_dir)
        need(_int(self.run.save_every) and self.run.save_every >= 0, "run.save_every", "an int >= 0",
             self.run.save_every)
        need(_int(self.run.keep_checkpoints) and self.run.keep_checkpoints >= 0, "run.keep_checkpoints",
             "an int >= 0 (0 keeps all)", self.run.keep_checkpoints)
        need(_int(self.run.log_every) and self.run.log_every >= 1, "run.log_every", "an int >= 1", self.run.log_every)
        need(not (self.run.resume and self.run.overwrite), "run.resume / run.overwrite",
             "one of them (--resume continues the run in output_dir, --overwrite replaces it)",
             [self.run.resume, self.run.overwrite])
        need(self.run.on_nonfinite_loss in ("error", "skip"), "run.on_nonfinite_loss", "error | skip",
             self.run.on_nonfinite_loss)
        return self


    def _validate_defense(self) -> None:
        from .defenses import REGISTRY, make_defense
        from .defenses.composed import JOIN, is_composition

        if not is_composition(self.defense.name) and self.defense.name not in REGISTRY:
            raise ConfigError(f"defense.name: expected one of {', '.join(REGISTRY)} or members joined by "
                              f"'{JOIN}', got {self.defense.name!r}")
        if is_composition(self.defense.name) and not self.spag.enabled and \
                set(self.defense.name.split(JOIN)) & set(SPAG_DEFENSES):
            raise ConfigError(f"spag.enabled: false (plain SFT) conflicts with defense.name {self.defense.name!r}, "
                              "a composition with SPARD; leave SPARD out of the composition instead")
        try:
            make_defense(self.defense.name, **self.defense.settings)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"defense: {e}") from None


# ----------------------------------------------------------------------------------------------
# Checks shared with `spard bench` (its optim and lora sections are these dataclasses)
# ----------------------------------------------------------------------------------------------
def need(cond, key: str, expected: str, value) -> None:
    if not cond:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _finite(x) -> bool:
    """A real, finite number (not a bool, not a string such as 'inf')."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_optim(o: "OptimConfig", prefix: str = "optim") -> None:
    """Raises ConfigError naming the key of a bad optimizer setting (every number finite)."""
    need(_finite(o.lr) and o.lr > 0, f"{prefix}.lr", "a finite number > 0", o.lr)
    need(_finite(o.weight_decay) and o.weight_decay >= 0, f"{prefix}.weight_decay", "a finite number >= 0",
         o.weight_decay)
    need(isinstance(o.betas, (list, tuple)) and len(o.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in o.betas),
         f"{prefix}.betas", "two numbers in [0, 1)", o.betas)
    need(_int(o.batch_size) and o.batch_size >= 1, f"{prefix}.batch_size", "an int >= 1", o.batch_size)
    need(_int(o.grad_accum) and o.grad_accum >= 1, f"{prefix}.grad_accum", "an int >= 1", o.grad_accum)
    need(_int(o.warmup_steps) and o.warmup_steps >= 0, f"{prefix}.warmup_steps", "an int >= 0", o.warmup_steps)
    need(o.max_steps is None or (_int(o.max_steps) and o.max_steps >= 1), f"{prefix}.max_steps",
         "None or an int >= 1", o.max_steps)
    need(_finite(o.epochs) and o.epochs > 0, f"{prefix}.epochs", "a finite number > 0", o.epochs)
    # A negative max norm would flip the gradient's sign in clip_grad_norm_; 0 / None: no clipping.
    need(o.max_grad_norm is None or (_finite(o.max_grad_norm) and o.max_grad_norm >= 0), f"{prefix}.max_grad_norm",
         "None (no clipping) or a finite number >= 0", o.max_grad_norm)
    need(isinstance(o.scheduler, str) and bool(o.scheduler), f"{prefix}.scheduler", "a scheduler name", o.scheduler)
    need(_int(o.seed), f"{prefix}.seed", "an int", o.seed)


def validate_lora(l: "LoraConfig", prefix: str = "lora") -> None:
    need(_int(l.r) and l.r >= 1, f"{prefix}.r", "an int >= 1", l.r)
    need(_finite(l.alpha) and l.alpha > 0, f"{prefix}.alpha", "a finite number > 0", l.alpha)
    need(_finite(l.dropout) and 0 <= l.dropout < 1, f"{prefix}.dropout", "a number in [0, 1)", l.dropout)
    need(l.target_modules is None or (isinstance(l.target_modules, list) and l.target_modules
                                      and all(isinstance(m, str) and m for m in l.target_modules)),
         f"{prefix}.target_modules", "None or a non-empty list of module names", l.target_modules)


def build_section(cls, data: Any, prefix: str):
    """A config dataclass (e.g. OptimConfig) from a dict, with the same type checks and error
    messages as the training config."""
    return _build(cls, data, prefix)


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
        raw = value
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # 'inf', .inf, 'nan', 1e999: never a meaningful setting
            raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
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
    if "defenses" in data:  # defenses: [antibody, spard] composes them (spard.defenses.composed)
        members = data.pop("defenses")
        if (not isinstance(members, list) or not members
                or not all(isinstance(m, str) and m and "+" not in m for m in members)):
            raise ConfigError(f"defenses: expected a list of defense names, e.g. [antibody, spard], got {members!r}")
        section = data.get("defense")
        given = section if isinstance(section, str) else (section or {}).get("name") if isinstance(section, dict) else None
        if given is not None and given != "+".join(members):
            raise ConfigError(f"defenses: {members} conflicts with defense.name {given!r}; give one of them")
        data["defense"] = ({**section, "name": "+".join(members)} if isinstance(section, dict)
                           else {"name": "+".join(members)})
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


def parse_override(assignment: str) -> tuple[str, Any]:
    """``section.key=value`` as (the dotted key, the value parsed as YAML: numbers, true/false,
    null, lists)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return ".".join(p for p in key.strip().split(".") if p), value


def apply_override(data: dict, assignment: str) -> None:
    """Applies ``section.key=value`` (value parsed as YAML: numbers, true/false, null, lists)."""
    key, value = parse_override(assignment)
    set_key(data, key or assignment.split("=", 1)[0], value)


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
