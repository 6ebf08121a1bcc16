"""SPARD: a safe set chosen by RD-DPP from the safety pool (spard.select), then SPAG after every
optimizer step (spard.spag.SafetyProjector). Paper mode and the released-code mode, and the
ablations: random selection instead of RD-DPP, and the trust-region cap η_safe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .base import Defense


class SPARD(Defense):
    NAME = "spard"
    STAGE = "fine-tuning"
    NEEDS = ("user", "safety_pool")

    @dataclass
    class Settings:
        selection: str = "rd-dpp"
        """rd-dpp | random | relevance | all."""
        p: float = 0.03
        """Safe-set size as a share of the user's data (k = floor(p · |D_ft|))."""
        k: Optional[int] = None
        beta: float = 4.0
        embedder: Optional[str] = None
        """None: the base model itself (mean-pooled hidden states, the paper's choice)."""
        mode: str = "paper"
        """paper | official."""
        tau: Optional[float] = None
        """None: calibrated on the safe set with the aligned model."""
        max_step: Optional[Union[float, str]] = None
        """η_safe: None (no cap), a number, or "lr" (the paper's η_safe = η_ft)."""
        batch_size: int = 4
        delta: float = 0.1
        alpha_max: float = 1.0

    def validate(self) -> None:
        s = self.settings
        if s.selection not in ("rd-dpp", "random", "relevance", "all"):
            raise ValueError(f"spard selection must be rd-dpp, random, relevance or all, got {s.selection!r}")
        if s.mode not in ("paper", "official"):
            raise ValueError(f"spard mode must be 'paper' or 'official', got {s.mode!r}")

    def select(self, model, tokenizer, data) -> list[dict]:
        from spard.data import safety_rows
        from spard.embed import HFEmbedder
        from spard.select import select_safe_data, subset_size

        s = self.settings
        pool = data.safety_pool
        if s.selection == "all":
            indices, report = list(range(len(pool))), {"method": "all"}
        else:
            embedder = None
            if s.selection != "random":
                embedder = s.embedder or HFEmbedder(model, tokenizer, progress=False,
                                                    max_length=data.max_length)
            # k = floor(p · |D_ft|) exactly as `spard select` computes it (0.29 · 100 is 29, not 28)
            k = s.k if s.k is not None else subset_size(s.p, len(data.user))
            indices, report = select_safe_data(pool, data.user, method=s.selection, k=min(k, len(pool)),
                                               beta=s.beta, embedder=embedder, seed=data.seed)
        self.selection_report = {"k": len(indices), "method": report.get("method"),
                                 "logdet": report.get("logdet"), "relevance": report.get("relevance")}
        return safety_rows([pool[i] for i in indices])

    def setup(self, model, tokenizer, data, optimizer) -> None:
        from spard.spag import SafetyProjector

        super().setup(model, tokenizer, data, optimizer)
        self.check_data(data)
        s = self.settings
        safe = self.select(model, tokenizer, data)  # LoRA is the identity here: base-model embeddings
        self.projector = SafetyProjector(model, safe, tokenizer, tau=s.tau, max_step=s.max_step,
                                         batch_size=s.batch_size, mode=s.mode, delta=s.delta,
                                         alpha_max=s.alpha_max, max_length=data.max_length,
                                         optimizer=optimizer, seed=data.seed, progress=False)
        if self.projector.tau is None:
            self.projector.calibrate_tau()

    def after_step(self, optimizer) -> dict:
        return self.projector.step(optimizer)

    def summary(self) -> dict:
        return {"selection": self.selection_report, "spag": self.projector.summary()}
