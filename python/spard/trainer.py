"""The one trainer: every defense fine-tunes through ``fit``, with exact resume.

``fit`` is the loop: each step, the defense's loss terms over this rank's micro-batches of the
global batch (``_loss_and_backward``), then ``optimizer_step`` (the defense's
``after_backward``, clipping, the optimizer step, the defense's ``after_step`` such as the SPAG
projection, the scheduler), then logs and checkpoints. ``run_defense`` adds the defense's
alignment stage and LoRA; ``train(config)`` is `spard train`: load data, build the attack and
the defense, add LoRA, fit, save the adapter and logs.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .training.batches import BatchStream
from .training.checkpoint import checkpoint_info, latest_checkpoint, load_checkpoint, load_objects, save_checkpoint
from .config import SPAG_DEFENSES, LoraConfig, OptimConfig, TrainConfig, save_config
from .defenses.base import Defense, DefenseData, TrainContext, check_base_weights, has_post_training
from .defenses.sft import SFT
from .defenses.spard import SPARD
from .distributed import all_reduce_sum, full_tensor, get_world_size, is_main_process, local_device
from .formatting import pad_id_of, prompt_of
from .training.guards import NonFiniteLossGuard, check_all_skipped, check_dropped_rows, check_finite_parameters
from .io import write_json_atomic
from .training.precision import autocast_for
from .spag import SafetyProjector, encode_rows, trainable_parameters

log = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised by an ``on_step`` hook to end training early (after the step's checkpoint)."""


def _total_steps(n_rows: int, optim: OptimConfig) -> int:
    if optim.max_steps is not None:
        return int(optim.max_steps)
    per_epoch = math.ceil(n_rows / (optim.batch_size * optim.grad_accum * get_world_size()))
    return max(1, math.ceil(optim.epochs * per_epoch))


