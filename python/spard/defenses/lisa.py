"""Lisa (Huang et al., NeurIPS 2024): bi-state optimisation. Each cycle runs
``alignment_steps`` steps on alignment data then ``finetune_steps`` steps on user data; every
step adds the proximal term ρ/2 ||θ - θ̃||², θ̃ = the parameters at the end of the other phase
(before the first switch: the starting point)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spard.distributed import get_world_size, is_sharded, local_tensor
from spard.space import Float, Scale, require_int, require_number

from .base import Defense, token_mean_terms


class Lisa(Defense):
    NAME = "lisa"
    STAGE = "fine-tuning"
    NEEDS = ("user", "alignment")
    # Tuning space: ρ over the decades Lisa's sweep covers, and the alignment phase from a quarter
    # to four times its length (a multiple of the run's own setting: phases are counted in steps).
    SEARCH_SPACE = {"rho": Float(0.01, 10.0, log=True), "alignment_steps": Scale(0.25, 4.0)}
    AFTER_STEP_EDITS_WEIGHTS = False  # after_step only logs the phase (spard.defenses.composed)

    @dataclass
    class Settings:
        alignment_steps: int = 100
        """Steps of the alignment phase in each cycle (paper: 100 of every 1000)."""
        finetune_steps: int = 900
        """Steps of the user phase in each cycle (paper: 900)."""
        rho: float = 1.0
        """Weight of the proximal term."""

    def validate(self) -> None:
        s = self.settings
        require_int("lisa alignment_steps", s.alignment_steps, 0)
        require_int("lisa finetune_steps", s.finetune_steps, 1)
        require_number("lisa rho", s.rho)

    def total_steps(self, user_steps: int) -> int:
        # The user phase keeps all of SFT's user steps; the alignment phases come on top.
        s = self.settings
        cycles = -(-user_steps // s.finetune_steps)
        return user_steps + s.alignment_steps * cycles

    def setup(self, model, tokenizer, data, optimizer, ctx) -> None:
        super().setup(model, tokenizer, data, optimizer, ctx)
        self.check_data(data)
        # Lisa's alignment phase is micro-batched like the user phase (same effective batch).
        ctx.streams["alignment"] = ctx.stream(data.alignment, tokenizer, seed=data.seed + 5,
                                              what="alignment rows")
        self.anchor = self._snapshot()
        self.phase = None

    def _snapshot(self) -> list[torch.Tensor]:
        # Local shards under FSDP: the proximal term is a sum of per-shard sums.
        return [local_tensor(p).detach().clone() for p in self.params]

    def source(self, step: int) -> str:
        s = self.settings
        phase = "alignment" if step % (s.alignment_steps + s.finetune_steps) < s.alignment_steps else "user"
        if phase != self.phase:
            if self.phase is not None:  # θ̃ = the end point of the phase that just finished
                self.anchor = self._snapshot()
            self.phase = phase
        return phase

    def proximal(self) -> torch.Tensor:
        return 0.5 * self.settings.rho * sum((local_tensor(p).float() - a.float()).pow(2).sum()
                                             for p, a in zip(self.params, self.anchor))

    def loss_terms(self, model, micro, source):
        terms = token_mean_terms(micro, self.ctx.device)
        first_mb, first = terms[0]
        world = get_world_size()

        sharded = any(is_sharded(p) for p in self.params)

        def with_proximal(m, mb):
            # Gradients: each rank adds 1/W of its term and the trainer scales by W. Replicated
            # (DDP): the ranks' average gives ∇ ρ/2 ||θ - θ̃||² once. Sharded (FSDP): each rank's
            # term covers its shard only, and shard gradients are not averaged. The logged value
            # (summed over ranks) must be the whole term in both cases.
            prox = self.proximal()
            share = prox / world
            if sharded:
                share = share + (prox - share).detach()
            return first(m, mb) + share

        return [(first_mb, with_proximal)] + terms[1:]

    def after_step(self, optimizer) -> dict:
        return {"alignment_phase": torch.tensor(float(self.phase == "alignment"))}

    def state_dict(self) -> dict:
        return {"phase": self.phase, "anchor": list(self.anchor)}

    def load_state_dict(self, state: dict) -> None:
        self.phase = state["phase"]
        with torch.no_grad():
            for a, saved in zip(self.anchor, state["anchor"]):
                a.copy_(saved)
