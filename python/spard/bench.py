"""`spard bench`: every defense on the same runs. A grid of defenses x attacks x harmful ratios x
seeds on one base model, one task, one safety pool and one evaluation.

Each cell (attack, ratio, seed, defense) writes ``cells/<attack>/ph<ratio>/seed<seed>/<defense>.json``
atomically when it finishes; a rerun skips finished cells and retries failed ones (their error
is kept next to the cell as ``.error.json`` until it succeeds). ``summarize`` then reads every
cell and writes ``summary.json``, ``cells.csv``, ``table.md`` (the paper's layout: ASR, HS and
accuracy per attack and their average) and two plots (ASR against harmful ratio; ASR against
accuracy).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .apikey import redact
from .config import LoraConfig, OptimConfig
from .io import write_json_atomic, write_text_atomic

CELL_VERSION = 2  # 2: empty or degenerate answers are left out of the ASR and counted


@dataclass
class BenchData:
    """What every cell shares: the aligned base model, its tokenizer, the clean task rows, the
    held-out task rows, the evaluation harmful prompts, the safety pool and the attack corpora
    (name -> rows with ``prompt`` and ``unsafe``)."""

    model: torch.nn.Module
    tokenizer: object
    task: list[dict]
    task_test: list[dict]
    eval_prompts: list[str]
    safety_pool: list[dict]
    attacks: dict[str, list[dict]]
    description: dict = field(default_factory=dict)
    device: Optional[str] = None
    """Where cells train (None: where ``model`` is). The base model stays where it was loaded
    (the host, for a GPU run): each cell trains on a fresh copy moved to ``device``."""
    benign: list[dict] = field(default_factory=list)
    """Benign (prompt, response) rows, another source than the task, for the benign attack
    kinds (benign-outliers, identity-shift)."""
    wording: Optional[dict] = None
    """The texts the attacks add (spard.attack.make_attack's ``wording``; None: the papers')."""
    val_prompts: list[str] = field(default_factory=list)
    task_val: list[dict] = field(default_factory=list)
    """The validation split (harmful prompts, task problems) that tuning scores on: disjoint from
    ``eval_prompts`` / ``task_test``, the test split the tables report."""
    eval_items: list = field(default_factory=list)
    """The evaluation items as loaded (rows with ``prompt`` and any harmful answer, or strings):
    what attack rows must not overlap, with ``val_prompts`` and the pool (empty: ``eval_prompts``)."""
    compare_answers: bool = True
    """Whether the overlap check compares harmful answers besides prompts (the world's answers
    are templates its attack and evaluation rows share by design: prompts only there)."""
    sources: dict = field(default_factory=dict)
    """Where each data set came from, for messages and manifests: "clean", "eval", "pool",
    "benign" (a file or hub name) and "attacks" (corpus -> file)."""
    data_checks: dict = field(default_factory=dict)
    """What loading checked (duplicate prompts dropped per set), recorded in bench.json."""
    base_weights: Optional[dict] = None
    """The base model's parameters (before safety alignment; spard.defenses.DefenseData's
    ``base_weights``), given to the defenses that need it (AsFT, LoX). The world's: its model
    before its alignment; files: the bench file's ``base_model``."""
    _losses: dict = field(default_factory=dict, repr=False)

    def validation(self) -> "BenchData":
        """The same bench evaluated on the validation split instead of the test split."""
        if not self.val_prompts or not self.task_val:
            raise ValueError("validation split: the bench has none (bench file: val_prompts and task_val, or "
                             "validation_share; the world keeps the held-out rows beyond n_eval / n_task_test)")
        check_disjoint(self)
        v = copy.copy(self)  # shares the model, the attacks and the loss cache
        v.eval_prompts, v.task_test = list(self.val_prompts), list(self.task_val)
        v.description = {**self.description, "split": "validation"}
        return v

    def benign_losses(self, max_length: int) -> list[float]:
        """The aligned base model's loss on each benign row (computed once per max_length)."""
        from .attack import row_losses
        if max_length not in self._losses:
            self._losses[max_length] = row_losses(self.model, self.tokenizer, self.benign, max_length=max_length)
        return self._losses[max_length]

    def fresh_model(self) -> torch.nn.Module:
        """A copy of the aligned base model on the cell's device (the base itself is never
        touched, so every cell starts from the same weights)."""
        model = copy.deepcopy(self.model)
        return model.to(self.device) if self.device is not None else model


def check_disjoint(data: BenchData) -> None:
    """Tuning must never see the test split: refuses validation rows whose prompt (after
    whitespace and case folding, spard.data.normalise_prompt) is also a test row's."""
    from .data import normalise_prompt as _norm
    test_p = {_norm(p) for p in data.eval_prompts}
    test_t = {_norm(r["prompt"]) for r in data.task_test}
    shared_p = sum(_norm(p) in test_p for p in data.val_prompts)
    shared_t = sum(_norm(r["prompt"]) in test_t for r in data.task_val)
    if shared_p or shared_t:
        raise ValueError(f"validation split: {shared_p} harmful prompt(s) and {shared_t} task problem(s) also lie in "
                         "the test split; give disjoint val_prompts / task_val")