def build_optimizer(params, optim: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                  betas=tuple(optim.betas))
    scheduler = get_scheduler(optim.scheduler, optimizer, num_warmup_steps=optim.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler


class _RunningMeans:
    """Sums of per-step logs kept on the device; read back only at logging steps."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            v = torch.as_tensor(v).detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])

    def pop(self) -> dict[str, float]:
        if not self.count:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k].reshape(()).cpu() for k in keys]) / self.count
        self.sums, self.count = {}, 0
        return dict(zip(keys, values.tolist()))


def fit(model: torch.nn.Module, tokenizer, rows: Sequence[dict], *, defense: Optional[Defense] = None,
        data: Optional[DefenseData] = None, optim: Optional[OptimConfig] = None,
        projector: Optional[SafetyProjector] = None, max_length: int = 512,
        checkpoint_dir: Optional[str] = None, save_every: int = 0, keep_checkpoints: int = 2,
        resume: bool = False, log_every: int = 10, progress: bool = True,
        extra_state: Optional[dict] = None, desc: Optional[str] = None,
        on_step: Optional[Callable[[int, dict], None]] = None,
        max_dropped_share: Optional[float] = None, on_nonfinite_loss: str = "error") -> dict:
    """Fine-tunes the trainable parameters of ``model`` on ``rows`` ({prompt, response}) under
    ``defense`` (default: plain SFT; ``projector=`` is SPAG with a ready projector).

    Each optimizer step draws ``batch_size x grad_accum x ranks`` examples and runs the defense's
    loss terms one micro-batch of ``batch_size`` at a time (see spard.defenses.base). With
    ``checkpoint_dir`` a checkpoint is written every ``save_every`` steps and at the end;
    ``resume=True`` continues from the newest one there, giving the same final parameters as an
    uninterrupted run. ``on_step(step, logs)`` runs after each step (and its checkpoint); it may
    raise StopTraining. After the last step the defense's post-fine-tuning stage
    (``after_training``) runs once, seeded by ``data.seed``, and the last checkpoint is written
    again with it done: a run resumed before it runs it, one resumed after it does not.
    Returns the run dict: steps, history (logged means), summary.

    Rows whose response lies beyond ``max_length`` are left out with a warning, and the call
    fails when more than ``max_dropped_share`` of them are (None: never). A non-finite loss
    stops the run (``on_nonfinite_loss="error"``) or skips that update ("skip"); non-finite
    trainable parameters (checked before each checkpoint and at the end), or a run whose every
    step was skipped, end it with an error; see `spard.training.guards`.
    """
    optim = optim or OptimConfig()
    if defense is not None and projector is not None:
        raise ValueError("give either defense= or projector= (SPAG), not both")
    if projector is not None:
        from .defenses.spard import ProjectorDefense
        defense = ProjectorDefense(projector)
    defense = defense or SFT()
    if not rows:
        raise ValueError("rows is empty: nothing to fine-tune on")
    params = trainable_parameters(model)
    device = params[0].device
    examples, kept = encode_rows(rows, tokenizer, max_length, "rows")
    dropped = check_dropped_rows(len(rows), len(kept), what="training rows", max_length=max_length,
                                 max_share=max_dropped_share)
    truncated = sum(e.truncated for e in examples)
    pad_id = pad_id_of(tokenizer)
    world = get_world_size()
    global_batch = optim.batch_size * optim.grad_accum * world
    user = BatchStream(examples, pad_id=pad_id, micro_batch_size=optim.batch_size, seed=optim.seed,
                       device=device, what="rows")
    total = defense.total_steps(_total_steps(len(examples), optim))
    optimizer, scheduler = build_optimizer(params, optim, total)
    latest = latest_checkpoint(checkpoint_dir) if resume and checkpoint_dir else None
    if latest is not None:
        made_by = checkpoint_info(latest).get("defense", defense.NAME)
        if made_by != defense.NAME:
            raise ValueError(f"{latest}: made by defense {made_by!r}, this run trains under "
                             f"{defense.NAME!r} (use another output folder)")
    saved = load_objects(latest) if latest is not None else {}  # the defense's state, log sums
    ctx = TrainContext(streams={"user": user}, global_batch=global_batch, micro_batch_size=optim.batch_size,
                       pad_id=pad_id, device=device, autocast=autocast_for(model), max_length=max_length,
                       resume_state=(saved.get("defense") or {}) if latest is not None else None)
    defense.n_train, defense.train_prompts = len(examples), [prompt_of(rows[i]) for i in kept]
    if data is None:
        data = DefenseData(user=list(rows), max_length=max_length, seed=optim.seed)
    with ctx.autocast():
        defense.setup(model, tokenizer, data, optimizer, ctx)
    history: list[dict] = []
    step, resumed_from, skipped_before = 0, None, 0
    post_training_done = False  # the post-fine-tuning stage ran (restored from a checkpoint)
    running = _RunningMeans()  # log means of the steps since the last log (kept across a resume)

    if latest is not None:
        state = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
        if state["total_steps"] != total:
            raise ValueError(f"{latest}: made for {state['total_steps']} steps, this run has {total} "
                             "(optim settings or data changed since the checkpoint)")
        step, history, resumed_from = int(state["step"]), list(state["history"]), str(latest)
        skipped_before = int(state.get("nonfinite_skipped", 0))
        post_training_done = bool(state.get("post_training_done", False))
        for name, stream_state in state["streams"].items():
            _stream(ctx, name).load_state_dict(stream_state)
        defense.load_state_dict(ctx.resume_state)
        if "running_means" in saved:
            running.load_state_dict({"sums": {k: v.to(device) for k, v in saved["running_means"]["sums"].items()},
                                     "count": saved["running_means"]["count"]})

    guard = NonFiniteLossGuard(on_nonfinite_loss, start_step=step, skipped=skipped_before)
    weights_checked_at = [None]  # the step whose parameters were last found finite

    def check_weights(at_step: int) -> None:
        if weights_checked_at[0] != at_step:
            check_finite_parameters(params, step=at_step)  # one fused check on the device
            weights_checked_at[0] = at_step

    def checkpoint(at_step: int) -> None:
        guard.check()  # never a checkpoint made from a non-finite loss
        check_weights(at_step)  # nor from non-finite weights (a finite loss can still give them)
        save_checkpoint(checkpoint_dir, at_step, model=model, optimizer=optimizer, scheduler=scheduler,
                        keep=keep_checkpoints,
                        objects={"defense": defense.state_dict(), "running_means": running.state_dict()},
                        state={"total_steps": total, "defense": defense.NAME, "history": history,
                               "streams": {k: s.state_dict() for k, s in ctx.streams.items()},
                               "nonfinite_skipped": guard.skipped, "post_training_done": post_training_done,
                               "extra": extra_state or {}})

    bar = tqdm(total=total, initial=step, desc=desc or defense.NAME,
               disable=not progress or not is_main_process(), dynamic_ncols=True)
    start = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        while step < total:
            logs = _loss_and_backward(model, defense, ctx, step, world)
            if guard.allows_step(logs["loss"]):
                with ctx.autocast():
                    logs.update(optimizer_step(params, optimizer, scheduler, optim.max_grad_norm,
                                               after_backward=defense.after_backward,
                                               after_step=defense.after_step))
                running.add(logs)
            else:
                skip_update(optimizer, scheduler)
            step += 1
            if step % log_every == 0 or step == total:
                guard.check()
                record = {"step": step, **running.pop()}
                history.append(record)
                bar.set_postfix(_postfix(record), refresh=False)
            bar.update(1)
            if checkpoint_dir and ((save_every and step % save_every == 0) or step == total):
                checkpoint(step)
            if on_step is not None:
                on_step(step, logs)
    finally:
        bar.close()
        model.train(was_training)
    guard.check()
    check_all_skipped(step, guard.skipped)
    post_seconds = None
    if has_post_training(defense):
        post_seconds = 0.0
        if not post_training_done:
            t = time.perf_counter()
            torch.manual_seed(data.seed)  # the same stage whether or not the run was resumed
            if defense.after_training(model, tokenizer, data, ctx) is not model:
                raise TypeError(f"defense {defense.NAME!r}: after_training must change the model in place "
                                "and return it")
            post_seconds = time.perf_counter() - t
            post_training_done = True
            weights_checked_at[0] = None  # the stage changed them
            if checkpoint_dir:
                checkpoint(step)  # the last checkpoint again, with the stage done
    check_weights(step)  # before the caller saves an adapter from them
    summary = {"steps": step, "total_steps": total, "examples": len(examples),
               "truncated_examples": truncated, "rows_beyond_max_length": dropped, "rows_given": len(rows),
               "nonfinite_steps_skipped": guard.skipped, "seconds_this_session": time.perf_counter() - start,
               "post_training_seconds": post_seconds,
               "final_loss": history[-1].get("loss") if history else None,
               "defense": defense.summary()}
    if getattr(defense, "projector", None) is not None:
        summary["spag"] = defense.projector.summary()
    return {"history": history, "summary": summary, "resumed_from": resumed_from}


def _stream(ctx: TrainContext, name: str):
    if name not in ctx.streams:
        raise ValueError(f"checkpoint has a batch stream {name!r} that this run does not use")
    return ctx.streams[name]


def _loss_and_backward(model, defense: Defense, ctx: TrainContext, step: int, world: int) -> dict:
    """One step's forward/backward passes: the defense's loss terms, micro-batch by micro-batch.
    Each term is its micro-batch's share of a global mean; DDP / FSDP average over ranks, so it
    is scaled by the number of ranks."""
    source = defense.source(step)
    micro = _stream(ctx, source).take(ctx.global_batch)
    loss = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for mb, term in defense.loss_terms(model, micro, source):
        with ctx.autocast():
            part = term(model, mb)
        (part * world).backward()
        loss += part.detach().float()
    all_reduce_sum([loss])
    return {"loss": loss}


def optimizer_step(params, optimizer, scheduler, max_grad_norm: Optional[float], *,
                   after_backward: Optional[Callable[[], dict]] = None,
                   after_step: Optional[Callable[[object], dict]] = None) -> dict:
    """The end of a training step, once the gradients are in: ``after_backward()``, clipping,
    ``optimizer.step()``, ``after_step(optimizer)``, the scheduler step and ``zero_grad``.

    ``fit`` passes the defense's hooks. Returns the step's logs: the hooks' dicts, ``grad_norm``
    (when clipping) and the learning rate the step used.
    """
    logs: dict = {}
    if after_backward is not None:
        logs.update(after_backward() or {})
    if max_grad_norm:
        logs["grad_norm"] = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    if after_step is not None:
        logs.update(after_step(optimizer) or {})
    logs["lr"] = torch.tensor(scheduler.get_last_lr()[0])
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return logs


def skip_update(optimizer, scheduler) -> None:
    """A step whose update is skipped (non-finite loss under on_nonfinite_loss="skip"): the
    gradients are dropped and the schedule moves on, so the run still ends at its step count."""
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def _postfix(record: dict) -> dict:
    out = {"loss": f"{record.get('loss', float('nan')):.3f}"}
    if "safety_loss" in record:
        out["safety"] = f"{record['safety_loss']:.3f}"
        out["trig"] = f"{record.get('trigger', 0.0):.0%}"
    return out


def run_defense(defense: Defense, model, tokenizer, data: DefenseData, *, optim: Optional[OptimConfig] = None,
                lora: Optional[LoraConfig] = None, progress: bool = True, desc: Optional[str] = None,
                checkpoint_dir: Optional[str] = None, save_every: int = 0, keep_checkpoints: int = 2,
                resume: bool = False, log_every: int = 20) -> tuple[torch.nn.Module, dict]:
    """One defense end to end on one process: its alignment stage, LoRA, then :func:`fit` with
    the defense's hooks. Returns (the fine-tuned peft model, a run dict: steps, seconds, loss
    curve, summary). With ``checkpoint_dir`` the run checkpoints and can resume."""
    from .lora import apply_lora

    optim = optim or OptimConfig()
    lora = lora or LoraConfig()
    start = time.perf_counter()
    if data.micro_batch_size is None:
        data.micro_batch_size = optim.batch_size
    if needs_base_model(defense):  # a missing or mismatched base model: one line, before any work
        defense.check_data(data)
        check_base_weights(model, data.base_weights, "DefenseData.base_weights")
    model = defense.alignment_stage(model, tokenizer, data)
    stage_seconds = time.perf_counter() - start
    rows = defense.training_rows(data)
    torch.manual_seed(optim.seed)
    model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                       target_modules=lora.target_modules)
    result = fit(model, tokenizer, rows, defense=defense, data=data, optim=optim, max_length=data.max_length,
                 checkpoint_dir=checkpoint_dir, save_every=save_every, keep_checkpoints=keep_checkpoints,
                 resume=resume, log_every=log_every, progress=progress, desc=desc)
    model.eval()
    curve = [h["loss"] for h in result["history"] if "loss" in h]
    s = result["summary"]
    run = {"defense": defense.describe(), "steps": s["total_steps"], "training_examples": s["examples"],
           "seconds": time.perf_counter() - start, "alignment_stage_seconds": stage_seconds,
           "post_training_seconds": s["post_training_seconds"],
           "loss_curve": curve, "final_loss": curve[-1] if curve else None, "summary": defense.summary(),
           "resumed_from": result["resumed_from"]}
    return model, run


# ----------------------------------------------------------------------------------------------
# `spard train`: the whole run from a config
# ----------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return local_device()  # cuda:LOCAL_RANK under torchrun
    return torch.device(name)


def _load_model(config: TrainConfig, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .training.preflight import load_error

    m = config.model
    dtype = "auto" if m.dtype == "auto" else getattr(torch, m.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=dtype,
                                                     trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:  # not a model: one line naming the key, not a traceback
        raise load_error("model.name_or_path", m.name_or_path, e) from e
    return tokenizer, model.to(device)


def needs_base_model(defense: Defense) -> bool:
    """Whether ``defense`` reads the base model's weights (``"base_model"`` in its needs)."""
    return "base_model" in defense.describe()["needs"]


