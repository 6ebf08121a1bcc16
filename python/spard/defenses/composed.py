"""Composed defenses: several defenses in one training run (``antibody+spard``).

The rules, in full:

1. Members are registered defense names joined by ``+``, each at most once; settings go to one
   member each, as a mapping under its name (``{"spard": {"p": 0.05}}``, the config's
   ``defense.spard.p=0.05``) or a dotted key (``"spard.p"``; a dotted key overrides the mapping's
   value for the same setting). A setting for a name that is not a member is refused.
2. Every hook calls every member that implements it, in the order the composition names them
   (``antibody+spard``: antibody's, then spard's); a hook that returns a model passes it on to the
   next member. Members' step logs, summaries, search spaces and checkpoint state are namespaced
   by their names (``spard.safety_loss``, ``{"spard": ...}``, ``spard.p``).
3. Each kind of change to what the members share has at most one owner; two members that would
   both own one conflict and are refused before any work, one line naming both:

   ========== ======================================================== ==========================
   owns       because the member                                       why two cannot share it
   ========== ======================================================== ==========================
   loss       overrides ``loss_terms`` (Antibody, BDS, Lisa, AsFT)      one step has one objective
   schedule   overrides ``total_steps`` or ``source`` (Lisa's phases)   one step count, one source
   rows       overrides ``training_rows`` (SafeInstr)                   each builds on the user set
   alignment  has an alignment stage (Booster, antibody-align, LoX)     each replaces the model and
                                                                        is defined on the aligned one
   gradients  overrides ``after_backward`` (SafeGrad, Panacea)          edits do not commute
   weights    edits the weights in ``after_step`` (SPARD's SPAG)        projections do not commute
   repair     has a post-fine-tuning stage (``after_training``)         each repairs the fine-tuned
                                                                        model, not another repair
   ========== ======================================================== ==========================

   A member whose ``after_step`` only steps its own state or logs (BDS's scheduler, Antibody's
   entropy, Lisa's phase, AsFT's penalty) says so with ``AFTER_STEP_EDITS_WEIGHTS = False``;
   without it an overridden ``after_step`` counts as editing the weights.

With one owner per kind, at most one member changes the model, its gradients, the batches or
the loss in any hook, so the members' order changes the result only through the global random
stream (dropout in their extra forward passes) and the order of the logs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from .base import Defense, DefenseData, TrainContext, token_mean_terms

JOIN = "+"

# (kind of ownership, what the one-line refusal says both members do)
KINDS = {
    "loss": "own the step's loss (loss_terms)",
    "schedule": "change the step count or the batch source (total_steps / source)",
    "rows": "change the training rows (training_rows)",
    "alignment": "replace the model in an alignment stage",
    "gradients": "edit the gradients after the backward pass (after_backward)",
    "weights": "edit the weights after the optimizer step (after_step)",
    "repair": "repair the model after fine-tuning (after_training)",
}


def is_composition(name) -> bool:
    return isinstance(name, str) and JOIN in name


def _overrides(member: Defense, hook: str) -> bool:
    return getattr(type(member), hook) is not getattr(Defense, hook)


def owned_kinds(member: Defense) -> list[str]:
    """The kinds of shared change ``member`` owns (rule 3)."""
    owns = {
        "loss": _overrides(member, "loss_terms"),
        "schedule": _overrides(member, "total_steps") or _overrides(member, "source"),
        "rows": _overrides(member, "training_rows"),
        # Antibody overrides the stage but runs it only with alignment_stage=True (its describe says so).
        "alignment": (_overrides(member, "alignment_stage")
                      and member.describe()["stage"] in ("alignment", "both")),
        "gradients": _overrides(member, "after_backward"),
        "weights": _overrides(member, "after_step") and getattr(member, "AFTER_STEP_EDITS_WEIGHTS", True),
        "repair": _overrides(member, "after_training"),
    }
    return [k for k, v in owns.items() if v]


def split_settings(name: str, members: Sequence[str], settings: dict) -> dict[str, dict]:
    """Routes a composition's settings to its members (rule 1): {member: its settings}."""
    routed: dict[str, dict] = {m: {} for m in members}
    dotted = []
    for key, value in settings.items():
        head, dot, rest = str(key).partition(".")
        if head not in routed:
            raise ValueError(f"defense {name!r}: settings for {head!r}, which is not a member "
                             f"(members: {', '.join(members)}); give them as MEMBER.SETTING")
        if dot:
            dotted.append((head, rest, value))
        elif not isinstance(value, dict):
            raise ValueError(f"defense {name!r}: the settings of member {head!r} must be a mapping "
                             f"setting -> value, got {value!r}")
        else:
            routed[head].update(value)
    for head, rest, value in dotted:  # a dotted key is the more specific one: it wins
        routed[head][rest] = value
    return routed