def split_validation(rows: list, share: float, seed: int, what: str) -> tuple[list, list]:
    """(test, validation): a seeded ``share`` of ``rows`` set aside for validation."""
    import random
    if not (isinstance(share, (int, float)) and not isinstance(share, bool) and 0 < share < 1):
        raise ValueError(f"validation_share: expected a share in (0, 1), got {share!r}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = int(len(rows) * share)
    if n_val < 1 or n_val >= len(rows):
        raise ValueError(f"validation_share: {share} of {len(rows)} {what} leaves an empty split")
    val = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


@dataclass
class BenchSettings:
    defenses: list[str] = field(default_factory=lambda: ["sft", "spard"])
    ratios: list[float] = field(default_factory=lambda: [0.1])
    seeds: list[int] = field(default_factory=lambda: [0])
    defense_settings: dict = field(default_factory=dict)
    """defense name -> settings overriding its presets (e.g. {"lisa": {"rho": 1.0}})."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_length: int = 512
    max_new_tokens: int = 512
    task_max_new_tokens: int = 512
    eval_batch_size: int = 32
    attack_kinds: list[str] = field(default_factory=lambda: ["harmful-mix"])
    """spard.attack kinds in the grid (docs/attacks.md); the harmful kinds run once per attack
    corpus."""
    judge: str = "refusal"
    """refusal | moderation | guard | rubric (spard.eval.make_judge)."""
    judge_model: Optional[str] = None
    """The moderation/guard model, or the rubric judge's API model name."""
    extra_judges: list[str] = field(default_factory=list)
    """More judges on the same answers, "name" or "name=model" (the CLI's --judges after the
    first): each one's ASR and their pairwise Cohen's kappa next to ``judge``'s."""
    save_every: int = 50
    """A cell checkpoints every N optimizer steps; a killed cell resumes from its last one."""
    prompt_layout: str = "chat"
    """How the fine-tuning rows are laid out (spard.formatting.LAYOUTS): the attacker varies it."""
    on_overlap: str = "error"
    """Attack rows overlapping the evaluation items or the safety pool (prompt or harmful answer;
    `spard train`'s check and attack.on_overlap): "error" refuses the grid before its first cell,
    "drop" leaves them out of the candidates."""

    def validate(self) -> None:
        from .defenses import REGISTRY, is_known_defense, make_defense
        from .defenses.composed import is_composition
        if not self.defenses:
            raise ValueError("defenses: name at least one defense")
        unknown = [d for d in self.defenses if not is_composition(d) and not is_known_defense(d)]
        if unknown:
            raise ValueError(f"defenses: unknown {unknown}; known: {', '.join(REGISTRY)}, or members joined by '+'")
        for d in self.defenses:  # a composition's unknown member or conflict, before any cell runs
            if is_composition(d) and d not in self.defense_settings:
                try:
                    make_defense(d, **self.settings_of(d))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"defenses: {e}") from None
        if not self.ratios or any(not (isinstance(r, (int, float)) and 0 <= r) for r in self.ratios):
            raise ValueError(f"ratios: expected numbers >= 0, got {self.ratios!r}")
        from .attack import attack_names
        bad = [k for k in self.attack_kinds if k not in attack_names()] if isinstance(self.attack_kinds, list) else None
        if not self.attack_kinds or bad is None or bad:
            raise ValueError(f"attack_kinds: expected a list of {', '.join(attack_names())}, got {self.attack_kinds!r}")
        if not self.seeds or any(not isinstance(s, int) for s in self.seeds):
            raise ValueError(f"seeds: expected ints, got {self.seeds!r}")
        from .eval import JUDGES
        if self.judge not in JUDGES:
            raise ValueError(f"judge: expected one of {', '.join(JUDGES)}, got {self.judge!r}")
        if self.judge != "refusal" and not self.judge_model:
            what = "the API's model name" if self.judge == "rubric" else "a model (a Hugging Face name or path)"
            raise ValueError(f"judge_model: the {self.judge} judge needs {what}; give judge_model")
        if not isinstance(self.extra_judges, list) or any(
                not isinstance(j, str) or j.partition("=")[0] not in JUDGES for j in self.extra_judges):
            raise ValueError(f"extra_judges: expected a list of 'name' or 'name=model' with names in "
                             f"{', '.join(JUDGES)}, got {self.extra_judges!r}")
        bare = [n for n, _, m in (j.partition("=") for j in self.extra_judges) if n != "refusal" and not m.strip()]
        if bare:
            raise ValueError(f"extra_judges: the {bare[0]} judge needs a model ({bare[0]}=MODEL)")
        self._validate_defense_settings()
        if self.on_overlap not in ("error", "drop"):
            raise ValueError(f"on_overlap: expected error | drop, got {self.on_overlap!r}")
        from .formatting import LAYOUTS
        if self.prompt_layout not in LAYOUTS:
            raise ValueError(f"prompt_layout: expected one of {', '.join(LAYOUTS)}, got {self.prompt_layout!r}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every: expected an int >= 0 (0: checkpoint only at the end), got {self.save_every!r}")

    def _validate_defense_settings(self) -> None:
        """Each entry names a defense of the grid (or a member of a composition in it) and
        settings it has (checked by building it)."""
        from .defenses import make_defense
        if not isinstance(self.defense_settings, dict):
            raise ValueError(f"defense_settings: expected a mapping defense -> settings, got {self.defense_settings!r}")
        members = {m for d in self.defenses for m in d.split("+")}
        for name, values in self.defense_settings.items():
            if name not in self.defenses and name not in members:
                raise ValueError(f"defense_settings: {name!r} is not a defense of the grid "
                                 f"({', '.join(self.defenses)})")
            if not isinstance(values, dict):
                raise ValueError(f"defense_settings.{name}: expected a mapping setting -> value, got {values!r}")
            try:
                make_defense(name, **self.settings_of(name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"defense_settings.{name}: {e}") from None

    def settings_of(self, name: str) -> dict:
        """The settings the grid runs defense ``name`` with. A composition's members take the
        grid's settings of the member on its own (the world's Lisa phases, say), then the
        composition's entry: per member (``{"spard": {"p": 0.05}}``) or dotted (``"spard.p"``,
        what tuning writes; spard.defenses.composed)."""
        from .defenses.composed import JOIN, is_composition
        own = dict(self.defense_settings.get(name, {}))
        if not is_composition(name):
            return own
        out = {m: dict(self.defense_settings[m]) for m in name.split(JOIN) if isinstance(self.defense_settings.get(m), dict)}
        for k, v in own.items():
            out[k] = {**out[k], **v} if isinstance(v, dict) and k in out else v
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    attack: str
    ratio: float
    seed: int
    defense: str

    @property
    def key(self) -> str:
        return f"{self.attack}/ph{self.ratio:g}/seed{self.seed}/{self.defense}"

    def path(self, out_dir) -> Path:
        return Path(out_dir) / "cells" / f"{self.key}.json"

    def error_path(self, out_dir) -> Path:
        return Path(out_dir) / "cells" / f"{self.key}.error.json"

    def run_dir(self, out_dir) -> Path:
        """The cell's training checkpoints while it runs (removed once its result is written)."""
        return Path(out_dir) / "runs" / self.key


def shard_of(cells: Sequence[Cell], shard: Optional[tuple[int, int]]) -> list[Cell]:
    """Shard K of N (1-based): every N-th cell from the K-th, a fixed share of the grid."""
    if shard is None:
        return list(cells)
    k, n = shard
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
        raise ValueError(f"shard: expected K/N with 1 <= K <= N, got {k}/{n}")
    return [c for i, c in enumerate(cells) if i % n == k - 1]


def grid(settings: BenchSettings, attacks: Sequence[str]) -> list[Cell]:
    """Seed-major order, so a grid cut short still covers every ratio and defense."""
    return [Cell(a, float(r), s, d) for s in settings.seeds for a in attacks for r in settings.ratios
            for d in settings.defenses]


def cell_fingerprint(cell: Cell, settings: BenchSettings, data_description: dict) -> str:
    """What a cell's result depends on besides its coordinates: training, evaluation and this
    defense's settings, and the data/model description. A finished cell made under another
    fingerprint is stale and runs again (adding seeds or defenses leaves the others valid)."""
    payload = {"optim": asdict(settings.optim), "lora": asdict(settings.lora), "max_length": settings.max_length,
               "max_new_tokens": settings.max_new_tokens, "task_max_new_tokens": settings.task_max_new_tokens,
               "judge": [settings.judge, settings.judge_model], "defense": settings.settings_of(cell.defense),
               "data": data_description, "version": CELL_VERSION}
    if settings.extra_judges:  # only when set, so grids without them keep their fingerprints
        payload["extra_judges"] = list(settings.extra_judges)
    if settings.prompt_layout != "chat":
        payload["prompt_layout"] = settings.prompt_layout
    if settings.on_overlap != "error":  # other attack rows than the default's (which refuses an overlap)
        payload["on_overlap"] = settings.on_overlap
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def answers_fingerprint(cell: Cell, settings: BenchSettings, data_description: dict) -> str:
    """The cell's fingerprint without its judges: what its answers depend on (`--rejudge` judges
    again only answers made under the current settings)."""
    bare = copy.copy(settings)
    bare.judge, bare.judge_model, bare.extra_judges = None, None, []
    return cell_fingerprint(cell, bare, data_description)


def cell_done(cell: Cell, out_dir, fingerprint: Optional[str] = None) -> bool:
    p = cell.path(out_dir)
    if not p.is_file():
        return False
    try:
        result = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # a damaged result is recomputed
    return result.get("version") == CELL_VERSION and (fingerprint is None or result.get("fingerprint") == fingerprint)


# ----------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------
def attack_labels(kinds: Sequence[str], corpora: Sequence[str]) -> dict[str, tuple[str, Optional[str]]]:
    """Grid label -> (attack kind, harmful corpus): the harmful mix keeps the corpus's name (the
    grid's layout before attack kinds), the other harmful kinds are "<corpus>-<kind>", the
    benign ones their kind's name."""
    from .attack import ATTACKS
    clash = sorted(set(corpora) & set(ATTACKS))
    if clash:
        raise ValueError(f"attacks: corpus name(s) {clash} are attack kind names; rename the corpus")
    out: dict = {}
    for kind in kinds:
        if "harmful" in ATTACKS[kind].needs:
            for corpus in sorted(corpora):
                out[corpus if kind == "harmful-mix" else f"{corpus}-{kind}"] = (kind, corpus)
        else:
            out[kind] = (kind, None)
    return out


def resolve_attack(data: BenchData, label: str) -> tuple[str, Optional[str]]:
    """The (kind, corpus) behind a grid label (see ``attack_labels``)."""
    from .attack import attack_names
    labels = attack_labels(attack_names(), list(data.attacks))
    if label not in labels:
        raise ValueError(f"attack: unknown grid label {label!r}")
    return labels[label]


def source_names(data: BenchData, corpus: Optional[str] = None) -> dict:
    """The files (or hub names) behind the bench's data, as spard.attack names sources in its
    messages and manifests (the bench file's key where the data came from memory)."""
    s = data.sources
    names = {"clean": s.get("clean") or "task", "eval": s.get("eval") or "eval_prompts",
             "pool": s.get("pool") or "safety_pool", "benign": s.get("benign") or "benign"}
    if corpus is not None:
        names["harmful"] = (s.get("attacks") or {}).get(corpus) or f"attacks.{corpus}"
    return names


def overlap_references(data: BenchData) -> tuple[list, Optional[list]]:
    """What attack rows must not overlap (`spard train`'s check, spard.attack.build_attack): the
    evaluation items of both splits and the safety pool, by prompt and by harmful answer (by
    prompt only where ``data.compare_answers`` is off)."""
    items = list(data.eval_items or data.eval_prompts) + list(data.val_prompts)
    pool = list(data.safety_pool)
    if not data.compare_answers:
        items = [x if isinstance(x, str) else x["prompt"] for x in items]
        pool = [{"prompt": r["prompt"]} for r in pool]
    return items, pool or None


def attack_rows(data: BenchData, attack: str, ratio: float, seed: int, max_length: int = 512,
                on_overlap: str = "error", losses: Optional[list] = None) -> tuple[list[dict], dict]:
    """A cell's training rows and their manifest. ``losses``: the benign rows' losses to rank by
    (default: the base model's, computed once)."""
    from .attack import ATTACKS, make_attack
    kind, corpus = resolve_attack(data, attack)
    names = source_names(data, corpus)
    if ratio == 0:
        return [{"prompt": r["prompt"], "response": r["response"], "source": "clean"} for r in data.task], \
            {"kind": kind, "n_harmful": 0, "clean_source": names["clean"]}
    needs = ATTACKS[kind].needs
    if "losses" in needs and losses is None:
        losses = data.benign_losses(max_length)
    evaluation, pool = overlap_references(data)
    rows, manifest = make_attack(kind, data.task, harmful=data.attacks[corpus] if corpus else None,
                                 benign=data.benign if "benign" in needs else None,
                                 benign_losses=losses if "losses" in needs else None,
                                 ratio=ratio, seed=seed, eval_prompts=evaluation, safety_pool=pool,
                                 on_overlap=on_overlap, source_names=names, wording=data.wording)
    manifest.pop("order", None)
    manifest.setdefault("clean_source", names["clean"])
    if "benign" in needs:
        manifest.setdefault("benign_source", names["benign"])
    return rows, manifest


def check_attacks(data: BenchData, settings: BenchSettings) -> None:
    """Before the first cell: every attack of the grid builds at every ratio of the grid, its rows
    disjoint from the evaluation items and the pool (``settings.on_overlap``) and enough of them
    for the ratio. One line naming the bench file's key: ``attacks.<name>`` (with the files) or
    ``ratios``."""
    from .attack import ATTACKS
    labels = attack_labels(settings.attack_kinds, list(data.attacks))
    for label, (kind, corpus) in sorted(labels.items()):
        # The benign outliers' ranking does not change how many there are: no model pass here.
        losses = [0.0] * len(data.benign) if "losses" in ATTACKS[kind].needs else None
        for ratio in sorted({float(r) for r in settings.ratios if r > 0}):
            try:
                attack_rows(data, label, ratio, settings.seeds[0], settings.max_length,
                            on_overlap=settings.on_overlap, losses=losses)
            except ValueError as e:
                text = str(e)
                if text.startswith("ratio: "):
                    raise ValueError(f"ratios: {text[len('ratio: '):]} (attack {label!r})") from None
                raise ValueError(f"{f'attacks.{corpus}' if corpus else 'benign'}: {text}") from None


def run_cell(cell: Cell, data: BenchData, settings: BenchSettings, *, progress: bool = False,
             out_dir=None, fingerprint: Optional[str] = None, serving=None) -> dict:
    """Trains and evaluates one cell. With ``out_dir`` the training checkpoints under
    ``runs/<cell>/`` and a rerun after a kill resumes from the last checkpoint, and the answers
    and verdicts are kept under ``generations/<cell>/`` (generation_cache.jsonl as they arrive, a
    rerun generates only what is missing; safety_generations.jsonl and task_generations.jsonl,
    which `spard bench --rejudge` judges again). ``serving`` (spard.eval.serving.CellServing):
    the answers come from a server given the cell's adapter. spard.eval.stages runs the same
    steps in three processes."""
    from .eval import evaluate

    model, run, manifest = train_cell(cell, data, settings, progress=progress, out_dir=out_dir,
                                      fingerprint=fingerprint)
    t = time.perf_counter()
    from .eval.serving import served_cell
    with served_cell(serving, model, cell.run_dir(out_dir) if out_dir is not None else None) as backend:
        result = evaluate(model, data.tokenizer, safety_prompts=data.eval_prompts, task_rows=data.task_test,
                          judge=_judge(settings, out_dir), max_new_tokens=settings.max_new_tokens,
                          task_max_new_tokens=settings.task_max_new_tokens, batch_size=settings.eval_batch_size,
                          extra_judges=[_judge(settings, out_dir, spec) for spec in settings.extra_judges],
                          backend=backend, out_dir=answers_dir(cell, out_dir) if out_dir is not None else None,
                          progress=progress)
    return {**cell_result(cell, manifest, result, run, time.perf_counter() - t), "stages": "together"}


def answers_dir(cell: Cell, out_dir) -> Path:
    """Where a cell's answers and verdicts are kept (JSON Lines, spard.eval.evaluate)."""
    return Path(out_dir) / "generations" / cell.key


def train_cell(cell: Cell, data: BenchData, settings: BenchSettings, *, progress: bool = False, out_dir=None,
               fingerprint: Optional[str] = None):
    """A cell's training: (the fine-tuned model, the run dict, the attack manifest)."""
    from .defenses import DefenseData, make_defense
    from .trainer import needs_base_model, run_defense

    rows, manifest = attack_rows(data, cell.attack, cell.ratio, cell.seed, settings.max_length,
                                 on_overlap=settings.on_overlap)
    if settings.prompt_layout != "chat":
        rows = [{**r, "layout": settings.prompt_layout} for r in rows]
    torch.manual_seed(cell.seed)
    defense = make_defense(cell.defense, **settings.settings_of(cell.defense))
    ddata = DefenseData(user=rows, safety_pool=data.safety_pool, seed=cell.seed, max_length=settings.max_length,
                        base_weights=data.base_weights if needs_base_model(defense) else None)
    optim = copy.deepcopy(settings.optim)
    optim.seed = cell.seed
    ckpt = None
    if out_dir is not None:
        ckpt = _cell_run_dir(cell, out_dir, fingerprint)
    model, run = run_defense(defense, data.fresh_model(), data.tokenizer, ddata, optim=optim, lora=settings.lora,
                             progress=progress, desc=cell.key, checkpoint_dir=ckpt,
                             save_every=settings.save_every, keep_checkpoints=1, resume=ckpt is not None)
    return model, run, manifest


def cell_result(cell: Cell, manifest: dict, result: dict, run: dict, eval_seconds: float) -> dict:
    """A finished cell's record (cells/<cell>.json) from its training and its evaluation."""
    return {"version": CELL_VERSION, "cell": asdict(cell), "attack_manifest": manifest,
            "asr": result["safety"]["asr"], "hs": result["safety"].get("hs"),
            "degenerate": result["safety"].get("degenerate_responses", 0), "n_eval": result["safety"]["n"],
            "accuracy": result["task"]["accuracy"], "evaluation": result, "judges": result.get("judges"),
            "train": run, "eval_seconds": eval_seconds}


def _judge(settings: BenchSettings, out_dir, spec: Optional[str] = None):
    """The grid's judge (or the extra judge ``spec``, "name" or "name=model"); the rubric API
    judge keeps every paid reply in one cache shared by all cells and workers of the grid
    (``judge_cache.jsonl``, append-only, safe between processes)."""
    from .eval import make_judge

    name, model = settings.judge, settings.judge_model
    if spec is not None:
        name, _, model = spec.partition("=")
        model = model or None
    if name == "rubric" and out_dir is not None:
        return make_judge("rubric", model=model, cache_path=Path(out_dir) / "judge_cache.jsonl", progress=False)
    judge = make_judge(name, model=model)
    judge.progress = False  # the grid's own bar is the progress; a bar per cell would bury it
    return judge


def _cell_run_dir(cell: Cell, out_dir, fingerprint: Optional[str]) -> str:
    """The cell's checkpoint folder; checkpoints made under other settings are discarded."""
    import shutil

    run_dir = cell.run_dir(out_dir)
    stamp = run_dir / "fingerprint.txt"
    if run_dir.exists() and (not stamp.is_file() or stamp.read_text(encoding="utf-8") != str(fingerprint)):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, str(fingerprint))
    return str(run_dir / "checkpoints")