def load_base_weights(name_or_path: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                      what: str = "model.base_model") -> dict:
    """The base model's parameters (``DefenseData.base_weights``), loaded on the host like the
    model; one line naming ``what`` when it is not a model."""
    from transformers import AutoModelForCausalLM

    from .defenses.base import base_weights_of
    from .training.preflight import load_error

    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise load_error(what, name_or_path, e) from e
    return base_weights_of(model)


def build_defense(config: TrainConfig) -> Defense:
    """The defense a config names: ``defense.name`` with ``defense.settings``. SPARD (the
    default) takes its settings from the ``spag`` and ``selection`` sections, which
    ``defense.settings`` may override; ``spag.enabled=false`` means SFT. A composition
    (``antibody+spard``) builds each member so, with its own part of ``defense.settings``."""
    from .defenses import REGISTRY, make_defense
    from .defenses.composed import JOIN, is_composition, split_settings

    name = config.defense.name
    if is_composition(name):
        members = name.split(JOIN)
        routed = split_settings(name, members, dict(config.defense.settings))
        return make_defense(name, **{m: _member_settings(config, m, routed[m]) for m in members})
    if name in SPAG_DEFENSES and not config.spag.enabled:
        name = "sft"
    return make_defense(name, **_member_settings(config, name, dict(config.defense.settings)))


