"""What every cell shares (``BenchData``): the aligned model, the task, the evaluation prompts,
the safety pool and the attack corpora, from the synthetic world or from files, with the
validation split tuning scores on and the duplicate and overlap checks made on loading."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .attacks import check_attacks
from .settings import BenchSettings, defenses_needing_base


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
        from ..attack import row_losses
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
    from ..data import normalise_prompt as _norm
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
    from ..defenses.base import base_weights_of
    from ..world import WorldSettings, build_world
    from ..world import text as world_text
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
    from ..data import ATTACK_FIELDS, POOL_FIELDS, load_safety, load_task
    from ..eval import load_model
    from ..training.preflight import check_model_source, input_named, load_error
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
        from ..defenses.base import check_base_weights
        from ..trainer import load_base_weights
        data.base_weights = load_base_weights(base_model, what="base_model")  # on the host, as the model
        check_base_weights(data.model, data.base_weights, "base_model")
    if device is None:
        data.device = "cuda" if torch.cuda.is_available() else "cpu"
    return data


def validation_rows(ev: list, test_rows: list, *, val_prompts=None, task_val=None, share=None):
    """(validation prompts, validation problems, (test prompts, test problems) or None): from
    the files ``val_prompts`` and ``task_val`` (both or neither), or a seeded ``share`` of the
    test files set aside (the test split then shrinks), or none."""
    from ..data import load_task
    from ..training.preflight import input_named
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