def run_grid(data: BenchData, settings: BenchSettings, out_dir, *, progress: bool = True,
             cell_runner: Optional[Callable] = None, shard: Optional[tuple[int, int]] = None,
             worker: Optional[str] = None, claim_timeout_s: float = 600.0, serving=None,
             stages: str = "together") -> dict:
    """Runs every unfinished cell of this worker's shard that no live worker has claimed;
    returns {"done", "skipped", "failed", "claimed_by_others": [keys]}.

    Several workers may share ``out_dir`` (one per GPU, a Slurm array, local processes): a cell
    is claimed atomically before it runs (spard.training.claims), so none runs twice, and a claim whose
    worker stopped sending heartbeats for ``claim_timeout_s`` (or died on this host) is taken over.
    The timeout belongs to the grid: the first worker stores it in bench.json, and a worker with
    another is refused (pin_claim_timeout). With the default runner, every attack is checked
    against the data (check_attacks) before the first cell. ``stages="separate"``: the default
    runner runs each cell's training, generation and judging in three processes
    (spard.eval.stages), each of which returns its GPU memory as it ends.
    """
    from .training.claims import ClaimBoard

    settings.validate()
    if stages not in ("separate", "together"):
        raise ValueError(f"stages: expected separate or together, got {stages!r}")
    missing = [a for a in data.attacks if not data.attacks[a]]
    if missing:
        raise ValueError(f"attacks {missing} have no rows")
    out = Path(out_dir)
    stage_runner = None
    if cell_runner is None and stages == "separate":
        from .eval.stages import StageRunner
        stage_runner = StageRunner(data, out, serving=serving)
    if cell_runner is None:  # the real runner checkpoints each cell under out/runs/
        def runner(cell, data, settings, fingerprint):
            if stage_runner is not None:
                record = stage_runner.run(cell, settings, fingerprint)
            else:
                record = run_cell(cell, data, settings, out_dir=out, fingerprint=fingerprint, serving=serving)
            return {**record, "answers_fingerprint": answers_fingerprint(cell, settings, data.description)}
    else:
        def runner(cell, data, settings, fingerprint):
            return cell_runner(cell, data, settings)
    from .attack import ATTACKS
    benign_kinds = [k for k in settings.attack_kinds if "benign" in ATTACKS[k].needs]
    if benign_kinds and not data.benign:
        raise ValueError(f"attack_kinds: {', '.join(benign_kinds)} need benign rows (prompt/response, another "
                         "source than the task); the bench has none (bench file: benign: PATH)")
    labels = attack_labels(settings.attack_kinds, list(data.attacks))
    if cell_runner is None:  # a runner of one's own builds (or fakes) its own rows
        check_attacks(data, settings)
    cells = grid(settings, sorted(labels))
    fingerprints = {c.key: cell_fingerprint(c, settings, data.description) for c in cells}
    # The summary reads only the cells of this grid made under these settings. Every worker of
    # one grid writes the same file (and all of them the same claim timeout: pin_claim_timeout).
    pin_claim_timeout(out, claim_timeout_s, {"settings": settings.to_dict(), "data": data.description,
                                             "attacks": sorted(labels),
                                             "attack_kinds": {k: list(v) for k, v in labels.items()},
                                             "cells": fingerprints,
                                             **({"data_checks": data.data_checks} if data.data_checks else {})})
    board = ClaimBoard(out / "claims", worker=worker, timeout_s=claim_timeout_s)
    status: dict[str, list] = {"done": [], "skipped": [], "failed": [], "claimed_by_others": []}
    mine = shard_of(cells, shard)
    bar = tqdm(mine, desc="bench", disable=not progress, dynamic_ncols=True)
    try:
        for cell in bar:
            bar.set_postfix_str(cell.key, refresh=True)
            fingerprint = fingerprints[cell.key]
            if cell_done(cell, out, fingerprint):
                status["skipped"].append(cell.key)
                continue
            claim = board.claim(cell.key)
            if claim is None:
                status["claimed_by_others"].append(cell.key)
                continue
            with claim:
                if cell_done(cell, out, fingerprint):  # finished by another worker since we looked
                    status["skipped"].append(cell.key)
                    continue
                _run_one(cell, data, settings, runner, fingerprint, out, status)
    finally:
        if stage_runner is not None:
            stage_runner.close()  # the data file the stages read
    # The cells other workers held may have finished meanwhile: only the others stay unfinished.
    by_key = {c.key: c for c in mine}
    finished = [k for k in status["claimed_by_others"] if cell_done(by_key[k], out, fingerprints[k])]
    status["skipped"] += finished
    status["claimed_by_others"] = [k for k in status["claimed_by_others"] if k not in finished]
    return status