class Composed(Defense):
    """Several defenses as one (see the module's rules). ``members``: built defenses, each
    named by its registry name (``NAME``)."""

    NAME = "composed"

    def __init__(self, members: Sequence[Defense]):
        self.members = list(members)
        names = [m.NAME for m in self.members]
        self.NAME = JOIN.join(names)
        if len(self.members) < 2:
            raise ValueError(f"defense {self.NAME!r}: a composition needs at least two members")
        seen = set()
        for n in names:
            if n in seen:
                raise ValueError(f"defense {self.NAME!r}: member {n!r} is named twice")
            seen.add(n)
        self.owner: dict[str, Defense] = {}
        for m in self.members:  # rule 3: one owner per kind
            for kind in owned_kinds(m):
                if kind in self.owner:
                    raise ValueError(f"defense {self.NAME!r}: {self.owner[kind].NAME} and {m.NAME} conflict: both "
                                     f"{KINDS[kind]}; compose at most one of them")
                self.owner[kind] = m
        self.settings = self.Settings()
        self.NEEDS = tuple(dict.fromkeys(k for m in self.members for k in m.NEEDS))
        stages = list(dict.fromkeys(m.describe()["stage"] for m in self.members))
        self.STAGE = (stages[0] if len(stages) == 1 else
                      "both" if set(stages) <= {"alignment", "fine-tuning", "both"} else JOIN.join(stages))
        self.SEARCH_SPACE = {f"{m.NAME}.{k}": p for m in self.members for k, p in m.SEARCH_SPACE.items()}

    @property
    def logs(self) -> dict:
        return {f"{m.NAME}.{k}": v for m in self.members for k, v in m.logs.items()}

    def flat_settings(self) -> dict:
        """Every member's settings as ``member.setting`` -> value (the search space's names)."""
        return {f"{m.NAME}.{k}": v for m in self.members for k, v in dataclasses.asdict(m.settings).items()}

    def describe(self) -> dict:
        parts = [m.describe() for m in self.members]
        return {"name": self.NAME, "stage": self.STAGE,
                "needs": list(dict.fromkeys(k for p in parts for k in p["needs"])),
                "settings": {p["name"]: p["settings"] for p in parts}, "members": parts}

    def needs_harmful_answers(self) -> bool:
        return any(m.needs_harmful_answers() for m in self.members)

    def check_data(self, data: DefenseData) -> None:
        for m in self.members:
            m.check_data(data)

    # -- hooks: every member in order; the owner alone where one owns the hook -----------------
    def alignment_stage(self, model, tokenizer, data: DefenseData):
        for m in self.members:
            model = m.alignment_stage(model, tokenizer, data)
        return model

    def training_rows(self, data: DefenseData) -> list[dict]:
        return self.owner["rows"].training_rows(data) if "rows" in self.owner else list(data.user)

    def _ctx_of(self, member: Defense, ctx: Optional[TrainContext]) -> Optional[TrainContext]:
        """The trainer's context with the member's own part of the resumed state (the batch
        streams stay shared, so a stream a member adds is checkpointed with the run's)."""
        if ctx is None or ctx.resume_state is None:
            return ctx
        return dataclasses.replace(ctx, resume_state=ctx.resume_state.get(member.NAME) or {})

    def setup(self, model, tokenizer, data: DefenseData, optimizer, ctx: TrainContext) -> None:
        super().setup(model, tokenizer, data, optimizer, ctx)
        for m in self.members:
            m.n_train, m.train_prompts = self.n_train, self.train_prompts
            before = dict(ctx.streams)
            m.setup(model, tokenizer, data, optimizer, self._ctx_of(m, ctx))
            replaced = [k for k, s in before.items() if ctx.streams.get(k) is not s]
            if replaced:
                raise ValueError(f"defense {self.NAME!r}: {m.NAME} replaces the batch stream {replaced[0]!r} "
                                 "another member uses")

    def total_steps(self, user_steps: int) -> int:
        return self.owner["schedule"].total_steps(user_steps) if "schedule" in self.owner else user_steps

    def source(self, step: int) -> str:
        return self.owner["schedule"].source(step) if "schedule" in self.owner else "user"

    def loss_terms(self, model, micro, source):
        if "loss" in self.owner:
            return self.owner["loss"].loss_terms(model, micro, source)
        return token_mean_terms(micro, self.ctx.device)

    def after_backward(self) -> dict:
        return {f"{m.NAME}.{k}": v for m in self.members for k, v in (m.after_backward() or {}).items()}

    def after_step(self, optimizer) -> dict:
        return {f"{m.NAME}.{k}": v for m in self.members for k, v in (m.after_step(optimizer) or {}).items()}

    def after_training(self, model, tokenizer, data: DefenseData, ctx: TrainContext):
        for m in self.members:
            model = m.after_training(model, tokenizer, data, self._ctx_of(m, ctx))
        return model

    def state_dict(self) -> dict:
        return {m.NAME: m.state_dict() for m in self.members}

    def load_state_dict(self, state: dict) -> None:
        state = state or {}
        unknown = sorted(set(state) - {m.NAME for m in self.members})
        if unknown:
            raise ValueError(f"defense {self.NAME!r}: checkpoint state of {unknown}, which are not members")
        for m in self.members:
            m.load_state_dict(state.get(m.NAME) or {})

    def summary(self) -> dict:
        return {m.NAME: m.summary() for m in self.members}

    # What the trainer reads off SPARD (the SPAG summary, the selection for the manifest).
    @property
    def projector(self):
        return next((p for m in self.members if (p := getattr(m, "projector", None)) is not None), None)

    @property
    def selection(self):
        return next((s for m in self.members if (s := getattr(m, "selection", None)) is not None), None)


__all__ = ["Composed", "JOIN", "KINDS", "is_composition", "owned_kinds", "split_settings"]
