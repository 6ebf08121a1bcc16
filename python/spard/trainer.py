"""A thin fine-tuning loop with SPAG, exact resume, and the `spard train` pipeline.

``fit`` is the loop: utility step (token-weighted loss over the accumulated batch), then
``optimizer_step`` (clipping, optimizer step, ``projector.step()``, the scheduler), which
`spard.defenses.loop.run_defense` shares. ``train(config)`` wraps it:
load data, build the attack, select the safe set, add LoRA, fit, save the adapter and logs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import ResumableOrder, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import OptimConfig, TrainConfig, save_config
from .distributed import (all_reduce_sum, full_tensor, get_world_size, global_count, is_main_process,
                          local_device, rank_share, run_on_main)
from .formatting import collate, pad_id_of
from .guards import NonFiniteLossGuard, check_dropped_rows
from .io import write_json_atomic
from .spag import SafetyProjector, encode_rows, label_token_count, token_loss_sum, trainable_parameters


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

    def pop(self) -> dict[str, float]:
        if not self.count:
            return {}
        keys = list(self.sums)
        values = torch.stack([self.sums[k].reshape(()).cpu() for k in keys]) / self.count
        self.sums, self.count = {}, 0
        return dict(zip(keys, values.tolist()))


def fit(model: torch.nn.Module, tokenizer, rows: Sequence[dict], *, optim: Optional[OptimConfig] = None,
        projector: Optional[SafetyProjector] = None, max_length: int = 512,
        checkpoint_dir: Optional[str] = None, save_every: int = 0, keep_checkpoints: int = 2,
        resume: bool = False, log_every: int = 10, progress: bool = True,
        extra_state: Optional[dict] = None,
        on_step: Optional[Callable[[int, dict], None]] = None,
        max_dropped_share: Optional[float] = None, on_nonfinite_loss: str = "error") -> dict:
    """Fine-tunes the trainable parameters of ``model`` on ``rows`` ({prompt, response}).

    With ``projector`` every optimizer step is followed by a SPAG safety step. With
    ``checkpoint_dir`` a checkpoint is written every ``save_every`` steps and at the end;
    ``resume=True`` continues from the newest one there, giving the same final parameters as an
    uninterrupted run. ``on_step(step, logs)`` runs after each step (and its checkpoint); it may
    raise StopTraining. Returns the run dict: steps, history (logged means), summary.

    Rows whose response lies beyond ``max_length`` are left out with a warning, and the call
    fails when more than ``max_dropped_share`` of them are (None: never). A non-finite loss
    stops the run (``on_nonfinite_loss="error"``) or skips that update ("skip"); see
    `spard.guards`.
    """
    optim = optim or OptimConfig()
    if not rows:
        raise ValueError("rows is empty: nothing to fine-tune on")
    params = trainable_parameters(model)
    device = params[0].device
    examples, kept = encode_rows(rows, tokenizer, max_length, "rows")
    dropped = check_dropped_rows(len(rows), len(kept), what="training rows", max_length=max_length,
                                 max_share=max_dropped_share)
    truncated = sum(e.truncated for e in examples)
    pad_id = pad_id_of(tokenizer)
    total = _total_steps(len(examples), optim)
    optimizer, scheduler = build_optimizer(params, optim, total)
    order = ResumableOrder(len(examples), seed=optim.seed)
    history: list[dict] = []
    step, resumed_from, skipped_before = 0, None, 0

    if resume and checkpoint_dir and (latest := latest_checkpoint(checkpoint_dir)) is not None:
        state = load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
        if state["total_steps"] != total:
            raise ValueError(f"{latest}: made for {state['total_steps']} steps, this run has {total} "
                             "(optim settings or data changed since the checkpoint)")
        step, history, resumed_from = int(state["step"]), list(state["history"]), str(latest)
        skipped_before = int(state.get("nonfinite_skipped", 0))
        order.load_state_dict(state["order"])
        if projector is not None:
            if state.get("projector") is None:
                raise ValueError(f"{latest}: checkpoint has no projector state (it was an SFT run)")
            projector.load_state_dict(state["projector"])

    guard = NonFiniteLossGuard(on_nonfinite_loss, start_step=step, skipped=skipped_before)

    def checkpoint(at_step: int) -> None:
        guard.check()  # never a checkpoint made from a non-finite loss
        save_checkpoint(checkpoint_dir, at_step, model=model, optimizer=optimizer, scheduler=scheduler,
                        keep=keep_checkpoints,
                        state={"total_steps": total, "order": order.state_dict(), "history": history,
                               "projector": projector.state_dict() if projector is not None else None,
                               "nonfinite_skipped": guard.skipped, "extra": extra_state or {}})

    running = _RunningMeans()
    bar = tqdm(total=total, initial=step, desc="spag" if projector is not None else "sft",
               disable=not progress or not is_main_process(), dynamic_ncols=True)
    start = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        while step < total:
            logs = _utility_step(model, params, examples, order, pad_id, optim, device)
            if guard.allows_step(logs["loss"]):
                logs.update(optimizer_step(params, optimizer, scheduler, optim.max_grad_norm,
                                           after_step=projector.step if projector is not None else None))
                running.add(logs)
            else:
                skip_update(optimizer, scheduler)
            step += 1
            if step % log_every == 0 or step == total:
                guard.check()
                record = {"step": step, **running.pop()}
                history.append(record)
                bar.set_postfix(_postfix(record, projector), refresh=False)
            bar.update(1)
            if checkpoint_dir and ((save_every and step % save_every == 0) or step == total):
                checkpoint(step)
            if on_step is not None:
                on_step(step, logs)
    finally:
        bar.close()
        model.train(was_training)
    guard.check()
    summary = {"steps": step, "total_steps": total, "examples": len(examples),
               "truncated_examples": truncated,
               "rows_beyond_max_length": dropped, "rows_given": len(rows),
               "nonfinite_steps_skipped": guard.skipped, "seconds_this_session": time.perf_counter() - start,
               "final_loss": history[-1].get("loss") if history else None}
    if projector is not None:
        summary["spag"] = projector.summary()
    return {"history": history, "summary": summary, "resumed_from": resumed_from}


def _utility_step(model, params, examples, order, pad_id, optim: OptimConfig, device) -> dict:
    """Forward/backward over ``grad_accum`` micro-batches with a token-weighted mean loss."""
    # The global batch (the same on every rank) and this rank's share of it.
    world = get_world_size()
    indices = rank_share(order.take(optim.batch_size * optim.grad_accum * world))
    batches = [collate([examples[i] for i in indices[s:s + optim.batch_size]], pad_id)
               for s in range(0, len(indices), optim.batch_size)]
    total_tokens = global_count(sum(label_token_count(b["labels"]) for b in batches), device).clamp_min(1)
    loss = torch.zeros((), dtype=torch.float32, device=device)
    for b in batches:
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        part = token_loss_sum(model, b) / total_tokens
        (part * world).backward()  # DDP / FSDP average over ranks; part is already a global mean
        loss += part.detach()
    all_reduce_sum([loss])
    return {"loss": loss}


def optimizer_step(params, optimizer, scheduler, max_grad_norm: Optional[float], *,
                   after_backward: Optional[Callable[[], dict]] = None,
                   after_step: Optional[Callable[[object], dict]] = None) -> dict:
    """The end of a training step, once the gradients are in: ``after_backward()``, clipping,
    ``optimizer.step()``, ``after_step(optimizer)``, the scheduler step and ``zero_grad``.

    Shared by ``fit`` (``after_step``: the SPAG projector) and
    `spard.defenses.loop.run_defense` (the defense's hooks). Returns the step's logs: the hooks'
    dicts, ``grad_norm`` (when clipping) and the learning rate the step used.
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


def _postfix(record: dict, projector) -> dict:
    out = {"loss": f"{record.get('loss', float('nan')):.3f}"}
    if projector is not None:
        out["safety"] = f"{record.get('safety_loss', float('nan')):.3f}"
        out["trig"] = f"{record.get('trigger', 0.0):.0%}"
    return out


# ----------------------------------------------------------------------------------------------
# `spard train`: the whole run from a config
# ----------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return local_device()  # cuda:LOCAL_RANK under torchrun
    return torch.device(name)


def _load_model(config: TrainConfig, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .preflight import load_error

    m = config.model
    dtype = "auto" if m.dtype == "auto" else getattr(torch, m.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(m.name_or_path, trust_remote_code=m.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=dtype,
                                                     trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as e:  # not a model: one line naming the key, not a traceback
        raise load_error("model.name_or_path", m.name_or_path, e) from e
    return tokenizer, model.to(device)


def _prepare_data(config: TrainConfig, resume_state: Optional[dict]) -> tuple[list, list, dict]:
    """(training rows, safe rows, manifest): clean task + attack, and the selected safe set."""
    from . import data as D
    from .preflight import input_named

    with input_named("data.task"):
        clean = D.load_task(config.data.task, split=config.data.task_split, limit=config.data.task_limit)
    manifest: dict = {"task": config.data.task, "clean_rows": len(clean)}
    # SPAG needs the pool's refusals only; an attack corpus its harmful answers only.
    pool = None
    if config.spag.enabled:
        with input_named("safety.pool"):
            pool = D.load_safety(config.safety.pool, limit=config.safety.limit, fields=D.POOL_FIELDS)
    if config.attack.corpus and config.attack.ratio > 0:
        evaluation = None
        if config.data.eval_prompts:
            with input_named("data.eval_prompts"):
                evaluation = D.load_task(config.data.eval_prompts, require_response=False)  # only prompts needed
        # Sources are named, so overlap errors and the manifest name the files.
        with input_named("attack.corpus", source=config.attack.corpus):
            rows, attack_manifest = D.build_attack(
                clean, config.attack.corpus, ratio=config.attack.ratio, seed=config.attack.seed,
                eval_prompts=evaluation, safety_pool=pool, on_overlap=config.attack.on_overlap,
                source_names={"clean": config.data.task, "eval": config.data.eval_prompts,
                              "pool": config.safety.pool})
        manifest["attack"] = attack_manifest
    else:
        rows = clean
    manifest["train_rows"] = len(rows)

    safe: list = []
    if config.spag.enabled:
        if not pool:
            raise ValueError(f"safety.pool {config.safety.pool!r} holds no rows: SPAG needs a safe set")
        sel = config.selection
        if resume_state is not None and "selection" in resume_state:
            indices, report = resume_state["selection"]["indices"], resume_state["selection"]["report"]
        elif sel.method == "all":
            indices, report = list(range(len(pool))), {"method": "all"}
        else:
            from .select import select_safe_data
            # The paper embeds with the base LLM itself; any encoder may be named instead.
            embedder = None if sel.method == "random" else (sel.embedder or config.model.name_or_path)
            # Selected once (rank 0) and shared: every rank trains on the same safe set.
            indices, report = run_on_main(select_safe_data, pool, rows, method=sel.method, k=sel.k,
                                          p=sel.p, beta=sel.beta, embedder=embedder, seed=sel.seed,
                                          cache_dir=sel.cache_dir)
        indices = [int(i) for i in indices]
        safe = D.safety_rows([pool[i] for i in indices])
        if not safe:
            raise ValueError("the selected safe set is empty (selection.k / selection.p too small?)")
        manifest["selection"] = {"pool": config.safety.pool, "pool_rows": len(pool),
                                 "indices": indices, "report": report}
    return rows, safe, manifest


def train(config: TrainConfig, *, strategy: Optional[str] = None) -> dict:
    """Selection, then SPAG (or SFT) fine-tuning with LoRA; saves adapter, config, manifest, log.

    Under ``torchrun`` / ``accelerate launch`` the model is wrapped with ``strategy`` ("ddp" or
    "fsdp"; default: fsdp under ``accelerate launch --use_fsdp``, else ddp), see
    docs/distributed.md; rank 0 writes the outputs.
    """
    from . import distributed
    from .runfolder import open_run

    config.validate()
    several_ranks = distributed.init_from_env()
    # The output folder: writable, this run's own, one writer (spard.runfolder), for the whole run.
    with open_run(config, main=distributed.is_main_process()) as claim:
        return _train(config, claim, several_ranks, strategy)


def _train(config: TrainConfig, claim, several_ranks: bool, strategy: Optional[str]) -> dict:
    from . import distributed
    from .checkpoint import atomic_dir
    from .guards import check_dropped_rows
    from .lora import apply_lora
    from .preflight import check_model_source
    from .runfolder import check_resume_identity

    check_model_source(config.model.name_or_path, "model.name_or_path")  # before data and selection
    run_id = claim.run_id
    out = Path(config.run.output_dir)
    ckpt_dir = out / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if config.run.resume else None
    resume_state = None
    if latest is not None:
        import json
        resume_state = json.loads((latest / "state.json").read_text(encoding="utf-8"))["extra"]
        check_resume_identity(resume_state.get("run_id"), run_id, str(latest))  # never another run's
    elif config.run.resume:
        print(f"no checkpoint in {ckpt_dir}: starting from scratch")

    rows, safe, manifest = _prepare_data(config, resume_state)
    device = _device(config.run.device)
    tokenizer, model = _load_model(config, device)
    torch.manual_seed(config.optim.seed)
    model = apply_lora(model, r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                       target_modules=config.lora.target_modules)
    peft_model = model
    if several_ranks:
        model = distributed.wrap_model(model, strategy or distributed.default_strategy())
    projector = None
    if config.spag.enabled:
        s = config.spag
        projector_cls = distributed.DistributedSafetyProjector if several_ranks else SafetyProjector
        projector = projector_cls(model, safe, tokenizer, tau=s.tau, max_step=s.max_step,
                                  batch_size=s.batch_size, micro_batch_size=s.micro_batch_size,
                                  mode=s.mode, delta=s.delta, alpha_max=s.alpha_max,
                                  max_grad_norm=config.optim.max_grad_norm,
                                  max_length=config.model.max_length, measure_after=s.measure_after,
                                  seed=s.seed, progress=config.run.progress)
        check_dropped_rows(len(safe), len(safe) - projector.dropped, what="safe set",
                           max_length=config.model.max_length, max_share=config.data.max_dropped_share)
        if projector.tau is None and latest is None:
            projector.calibrate_tau()  # the base model: LoRA starts as the identity

    claim.take()  # inputs read and checked: the folder is this run's now (old outputs go with --overwrite)
    if distributed.is_main_process():
        save_config(config, out / "config.yaml")
        write_json_atomic(out / "data_manifest.json", manifest)
    extra = {"run_id": run_id, **({"selection": manifest["selection"]} if "selection" in manifest else {})}
    result = fit(model, tokenizer, rows, optim=config.optim, projector=projector,
                 max_length=config.model.max_length, checkpoint_dir=str(ckpt_dir),
                 save_every=config.run.save_every, keep_checkpoints=config.run.keep_checkpoints,
                 resume=latest is not None, log_every=config.run.log_every,
                 progress=config.run.progress, extra_state=extra,
                 max_dropped_share=config.data.max_dropped_share,
                 on_nonfinite_loss=config.run.on_nonfinite_loss)
    adapter_state = distributed.trainable_full_state(model) if several_ranks else None  # gathered on every rank
    if distributed.is_main_process():
        with atomic_dir(out / "adapter") as tmp:
            peft_model.save_pretrained(str(tmp), safe_serialization=True, state_dict=adapter_state)
    run = {"output_dir": str(out), "adapter": str(out / "adapter"), "run_id": run_id, "config": config.to_dict(),
           "data": {k: v for k, v in manifest.items() if k != "selection"},
           "safe_set_size": len(safe), **result}
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
    lines = [("steps", f"{s['steps']}/{s['total_steps']}"), ("training rows", rows),
             ("final loss", _fmt(s.get("final_loss")))]
    if s.get("nonfinite_steps_skipped"):
        lines.append(("non-finite steps skipped", s["nonfinite_steps_skipped"]))
    last = run["history"][-1] if run["history"] else {}
    if "spag" in s:
        lines += [("safe set", run.get("safe_set_size")), ("tau", _fmt(s["spag"]["tau"])),
                  ("final safety loss", _fmt(last.get("safety_loss"))),
                  ("trigger rate", f"{s['spag']['trigger_rate']:.1%}")]
    lines += [("seconds", f"{s['seconds_this_session']:.1f}"), ("adapter", run.get("adapter", "-"))]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"