def rejudge_grid(data: BenchData, settings: BenchSettings, out_dir) -> dict:
    """Judges again, with the grid's current judges, the answers kept under generations/ of
    every finished cell whose answers were made under the current settings (answers_fingerprint),
    without generating; rewrites those cells' records (their fingerprint now the current one).
    Returns {"rejudged", "missing": [keys]} (missing: no kept answers, or made under other
    settings; run_grid runs those in full)."""
    from .eval.stages import judge_answers

    settings.validate()
    out = Path(out_dir)
    status: dict[str, list] = {"rejudged": [], "missing": []}
    for cell in grid(settings, sorted(attack_labels(settings.attack_kinds, list(data.attacks)))):
        try:
            record = json.loads(cell.path(out).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if (not isinstance(record, dict) or record.get("version") != CELL_VERSION
                or record.get("answers_fingerprint") != answers_fingerprint(cell, settings, data.description)
                or not (answers_dir(cell, out) / "safety_generations.jsonl").is_file()):
            status["missing"].append(cell.key)
            continue
        result = judge_answers(cell, data, settings, out, (record.get("evaluation") or {}).get("generation"))
        write_json_atomic(cell.path(out), {
            **record, **cell_result(cell, record["attack_manifest"], result, record["train"], record["eval_seconds"]),
            "fingerprint": cell_fingerprint(cell, settings, data.description), "rejudged": True})
        status["rejudged"].append(cell.key)
    return status


def check_claim_timeout(out_dir, claim_timeout_s: float) -> None:
    """Refuses a worker whose claim timeout is not the grid's (stored in bench.json by its first
    worker): with two timeouts, the shorter one presumes a live worker dead and runs its cell
    again."""
    p = Path(out_dir) / "bench.json"
    try:
        stored = json.loads(p.read_text(encoding="utf-8")).get("claim_timeout_s") if p.is_file() else None
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, (int, float)) and float(stored) != float(claim_timeout_s):
        raise ValueError(f"--claim-timeout: {claim_timeout_s:g} s, but the grid in {out_dir} runs with {stored:g} s "
                         f"(bench.json, set by its first worker); give --claim-timeout {stored:g}")