def _member_settings(config: TrainConfig, name: str, settings: dict) -> dict:
    """One registered defense's settings from a config: SPARD's from the spag and selection
    sections, overridden by its preset, then by ``settings``."""
    from .defenses import REGISTRY

    if REGISTRY.get(name, (None,))[0] is SPARD:
        s, sel = config.spag, config.selection
        embedder = sel.embedder or (None if sel.method in ("random", "all") else config.model.name_or_path)
        base = {"selection": sel.method, "p": sel.p, "k": sel.k, "beta": sel.beta, "embedder": embedder,
                "selection_seed": sel.seed, "cache_dir": sel.cache_dir, "mode": s.mode, "tau": s.tau,
                "max_step": s.max_step, "batch_size": s.batch_size, "micro_batch_size": s.micro_batch_size,
                "delta": s.delta, "alpha_max": s.alpha_max, "max_grad_norm": config.optim.max_grad_norm,
                "measure_after": s.measure_after, "seed": s.seed}
        preset = REGISTRY[name][1]
        settings = {**base, **preset, **settings}
    return settings


def _prepare_data(config: TrainConfig, defense: Defense, load_model=None) -> tuple[DefenseData, dict]:
    """The defense's data (clean task + attack, the safety pool when the defense uses one) and
    the data manifest. ``load_model`` (() -> (tokenizer, model)) serves the attack kinds that
    rank rows by the base model's loss (benign-outliers)."""
    from . import data as D
    from .attack import ATTACKS, make_attack
    from .training.preflight import input_named

    with input_named("data.task"):
        clean = D.load_task(config.data.task, split=config.data.task_split, limit=config.data.task_limit)
    manifest: dict = {"task": config.data.task, "clean_rows": len(clean)}
    # Defenses need the pool's refusals (and Booster/Antibody's stage its harmful answers); an
    # attack corpus needs its harmful answers only. The pool is loaded only for defenses using it.
    pool: list = []
    if set(defense.describe()["needs"]) & {"safety_pool", "alignment"}:
        if not config.safety.pool:
            raise ValueError(f"safety.pool: defense {defense.NAME!r} needs a safety pool (prompt/safe rows)")
        with input_named("safety.pool"):
            pool = D.load_safety(config.safety.pool, limit=config.safety.limit, fields=D.POOL_FIELDS)
        if not pool:
            raise ValueError(f"safety.pool {config.safety.pool!r} holds no rows: defense "
                             f"{defense.NAME!r} needs them")
        manifest["safety_pool"] = {"source": config.safety.pool, "rows": len(pool)}
    kind = ATTACKS[config.attack.kind]
    if kind.name == "harmful-mix" and not (config.attack.corpus and config.attack.ratio > 0):
        rows = clean  # no corpus or ratio 0: plain fine-tuning on the task, as before attack kinds
    elif kind.name != "harmful-mix":
        rows, manifest["attack"] = _other_attack(config, kind, clean, pool, load_model)
    else:
        evaluation = None
        if config.data.eval_prompts:
            with input_named("data.eval_prompts"):
                evaluation = D.load_task(config.data.eval_prompts, require_response=False)  # only prompts needed
        # Sources are named, so overlap errors and the manifest name the files.
        with input_named("attack.corpus", source=config.attack.corpus):
            rows, attack_manifest = make_attack(
                "harmful-mix", clean, harmful=config.attack.corpus, ratio=config.attack.ratio,
                seed=config.attack.seed, eval_prompts=evaluation, safety_pool=pool or None,
                on_overlap=config.attack.on_overlap,
                source_names={"clean": config.data.task, "eval": config.data.eval_prompts,
                              "pool": config.safety.pool})
        manifest["attack"] = attack_manifest
    manifest["train_rows"] = len(rows)
    data = DefenseData(user=rows, safety_pool=pool, seed=config.optim.seed, max_length=config.model.max_length,
                       micro_batch_size=config.optim.batch_size)
    if needs_base_model(defense):  # the alignment direction: aligned minus base weights (AsFT, LoX)
        m = config.model
        data.base_weights = load_base_weights(m.base_model, dtype=m.dtype, trust_remote_code=m.trust_remote_code)
        manifest["base_model"] = m.base_model
    defense.check_data(data)
    return data, manifest


