"""Lisa (Huang et al., NeurIPS 2024): bi-state optimisation. Each cycle runs
``alignment_steps`` steps on alignment data then ``finetune_steps`` steps on user data; every
step adds the proximal term ρ/2 ||θ - θ̃||², θ̃ = the parameters at the end of the other phase
(before the first switch: the starting point)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Defense, mean_token_loss


class Lisa(Defense):
    NAME = "lisa"
    STAGE = "fine-tuning"
    NEEDS = ("user", "alignment")

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
        for name in ("alignment_steps", "finetune_steps"):
            v = getattr(s, name)
            if not isinstance(v, int) or v < (1 if name == "finetune_steps" else 0):
                raise ValueError(f"lisa {name} must be an int >= {1 if name == 'finetune_steps' else 0}, got {v!r}")
        if not s.rho >= 0:
            raise ValueError(f"lisa rho must be >= 0, got {s.rho!r}")

    def total_steps(self, user_steps: int) -> int:
        # The user phase keeps all of SFT's user steps; the alignment phases come on top.
        s = self.settings
        cycles = -(-user_steps // s.finetune_steps)
        return user_steps + s.alignment_steps * cycles

    def setup(self, model, tokenizer, data, optimizer) -> None:
        super().setup(model, tokenizer, data, optimizer)
        self.check_data(data)
        self.anchor = [p.detach().clone() for p in self.params]
        self.phase = None

    def source(self, step: int) -> str:
        s = self.settings
        phase = "alignment" if step % (s.alignment_steps + s.finetune_steps) < s.alignment_steps else "user"
        if phase != self.phase:
            if self.phase is not None:  # θ̃ = the end point of the phase that just finished
                self.anchor = [p.detach().clone() for p in self.params]
            self.phase = phase
        return phase

    def proximal(self) -> torch.Tensor:
        return 0.5 * self.settings.rho * sum((p.float() - a.float()).pow(2).sum()
                                             for p, a in zip(self.params, self.anchor))

    def loss(self, model, batch, indices, source):
        return mean_token_loss(model, batch) + self.proximal()