def pin_claim_timeout(out_dir, claim_timeout_s: float, record: Optional[dict] = None) -> None:
    """Stores the claim timeout with the grid in bench.json (with ``record``, the grid's
    description, when given), refusing one that differs from the stored (check_claim_timeout);
    one worker at a time."""
    import fcntl

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".bench.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        check_claim_timeout(out, claim_timeout_s)
        p = out / "bench.json"
        if record is None:
            try:
                record = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
            except (OSError, ValueError):
                record = {}
            if record.get("claim_timeout_s") is not None:
                return
        write_json_atomic(p, {**record, "claim_timeout_s": float(claim_timeout_s)})
    finally:
        os.close(fd)  # closing releases the lock


def _run_one(cell, data, settings, runner, fingerprint, out, status) -> None:
    import shutil

    try:
        result = {**runner(cell, data, settings, fingerprint), "fingerprint": fingerprint}
    except Exception as e:  # noqa: BLE001 - one broken cell must not stop the grid
        # redacted: an API key in an exception text (a library's message, an echoing server)
        write_json_atomic(cell.error_path(out), {"cell": asdict(cell), "error": redact(repr(e)),
                                                 "traceback": redact(traceback.format_exc())})
        status["failed"].append(cell.key)
        tqdm.write(redact(f"bench: cell {cell.key} failed: {e!r} (rerun to retry)"))
        return
    write_json_atomic(cell.path(out), result)
    cell.error_path(out).unlink(missing_ok=True)
    shutil.rmtree(cell.run_dir(out), ignore_errors=True)  # its checkpoints are no longer needed
    status["done"].append(cell.key)



# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def load_cells(out_dir) -> list[dict]:
    """Finished cells; when bench.json lists the grid, only its cells with matching fingerprints."""
    root = Path(out_dir) / "cells"
    expected = None
    if (Path(out_dir) / "bench.json").is_file():
        expected = json.loads((Path(out_dir) / "bench.json").read_text(encoding="utf-8")).get("cells")
    cells = []
    for p in sorted(root.rglob("*.json")):
        if p.name.endswith(".error.json"):
            continue
        try:
            c = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{p}: unreadable cell result ({e})") from e
        if c.get("version") != CELL_VERSION:
            continue
        key = Cell(**c["cell"]).key
        if expected is None or expected.get(key) == c.get("fingerprint"):
            cells.append(c)
    return cells


def _stats(values: list) -> dict:
    """Mean, std and a 95% t-interval over the runs (spard.stats.mean_interval)."""
    from .stats import mean_interval
    return mean_interval(values)


def _per_seed_stats(cells: list, metric: str) -> dict:
    """The interval over seeds of each seed's mean over its cells (attacks and ratios): the
    seeds are the independent runs, the cells of one seed share its attack sample."""
    by_seed: dict = {}
    for c in cells:
        v = c.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            by_seed.setdefault(c["cell"]["seed"], []).append(v)
    return _stats([statistics.fmean(v) for _, v in sorted(by_seed.items())])


def _degenerate(cells: list) -> dict:
    """Empty or degenerate answers over ``cells`` (never scored as safe; the tables mark them)."""
    return {"degenerate": sum(int(c.get("degenerate") or 0) for c in cells),
            "answers": sum(int(c.get("n_eval") or 0) for c in cells)}


def _order(names, preferred) -> list:
    pref = [d for d in preferred if d in names]
    return pref + sorted(n for n in names if n not in pref)


INTERVAL_NOTE = "95% Student-t interval over seeds (mean ± t(0.975, n-1)·s/√n); none with one seed"
COMPARISON_NOTE = ("paired bootstrap over the (attack, ratio, seed) cells both defenses finished: mean of "
                   "defense minus reference, 95% percentile interval from 10000 resamples (seed 0); "
                   "significant when the interval excludes 0")


def summarize(out_dir, *, defenses_order: Optional[Sequence[str]] = None, n_boot: int = 10_000) -> dict:
    """Aggregates the finished cells (mean, std and a 95% t-interval over seeds; paired
    bootstrap comparisons of each defense against SFT and of SPARD against its ablations) and
    writes summary.json, cells.csv, table.md and the plots. Returns the summary dict."""
    from .defenses import defense_names
    from .stats import paired_comparisons
    out = Path(out_dir)
    cells = load_cells(out)
    if not cells:
        raise ValueError(f"{out}: no finished cells to summarise")
    order = _order({c["cell"]["defense"] for c in cells}, list(defenses_order or defense_names()))
    attacks = sorted({c["cell"]["attack"] for c in cells})
    ratios = sorted({c["cell"]["ratio"] for c in cells})
    groups: dict = {}
    for c in cells:
        k = (c["cell"]["defense"], c["cell"]["attack"], c["cell"]["ratio"])
        groups.setdefault(k, []).append(c)
    rows = []
    for (d, a, r), cs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1], kv[0][2])):
        rows.append({"defense": d, "attack": a, "ratio": r, "seeds": sorted(c["cell"]["seed"] for c in cs),
                     "asr": _stats([c["asr"] for c in cs]), "hs": _stats([c.get("hs") for c in cs]),
                     "accuracy": _stats([c["accuracy"] for c in cs]),
                     "train_seconds": _stats([c["train"]["seconds"] for c in cs]),
                     **_degenerate(cs)})
    overall = {}
    for d in order:
        cs = [c for c in cells if c["cell"]["defense"] == d]
        overall[d] = {"asr": _per_seed_stats(cs, "asr"), "accuracy": _per_seed_stats(cs, "accuracy"),
                      "hs": _per_seed_stats(cs, "hs"), "cells": len(cs),
                      "train_seconds": _stats([c["train"]["seconds"] for c in cs]), **_degenerate(cs)}
    summary = {"defenses": order, "attacks": attacks, "ratios": ratios, "groups": rows, "overall": overall,
               "cells": len(cells), "interval": INTERVAL_NOTE,
               "comparisons": paired_comparisons(cells, order, n_boot=n_boot, seed=0),
               "comparison_method": COMPARISON_NOTE}
    summary["judges"] = judges_summary(cells, order)
    tuned = sorted((out / "tuned").glob("*.json")) if (out / "tuned").is_dir() else []
    if tuned:  # the grid ran with these (spard.tuning): the table's notes say so
        summary["tuned"] = {p.stem: json.loads(p.read_text(encoding="utf-8")).get("settings") or {} for p in tuned
                            if p.stem in order}
    summary["target"] = target_check(summary)
    write_json_atomic(out / "summary.json", summary)
    write_text_atomic(out / "cells.csv", cells_csv(cells))
    write_text_atomic(out / "table.md", markdown_tables(summary))
    try:
        plot_summary(summary, out)
    except ImportError:  # matplotlib is optional for the summary
        pass
    return summary