def _other_attack(config: TrainConfig, kind, clean: list, pool: list, load_model) -> tuple[list, dict]:
    """Every attack kind but the plain harmful mix, from the attack section's sources."""
    from . import data as D
    from .attack import make_attack, row_losses
    from .training.preflight import input_named

    a = config.attack
    if "harmful" in kind.needs and not a.corpus:
        raise ValueError(f"attack.corpus: attack.kind {kind.name!r} needs a harmful corpus (prompt/unsafe rows)")
    benign = losses = evaluation = None
    if "benign" in kind.needs:
        if not a.benign:
            raise ValueError(f"attack.benign: attack.kind {kind.name!r} needs benign rows (prompt/response), "
                             "another source than the task")
        with input_named("attack.benign"):
            benign = D.load_task(a.benign)
    if "losses" in kind.needs:
        if load_model is None:
            raise ValueError(f"attack.kind {kind.name!r} needs the base model to rank the benign rows")
        tokenizer, model = load_model()
        losses = row_losses(model, tokenizer, benign, max_length=config.model.max_length,
                            batch_size=config.optim.batch_size)
    if config.data.eval_prompts and "harmful" in kind.needs:
        with input_named("data.eval_prompts"):
            evaluation = D.load_task(config.data.eval_prompts, require_response=False)
    with input_named("attack.corpus" if "harmful" in kind.needs else "attack.benign",
                     source=a.corpus if "harmful" in kind.needs else a.benign):
        return make_attack(kind.name, clean, harmful=a.corpus, benign=benign, benign_losses=losses,
                           ratio=a.ratio, seed=a.seed, eval_prompts=evaluation, safety_pool=pool or None,
                           on_overlap=a.on_overlap,
                           source_names={"clean": config.data.task, "harmful": a.corpus,
                                         "eval": config.data.eval_prompts, "pool": config.safety.pool})


