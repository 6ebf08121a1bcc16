"""Builds the whole world: data sets, tokenizer and the aligned tiny model (cached).

    world = build_world(WorldSettings(), data_dir="out/world")
    world.model, world.tokenizer, world.paths["task_train"], ...

The data are written as JSON Lines in the real data sets' formats (task: prompt/answer;
safety: prompt/safe/unsafe), so every ``spard`` command runs on them unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from spard.io import write_json_atomic, write_jsonl_atomic

from . import generators as gen
from . import text
from .cache import cache_dir, load_cached_base, load_cached_model, save_cached_base, save_cached_model
from .model import align, new_model, tiny_llama_config
from .tokenizer import build_tokenizer, vocabulary_hash

WORLD_VERSION = 1


@dataclass(frozen=True)
class WorldSettings:
    """Everything that shapes the world; the model cache is keyed by all of it."""

    seed: int = 0
    # data sizes
    n_task_train: int = 1000     # the user's clean fine-tuning data
    n_task_test: int = 200       # held-out problems for accuracy
    n_align_task: int = 30       # problems the aligned model has seen
    # model
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    # alignment (full-parameter)
    align_steps: int = 600
    align_batch_size: int = 32
    align_lr: float = 3e-3
    align_weights: tuple = (0.1, 0.35, 0.4, 0.15)  # word problems, facts, refusals, benign
    max_length: int = 96
    task: str = "gsm8k"
    """gsm8k (worked answers ending in ``#### n``) or openbookqa (the same problems as four-way
    multiple choice in the OpenBookQA format; its own vocabulary and aligned model)."""

    def __post_init__(self):
        if self.task not in ("gsm8k", "openbookqa"):
            raise ValueError(f"WorldSettings.task must be 'gsm8k' or 'openbookqa', got {self.task!r}")
        for f in ("n_task_train", "n_task_test", "n_align_task", "hidden_size", "num_layers",
                  "num_heads", "intermediate_size", "align_steps", "align_batch_size", "max_length"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"WorldSettings.{f} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"WorldSettings.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if not self.align_lr > 0:
            raise ValueError(f"WorldSettings.align_lr must be > 0, got {self.align_lr!r}")

    def key(self, vocab_hash: str) -> str:
        fields = dataclasses.asdict(self)
        if fields["task"] == "gsm8k":  # the first world's key: its cached models stay valid
            del fields["task"]
        payload = json.dumps({"version": WORLD_VERSION, "vocab": vocab_hash, **fields},
                             sort_keys=True, default=list)
        return f"v{WORLD_VERSION}-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def make_data(settings: WorldSettings) -> dict[str, list[dict]]:
    """All data sets of the world, seeded by ``settings.seed``."""
    rng = random.Random(settings.seed)
    align_task = gen.task_rows(settings.n_align_task, rng)
    task_train = gen.task_rows(settings.n_task_train, rng)
    seen = [r["prompt"] for r in align_task + task_train]
    task_test = gen.task_rows(settings.n_task_test, rng, exclude=seen)
    core = text.CORE_CATEGORIES
    if settings.task == "openbookqa":  # the same problems as multiple choice, choices from their own generator
        mc = random.Random(settings.seed + 2)
        align_task, task_train, task_test = ([gen.multiple_choice(r, mc) for r in rows]
                                             for rows in (align_task, task_train, task_test))
    return {
        "task_train": task_train,
        "task_test": task_test,
        # attack source and evaluation: the same categories, disjoint phrasings
        "harmful_train": gen.harmful_rows(core, text.ATTACK_FRAMES, rng),
        "harmful_test": gen.harmful_rows(core, text.EVAL_FRAMES, rng),
        # the provider's safety pool, also the refusal half of the alignment data: every
        # category, many phrasings, none of them used by the attack or the evaluation
        "safety_pool": gen.harmful_rows(text.CATEGORIES, text.ALIGN_FRAMES + text.POOL_FRAMES, rng),
        "benign": gen.benign_rows(rng),
        "align_task": align_task,
        # benign rows for the benign attacks (spard.attack), drawn from their own generator so
        # the sets above, and the aligned model, stay as they were
        "benign_attack": gen.benign_attack_rows(random.Random(settings.seed + 1)),
    }


def write_data(data: dict[str, list[dict]], out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes each data set as ``<name>.jsonl`` under ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    paths = {}
    for name, rows in data.items():
        paths[name] = str(out / f"{name}.jsonl")
        write_jsonl_atomic(paths[name], rows)
    return paths


@dataclass
class World:
    settings: WorldSettings
    tokenizer: object
    model: object
    data: dict[str, list[dict]]
    paths: dict[str, str] = field(default_factory=dict)
    key: str = ""
    cache_file: str | None = None
    from_cache: bool = False
    align_log: dict = field(default_factory=dict)
    base_model: object = None
    """The model before its alignment (the seeded initialisation the alignment trained from):
    the base model of the defenses that read the alignment direction (AsFT, LoX)."""


def align_world_model(settings: WorldSettings, tokenizer, data, *, progress: bool = True):
    config = tiny_llama_config(tokenizer, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                               num_heads=settings.num_heads, intermediate_size=settings.intermediate_size)
    model = new_model(config, settings.seed)  # the base model: base_model_of makes it again
    sources = [
        [{"prompt": r["prompt"], "response": r["answer"]} for r in data["align_task"]],
        gen.fact_rows(),
        [{"prompt": r["prompt"], "response": r["safe"]} for r in data["safety_pool"]],
        data["benign"],
    ]
    log = align(model, tokenizer, sources, settings.align_weights, steps=settings.align_steps,
                batch_size=settings.align_batch_size, lr=settings.align_lr,
                max_length=settings.max_length, seed=settings.seed, progress=progress)
    return model, log


def base_model_of(settings: WorldSettings, config):
    """The world model before its alignment: the seeded initialisation ``align_world_model``
    trains from (the same weights on the same torch and transformers versions)."""
    return new_model(config, settings.seed).eval()


def build_world(settings: WorldSettings | None = None, *, data_dir: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None, use_cache: bool = True, rebuild: bool = False,
                progress: bool = True) -> World:
    """The world for ``settings``: data (written to ``data_dir`` when given), tokenizer and the
    aligned model, loaded from the cache when a valid entry exists, else trained and cached.
    ``rebuild=True`` retrains and replaces the cache entry; ``use_cache=False`` neither reads
    nor writes the cache."""
    settings = settings or WorldSettings()
    tokenizer = build_tokenizer(gen.multiple_choice_texts() if settings.task == "openbookqa" else ())
    data = make_data(settings)
    key = settings.key(vocabulary_hash(tokenizer))
    folder = Path(cache) if cache is not None else cache_dir()
    model = load_cached_model(folder, key) if use_cache and not rebuild else None
    from_cache, log = model is not None, {}
    if model is None:
        t0 = time.perf_counter()
        model, log = align_world_model(settings, tokenizer, data, progress=progress)
        log["total_seconds"] = round(time.perf_counter() - t0, 2)
        if use_cache:
            save_cached_model(folder, key, model, meta={"settings": dataclasses.asdict(settings), "align": log},
                              base=base_model_of(settings, model.config))
    base = load_cached_base(folder, key, model.config) if use_cache else None
    if base is None:  # an entry made before the base was kept: made again (seeded) and added
        base = base_model_of(settings, model.config)
        if use_cache:
            save_cached_base(folder, key, base)
    world = World(settings, tokenizer, model, data, key=key, from_cache=from_cache, align_log=log,
                  cache_file=str(folder / key) if use_cache else None, base_model=base)
    if data_dir is not None:
        world.paths = write_data(data, data_dir)
        tokenizer.save_pretrained(str(Path(data_dir) / "tokenizer"))
        write_json_atomic(Path(data_dir) / "world.json",
                          {"version": WORLD_VERSION, "key": key, "settings": dataclasses.asdict(settings),
                           "files": {k: Path(v).name for k, v in world.paths.items()},
                           "align": log, "from_cache": from_cache})
    return world