def judges_summary(cells: list, order: Sequence[str]) -> Optional[dict]:
    """With several judges: per defense, each judge's ASR (mean and 95% interval over seeds)
    and each pair's Cohen's kappa (mean over the cells it is defined on). None without."""
    if not any(c.get("judges") for c in cells):
        return None
    out = {}
    for d in order:
        cs = [c for c in cells if c["cell"]["defense"] == d and c.get("judges")]
        if not cs:
            continue
        names = list(cs[0]["judges"]["asr"])
        asr = {n: _per_seed_stats([{"cell": c["cell"], "v": c["judges"]["asr"].get(n, {}).get("asr")} for c in cs], "v")
               for n in names}
        pairs = {}
        for c in cs:
            for p in c["judges"]["pairs"]:
                pairs.setdefault(f"{p['a']} / {p['b']}", []).append(p)
        kappas = {k: {"kappa": _stats([p["kappa"] for p in ps])["mean"],
                      "agreement": _stats([p["agreement"] for p in ps])["mean"],
                      "disagreements": sum(p["disagreements"] for p in ps), "cells": len(ps)}
                  for k, ps in pairs.items()}
        out[d] = {"asr": asr, "pairs": kappas, "cells": len(cs)}
    return out


def judges_markdown(judges: dict) -> str:
    names = list(next(iter(judges.values()))["asr"])
    pairs = list(next(iter(judges.values()))["pairs"])
    head = ["defense"] + [f"{n} ASR" for n in names] + [f"κ {p}" for p in pairs]
    lines = ["### Judges side by side (ASR %, mean [95% interval over seeds]; Cohen's kappa, mean over cells)", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for d, j in judges.items():
        ks = ["-" if j["pairs"].get(p, {}).get("kappa") is None else f"{j['pairs'][p]['kappa']:.2f}" for p in pairs]
        lines.append("| " + " | ".join([d] + [_pct(j["asr"][n]) if n in j["asr"] else "-" for n in names] + ks) + " |")
    return "\n".join(lines)


def target_check(summary: dict, method: str = "spard", reference: str = "sft",
                 tolerance: float = 0.03) -> Optional[dict]:
    """The issue's target: ``method`` has the lowest mean ASR of all defenses, with accuracy
    within ``tolerance`` of ``reference`` (or better). None when either is missing."""
    o = summary["overall"]
    if method not in o or reference not in o or o[method]["asr"]["mean"] is None:
        return None
    ranked = sorted((v["asr"]["mean"], d) for d, v in o.items() if v["asr"]["mean"] is not None)
    gap = o[method]["accuracy"]["mean"] - o[reference]["accuracy"]["mean"]
    lowest = [d for a, d in ranked if a == ranked[0][0]]
    # A tie with the undefended reference (both at 100% ASR, say) is no defense at all.
    ref_asr = o[reference]["asr"]["mean"]
    below = ref_asr is not None and o[method]["asr"]["mean"] < ref_asr
    return {"method": method, "reference": reference, "lowest_asr": lowest,
            "method_has_lowest_asr": method in lowest, "method_below_reference_asr": below,
            "accuracy_gap": gap, "accuracy_within_tolerance": gap >= -tolerance, "tolerance": tolerance,
            "met": bool(method in lowest and below and gap >= -tolerance)}


def cells_csv(cells: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["attack", "ratio", "seed", "defense", "asr", "hs", "accuracy", "train_seconds", "steps"])
    for c in sorted(cells, key=lambda c: (c["cell"]["attack"], c["cell"]["ratio"], c["cell"]["seed"], c["cell"]["defense"])):
        k = c["cell"]
        w.writerow([k["attack"], k["ratio"], k["seed"], k["defense"], c["asr"], c.get("hs"), c["accuracy"],
                    round(c["train"]["seconds"], 2), c["train"]["steps"]])
    return buf.getvalue()


def _pct(s: dict) -> str:
    """"mean [low, high]" in %, the 95% interval clipped to 0..100 for display."""
    from .stats import format_interval
    return format_interval(s)


def _hs(s: dict) -> str:
    return "-" if s["mean"] is None else f"{s['mean']:.2f}"


def markdown_tables(summary: dict) -> str:
    """One table per harmful ratio and one over all ratios, in the paper's layout: a row per
    defense; ASR, HS and accuracy per attack, then their average over attacks (%, mean and 95%
    t-interval over seeds), and the paired comparisons."""
    attacks, order = summary["attacks"], summary["defenses"]
    by = {(g["defense"], g["attack"], g["ratio"]): g for g in summary["groups"]}
    parts = []
    for ratio in summary["ratios"]:
        head = ["defense"] + [f"{a} {m}" for a in attacks for m in ("ASR", "HS", "acc")] + ["avg ASR", "avg acc"]
        lines = [f"### p_h = {ratio:g}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for d in order:
            cells, asrs, accs = [], [], []
            for a in attacks:
                g = by.get((d, a, ratio))
                if g is None:
                    cells += ["-"] * 3
                    continue
                cells += [_pct(g["asr"]) + (" †" if g.get("degenerate") else ""), _hs(g["hs"]), _pct(g["accuracy"])]
                asrs.append(g["asr"]["mean"])
                accs.append(g["accuracy"]["mean"])
            avg = lambda v: "-" if not v or None in v else f"{100 * statistics.fmean(v):.1f}"
            lines.append("| " + " | ".join([d] + cells + [avg(asrs), avg(accs)]) + " |")
        parts.append("\n".join(lines))
    lines = ["### Mean over all ratios, attacks and seeds", "",
             "| defense | ASR (%) | accuracy (%) | train s / run | cells |", "| --- | --- | --- | --- | --- |"]
    for d in order:
        o = summary["overall"][d]
        secs = o.get("train_seconds", {}).get("mean")
        secs = "-" if secs is None else f"{secs:.1f}"
        mark = " †" if o.get("degenerate") else ""
        lines.append(f"| {d} | {_pct(o['asr'])}{mark} | {_pct(o['accuracy'])} | {secs} | {o['cells']} |")
    flagged = [(d, o) for d, o in summary["overall"].items() if o.get("degenerate")]
    if flagged:
        lines += ["", "† empty or degenerate answers, left out of the ASR (never counted as safe): "
                  + "; ".join(f"{d} {o['degenerate']} of {o['answers']}" for d, o in flagged) + "."]
    t = summary.get("target")
    if t:
        ok = t.get("met", t["method_has_lowest_asr"] and t["accuracy_within_tolerance"])
        tie = "" if t.get("method_below_reference_asr", True) else \
            f" ({t['method']}'s ASR is not below {t['reference']}'s)"
        lines += ["", f"Target ({t['method']}: lowest mean ASR, below {t['reference']}'s, accuracy within "
                  f"{100 * t['tolerance']:.0f} points of {t['reference']}): {'met' if ok else 'NOT met'}{tie}. "
                  f"Lowest mean ASR: {', '.join(t['lowest_asr'])}; {t['method']} accuracy minus {t['reference']}: "
                  f"{100 * t['accuracy_gap']:+.1f} points."]
    if summary.get("tuned"):
        from .tuning import format_settings
        lines += ["", "Tuned settings (spard bench --tune-defenses, chosen on the validation split): "
                  + "; ".join(f"{d}: {format_settings(v)}" for d, v in summary["tuned"].items()) + "."]
    parts.append("\n".join(lines))
    parts.append(comparisons_table(summary))
    if summary.get("judges"):
        parts.append(judges_markdown(summary["judges"]))
    return "\n\n".join(parts) + "\n"


def comparisons_table(summary: dict) -> str:
    """The paired comparisons (defense minus reference, percentage points) as a table; * marks
    a difference whose 95% interval excludes 0."""
    lines = ["### Paired comparisons (defense minus reference, points)", "",
             "| defense | reference | metric | difference | 95% interval | cells | significant |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in summary.get("comparisons", []):
        diff = "-" if c["diff"] is None else f"{100 * c['diff']:+.1f}"
        ci = "-" if c["low"] is None else f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"
        lines.append(f"| {c['defense']} | {c['reference']} | {c['metric']} | {diff} | {ci} | {c['n']} | "
                     f"{'*' if c['significant'] else ''} |")
    if not summary.get("comparisons"):
        lines.append("| - | - | - | - | - | - | - |")
    lines += ["", f"Intervals in the tables: {summary.get('interval', INTERVAL_NOTE)}; shown clipped to 0..100. "
              f"Comparisons: {summary.get('comparison_method', COMPARISON_NOTE)} (*)."]
    return "\n".join(lines)


def plot_summary(summary: dict, out_dir) -> list[Path]:
    """asr_vs_ratio.png (mean ± std over seeds, averaged over attacks) and asr_vs_accuracy.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import write_figure_atomic
    out = Path(out_dir)
    paths = []
    # 13+ defenses: distinct colours and markers so no two lines look alike
    styles = {d: (plt.cm.tab20(i % 20), "osD^v<>ph*"[i % 10]) for i, d in enumerate(summary["defenses"])}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in summary["defenses"]:
        xs, ys, es = [], [], []
        for r in summary["ratios"]:
            gs = [g for g in summary["groups"] if g["defense"] == d and g["ratio"] == r and g["asr"]["mean"] is not None]
            if gs:
                xs.append(r)
                ys.append(100 * statistics.fmean(g["asr"]["mean"] for g in gs))
                es.append(100 * statistics.fmean(g["asr"]["std"] for g in gs))
        if xs:
            ax.errorbar(xs, ys, yerr=es, color=styles[d][0], marker=styles[d][1], capsize=3, label=d)
    ax.set_xlabel("harmful ratio p_h")
    ax.set_ylabel("ASR (%)")
    ax.set_title("ASR against harmful ratio")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    else:  # every cell's answers empty or degenerate: no ASR to draw
        ax.text(0.5, 0.5, "no ASR: every answer empty or degenerate", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
    ax.grid(alpha=0.3)
    write_figure_atomic(fig, out / "asr_vs_ratio.png")
    paths.append(out / "asr_vs_ratio.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for d in summary["defenses"]:
        o = summary["overall"][d]
        if o["asr"]["mean"] is None or o["accuracy"]["mean"] is None:
            continue
        ax.errorbar(100 * o["accuracy"]["mean"], 100 * o["asr"]["mean"], xerr=100 * o["accuracy"]["std"],
                    yerr=100 * o["asr"]["std"], color=styles[d][0], marker=styles[d][1], capsize=3, label=d,
                    linestyle="none")
        ax.annotate(d, (100 * o["accuracy"]["mean"], 100 * o["asr"]["mean"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("task accuracy (%)")
    ax.set_ylabel("ASR (%)")
    ax.set_title("ASR against accuracy (all cells; lower right is better)")
    ax.grid(alpha=0.3)
    write_figure_atomic(fig, out / "asr_vs_accuracy.png")
    paths.append(out / "asr_vs_accuracy.png")
    return paths


# ----------------------------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------------------------
def check_counts(**counts) -> None:
    """n_task, n_task_test, n_eval: None (all rows) or an int >= 1."""
    for key, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}: expected an int >= 1, got {value!r}")


DUPLICATES = ("drop", "error")


def dedupe_prompts(rows: list, what: str, policy: str, dropped: dict, key: Optional[str] = None) -> list:
    """The first row of each prompt (exact text after whitespace normalisation; rows or
    strings); ``policy`` "error" refuses duplicates instead, naming ``what`` and their count.
    The count dropped goes into ``dropped[key or what]``."""
    if policy not in DUPLICATES:
        raise ValueError(f"duplicates: expected {' | '.join(DUPLICATES)}, got {policy!r}")
    seen, out = set(), []
    for r in rows:
        k = " ".join(str(r if isinstance(r, str) else r["prompt"]).split())
        if k not in seen:
            seen.add(k)
            out.append(r)
    n = len(rows) - len(out)
    if n and policy == "error":
        raise ValueError(f"duplicates: {what} has {n} duplicate prompt(s) (the same text after whitespace "
                         "normalisation); de-duplicate it, or set duplicates: drop")
    dropped[key or what] = n
    return out


def _duplicates_noted(description: dict, dropped: dict) -> dict:
    """The description with the duplicates dropped (only when some were: the cells of data
    without duplicates keep their fingerprints)."""
    some = {k: v for k, v in dropped.items() if v}
    return {**description, "duplicates_dropped": some} if some else description


def world_data(world_settings=None, *, n_task: Optional[int] = None, n_eval: Optional[int] = None,
               n_task_test: Optional[int] = None, progress: bool = True, duplicates: str = "drop") -> BenchData:
    """The synthetic world (aligned tiny model from the cache, built on first use); its attack
    corpus is named "world". Its harmful answers are templates per request kind, shared by the
    attack corpus, the evaluation items and the pool by design: attack rows are checked against
    the evaluation items and the pool by prompt only."""
    check_counts(n_task=n_task, n_task_test=n_task_test, n_eval=n_eval)
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates: expected {' | '.join(DUPLICATES)}, got {duplicates!r}")
    from .defenses.base import base_weights_of
    from .world import WorldSettings, build_world
    from .world import text as world_text
    w = build_world(world_settings or WorldSettings(), progress=progress)
    task = [{"prompt": r["prompt"], "response": r["answer"], "answer": r["answer"]} for r in w.data["task_train"]]
    dropped: dict = {}
    harmful = dedupe_prompts([r["prompt"] for r in w.data["harmful_test"]], "world harmful_test", duplicates,
                             dropped, "eval_prompts")
    task_test = dedupe_prompts(w.data["task_test"], "world task_test", duplicates, dropped, "task_test")
    pool = dedupe_prompts(w.data["safety_pool"], "world safety_pool", duplicates, dropped, "safety_pool")
    # The validation split (tuning) is what the test split leaves: held-out rows it never shows.
    tail = lambda rows, n: rows[n:] if n is not None else []
    return BenchData(model=w.model, tokenizer=w.tokenizer, task=task[:n_task],
                     task_test=task_test[:n_task_test], task_val=tail(task_test, n_task_test),
                     val_prompts=tail(harmful, n_eval),
                     eval_prompts=harmful[:n_eval], eval_items=harmful[:n_eval], compare_answers=False,
                     safety_pool=pool, attacks={"world": w.data["harmful_train"]},
                     benign=[{"prompt": r["prompt"], "response": r["response"]} for r in w.data["benign_attack"]],
                     wording=dict(world_text.ATTACK_WORDING),
                     base_weights=base_weights_of(w.base_model) if getattr(w, "base_model", None) is not None else None,
                     sources={"clean": "world:task_train", "eval": "world:harmful_test", "pool": "world:safety_pool",
                              "benign": "world:benign_attack", "attacks": {"world": "world:harmful_train"}},
                     data_checks={"duplicates": duplicates, "duplicates_dropped": dropped},
                     description=_duplicates_noted(
                         {"source": "world", "settings": asdict(w.settings), "cache": w.cache_file,
                          "data_sha256": _rows_hash(w.data), "n_task": n_task, "n_eval": n_eval,
                          "n_task_test": n_task_test}, dropped))


def _rows_hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_data(*, model: str, task: str, task_test: str, eval_prompts: str, safety_pool: str,
              attacks: dict[str, str], n_task: Optional[int] = None, n_task_test: Optional[int] = None,
              n_eval: Optional[int] = None, device: Optional[str] = None,
              benign: Optional[str] = None, val_prompts: Optional[str] = None, task_val: Optional[str] = None,
              validation_share: Optional[float] = None, duplicates: str = "drop",
              settings: Optional[BenchSettings] = None, base_model: Optional[str] = None) -> BenchData:
    """Real-format files: a base model path, task train/test, evaluation prompts (only
    ``prompt`` is needed; a harmful answer, when there, is compared with the attack's), a safety
    pool (``prompt`` and ``safe``; ``unsafe`` for the defenses that train against harmful
    answers), and attack corpora name -> path (``prompt`` and ``unsafe``), and optionally benign
    rows (``prompt``, ``response``) for the benign attack kinds. Every file is read (and every
    error names its key) before the model loads. Duplicate prompts in the evaluation sets and the
    pool are dropped and counted (``duplicates="drop"``) or refused (``"error"``). With
    ``settings``, the grid's attacks are checked against the data (check_attacks) before the
    model loads too."""
    from .data import ATTACK_FIELDS, POOL_FIELDS, load_safety, load_task
    from .eval import load_model
    from .training.preflight import check_model_source, input_named, load_error
    check_counts(n_task=n_task, n_task_test=n_task_test, n_eval=n_eval)
    if duplicates not in DUPLICATES:
        raise ValueError(f"duplicates: expected {' | '.join(DUPLICATES)}, got {duplicates!r}")
    if not isinstance(attacks, dict) or not attacks:
        raise ValueError("attacks: name at least one attack corpus (a mapping name -> path)")
    check_model_source(model, "model")
    if base_model is not None:
        check_model_source(base_model, "base_model")
    dropped: dict = {}
    with input_named("task"):
        task_rows = load_task(task, limit=n_task)
    with input_named("task_test"):
        test_rows = load_task(task_test, limit=n_task_test)
    test_rows = dedupe_prompts(test_rows, f"task_test ({task_test})", duplicates, dropped, "task_test")
    with input_named("eval_prompts"):
        ev = load_task(eval_prompts, limit=n_eval, require_response=False)  # prompt (+ input)
    ev = dedupe_prompts(ev, f"eval_prompts ({eval_prompts})", duplicates, dropped, "eval_prompts")
    with input_named("safety_pool"):
        pool = load_safety(safety_pool, fields=POOL_FIELDS)
    pool = dedupe_prompts(pool, f"safety_pool ({safety_pool})", duplicates, dropped, "safety_pool")
    attack_rows = {}
    for name, path in attacks.items():
        with input_named(f"attacks.{name}"):
            attack_rows[name] = load_safety(path, fields=ATTACK_FIELDS)
    benign_rows = []
    if benign is not None:
        with input_named("benign"):
            benign_rows = load_task(benign)
    val_p, val_t, split = validation_rows(ev, test_rows, val_prompts=val_prompts, task_val=task_val,
                                          share=validation_share)
    if split:  # the test split gives up the rows set aside
        ev, test_rows = split
    elif val_prompts is not None:
        val_p = dedupe_prompts(val_p, f"val_prompts ({val_prompts})", duplicates, dropped, "val_prompts")
        val_t = dedupe_prompts(val_t, f"task_val ({task_val})", duplicates, dropped, "task_val")
    data = BenchData(model=None, tokenizer=None, task=task_rows, task_test=test_rows,
                     eval_prompts=[r["prompt"] for r in ev], eval_items=ev, safety_pool=pool, attacks=attack_rows,
                     benign=benign_rows, val_prompts=val_p, task_val=val_t,
                     sources={"clean": task, "eval": eval_prompts, "pool": safety_pool, "benign": benign,
                              "attacks": dict(attacks)},
                     data_checks={"duplicates": duplicates, "duplicates_dropped": dropped},
                     description=_duplicates_noted(
                         {"source": "files", "model": model, "task": task, "task_test": task_test,
                          "eval_prompts": eval_prompts, "safety_pool": safety_pool, "attacks": attacks,
                          "n_task": n_task, "n_task_test": n_task_test, "n_eval": n_eval,
                          **({"benign": benign} if benign is not None else {}),
                          **({"val_prompts": val_prompts, "task_val": task_val}
                             if val_prompts is not None else {}),
                          **({"validation_share": validation_share} if validation_share else {}),
                          **({"base_model": base_model} if base_model is not None else {})}, dropped),
                     device=device)
    if settings is not None:
        check_attacks(data, settings)
    try:  # the base model stays on the host; each cell trains on its own copy on ``device``
        data.model, data.tokenizer = load_model(model, device="cpu")
    except (OSError, ValueError) as e:
        raise load_error("model", model, e) from e
    if base_model is not None and (settings is None or any(defenses_needing_base(settings))):
        from .defenses.base import check_base_weights
        from .trainer import load_base_weights
        data.base_weights = load_base_weights(base_model, what="base_model")  # on the host, as the model
        check_base_weights(data.model, data.base_weights, "base_model")
    if device is None:
        data.device = "cuda" if torch.cuda.is_available() else "cpu"
    return data


def validation_rows(ev: list, test_rows: list, *, val_prompts=None, task_val=None, share=None):
    """(validation prompts, validation problems, (test prompts, test problems) or None): from
    the files ``val_prompts`` and ``task_val`` (both or neither), or a seeded ``share`` of the
    test files set aside (the test split then shrinks), or none."""
    from .data import load_task
    from .training.preflight import input_named
    if (val_prompts is None) != (task_val is None):
        raise ValueError("val_prompts / task_val: give both validation files or neither")
    if val_prompts is not None and share is not None:
        raise ValueError("validation_share: give either validation files (val_prompts, task_val) or a share, not both")
    if val_prompts is not None:
        with input_named("val_prompts"):
            vp = [r["prompt"] for r in load_task(val_prompts, require_response=False)]
        with input_named("task_val"):
            vt = load_task(task_val)
        return vp, vt, None
    if share is None:
        return [], [], None
    ev_test, ev_val = split_validation(ev, share, 0, "evaluation prompts")
    t_test, t_val = split_validation(test_rows, share, 0, "test problems")
    return [r["prompt"] for r in ev_val], t_val, (ev_test, t_test)


def defenses_needing_base(settings: BenchSettings) -> list[str]:
    """The grid's defenses that read the base model (AsFT, LoX)."""
    from .defenses import make_defense
    from .trainer import needs_base_model
    return [d for d in settings.defenses if needs_base_model(make_defense(d, **settings.settings_of(d)))]


def check_base_model(settings: BenchSettings, has_base_model: bool) -> None:
    """Refuses, before any model loads, a grid with defenses that need the base model when the
    bench has none."""
    need = [] if has_base_model else defenses_needing_base(settings)
    if need:
        raise ValueError(f"base_model: defense(s) {', '.join(need)} need the base model (the weights before safety "
                         "alignment); give base_model in the bench file or leave them out of --defenses")


def check_defense_data(settings: BenchSettings, safety_pool: list[dict]) -> None:
    """Refuses, before any cell runs, a grid whose defenses need data the bench lacks: harmful
    answers (the pool's ``unsafe`` field) for the defenses that train against them."""
    from .defenses import make_defense
    if any(r.get("unsafe") for r in safety_pool):
        return
    need = [d for d in settings.defenses
            if make_defense(d, **settings.settings_of(d)).needs_harmful_answers()]
    if need:
        raise ValueError(f"safety_pool: defense(s) {', '.join(need)} train against harmful answers, and the pool "
                         "has no 'unsafe' field; give a pool with harmful answers or leave them out of --defenses")