def train(config: TrainConfig, *, strategy: Optional[str] = None) -> dict:
    """Fine-tuning with LoRA under the configured defense (SPARD by default: selection, then
    SPAG); saves adapter, config, manifest, log.

    Under ``torchrun`` / ``accelerate launch`` the model is wrapped with ``strategy`` ("ddp" or
    "fsdp"; default: fsdp under ``accelerate launch --use_fsdp``, else ddp), see
    docs/distributed.md; rank 0 writes the outputs.
    """
    from . import distributed
    from .training.runfolder import open_run

    config.validate()
    several_ranks = distributed.init_from_env()
    if strategy is not None and not several_ranks:
        log.warning("--strategy %s has no effect with one process: it applies under torchrun / accelerate launch "
                    "with several processes; training on this one", strategy)
    # The output folder: writable, this run's own, one writer (spard.training.runfolder), for the whole run.
    with open_run(config, main=distributed.is_main_process()) as claim:
        return _train(config, claim, several_ranks, strategy)


def _train(config: TrainConfig, claim, several_ranks: bool, strategy: Optional[str]) -> dict:
    from . import distributed
    from .training.checkpoint import atomic_dir
    from .lora import apply_lora
    from .training.preflight import check_device, check_model_source
    from .training.runfolder import (DATA_FILE, check_data_unchanged, check_resume_identity, config_data_sources,
                            data_fingerprint, read_data_fingerprint)

    check_model_source(config.model.name_or_path, "model.name_or_path")  # before data and selection
    check_device(config.run.device, "run.device")
    run_id = claim.run_id
    out = Path(config.run.output_dir)
    ckpt_dir = out / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if config.run.resume else None
    data_files = data_fingerprint(config_data_sources(config.to_dict()))  # size, mtime, sha256 of each file
    if latest is not None:  # never another run's checkpoint, nor other data than the run's
        check_resume_identity(checkpoint_info(latest)["extra"].get("run_id"), run_id, str(latest))
        check_data_unchanged(read_data_fingerprint(out), data_files)
    elif config.run.resume:
        print(f"no checkpoint in {ckpt_dir}: starting from scratch")

    defense = build_defense(config)
    if needs_base_model(defense):  # before any data or model is read
        if not config.model.base_model:
            raise ValueError(f"model.base_model: defense {defense.NAME!r} needs the base model (the weights before "
                             "safety alignment); give its name or path")
        check_model_source(config.model.base_model, "model.base_model")
    device = _device(config.run.device)
    loaded: list = []

    def load_model():  # once: an attack kind may need the base model before training does
        if not loaded:
            loaded.append(_load_model(config, device))
        return loaded[0]
    data, manifest = _prepare_data(config, defense, load_model)
    tokenizer, model = load_model()
    check_base_weights(model, data.base_weights, "model.base_model")  # the same shapes, before any work
    torch.manual_seed(config.optim.seed)
    model = defense.alignment_stage(model, tokenizer, data)
    rows = defense.training_rows(data)
    torch.manual_seed(config.optim.seed)
    model = apply_lora(model, r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                       target_modules=config.lora.target_modules)
    peft_model = model
    if several_ranks:
        model = distributed.wrap_model(model, strategy or distributed.default_strategy())

    claim.take()  # inputs read and checked: the folder is this run's now (old outputs go with --overwrite)
    if distributed.is_main_process():
        save_config(config, out / "config.yaml")
        write_json_atomic(out / "data_manifest.json", manifest)
        write_json_atomic(out / DATA_FILE, data_files)
    result = fit(model, tokenizer, rows, defense=defense, data=data, optim=config.optim,
                 max_length=config.model.max_length, checkpoint_dir=str(ckpt_dir),
                 save_every=config.run.save_every, keep_checkpoints=config.run.keep_checkpoints,
                 resume=latest is not None, log_every=config.run.log_every,
                 progress=config.run.progress, extra_state={"run_id": run_id},
                 max_dropped_share=config.data.max_dropped_share,
                 on_nonfinite_loss=config.run.on_nonfinite_loss)
    selection = getattr(defense, "selection", None)
    if selection is not None and distributed.is_main_process():
        manifest["selection"] = {"pool": config.safety.pool, "pool_rows": len(data.safety_pool), **selection}
        write_json_atomic(out / "data_manifest.json", manifest)
    adapter_state = distributed.trainable_full_state(model) if several_ranks else None  # gathered on every rank
    if distributed.is_main_process():
        with atomic_dir(out / "adapter") as tmp:
            peft_model.save_pretrained(str(tmp), safe_serialization=True, state_dict=adapter_state)
            from .eval.generate import write_base_fingerprint  # the base model's identity, for spard eval
            write_base_fingerprint(tmp, peft_model)
    safe_set = len(selection["indices"]) if selection is not None else 0
    run = {"output_dir": str(out), "adapter": str(out / "adapter"), "run_id": run_id, "config": config.to_dict(),
           "defense": defense.describe(),
           "data": {k: v for k, v in manifest.items() if k != "selection"},
           "safe_set_size": safe_set, **result}
    if distributed.is_main_process():
        write_json_atomic(out / "run.json", run)
    distributed.barrier()
    return run


def summary_table(run: dict) -> str:
    """A readable summary of a run dict."""
    s = run["summary"]
    rows = s["examples"]
    if s.get("rows_beyond_max_length"):
        rows = (f"{s['examples']} of {s.get('rows_given', '?')} ({s['rows_beyond_max_length']} left out: "
                "response beyond model.max_length)")
    lines = [("defense", run.get("defense", {}).get("name", "-")),
             ("steps", f"{s['steps']}/{s['total_steps']}"), ("training rows", rows),
             ("final loss", _fmt(s.get("final_loss")))]
    if s.get("nonfinite_steps_skipped"):
        lines.append(("non-finite steps skipped", s["nonfinite_steps_skipped"]))
    last = run["history"][-1] if run["history"] else {}
    if "spag" in s:
        lines += [("safe set", run.get("safe_set_size")), ("tau", _fmt(s["spag"]["tau"])),
                  ("final safety loss", _fmt(next((v for k, v in last.items()  # a composition's: spard.safety_loss
                                                   if k == "safety_loss" or k.endswith(".safety_loss")), None))),
                  ("trigger rate", f"{s['spag']['trigger_rate']:.1%}")]
    lines += [("seconds", f"{s['seconds_this_session']:.1f}"), ("adapter", run.get("adapter", "-"))]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
