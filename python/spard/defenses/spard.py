"""SPARD: a safe set chosen by RD-DPP from the safety pool (spard.select), then SPAG after every
optimizer step (spard.spag.SafetyProjector). Paper mode and the released-code mode, and the
ablations: every other selection method instead of RD-DPP (spard-random, spard-relevance,
spard-dpp, spard-k-center, spard-behavior-aware), and the trust-region cap η_safe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from spard.distributed import is_distributed, run_on_main, unwrap
from spard.space import Choice, Float, require_number
from spard.spag_distributed import DistributedSafetyProjector

from .base import Defense

# Every selection method of spard.selectors but RD-DPP, as a SPARD ablation "spard-<method>":
# the same SPAG, another safe set. Kept equal to spard.selectors.METHODS (a test checks it) so
# the registry needs no torch-heavy import.
SELECTION_METHODS = ("rd-dpp", "random", "relevance", "dpp", "k-center", "behavior-aware")
SELECTION_ABLATIONS = {f"spard-{m}": {"selection": m} for m in SELECTION_METHODS if m != "rd-dpp"}


class SPARD(Defense):
    NAME = "spard"
    STAGE = "fine-tuning"
    NEEDS = ("user", "safety_pool")
    # Tuning space: the safe-set share p and RD-DPP's β around the paper's 0.03 and 4, the
    # threshold τ as a multiple of its calibrated value, and the trust-region cap (none, or the
    # paper's η_safe = η_ft). Our reading: the paper sweeps k and β; the τ range is ours.
    SEARCH_SPACE = {"p": Float(0.01, 0.10), "beta": Float(1.0, 16.0, log=True),
                    "tau_scale": Float(0.5, 2.0, log=True), "max_step": Choice((None, "lr"))}

    @dataclass
    class Settings:
        selection: str = "rd-dpp"
        """rd-dpp | random | relevance | dpp | k-center | behavior-aware | all (spard.selectors)."""
        p: float = 0.03
        """Safe-set size as a share of the user's data (k = floor(p · |D_ft|))."""
        k: Optional[int] = None
        beta: float = 4.0
        embedder: Optional[str] = None
        """None: the base model itself (mean-pooled hidden states, the paper's choice)."""
        selection_seed: Optional[int] = None
        """Seed of the random selection (None: the run's seed)."""
        cache_dir: Optional[str] = None
        """Embedding cache folder for the selection."""
        mode: str = "paper"
        """paper | official."""
        tau: Optional[float] = None
        """None: calibrated on the safe set with the aligned model."""
        tau_scale: float = 1.0
        """τ used = tau_scale × (``tau`` or the calibrated value): the tuning knob."""
        max_step: Optional[Union[float, str]] = None
        """η_safe: None (no cap), a number, or "lr" (the paper's η_safe = η_ft)."""
        batch_size: int = 4
        micro_batch_size: Optional[int] = None
        """Safety samples per forward pass (None: the fine-tuning micro-batch size)."""
        delta: float = 0.1
        alpha_max: float = 1.0
        max_grad_norm: Optional[float] = 1.0
        """Clipping of the safety gradient in the official mode."""
        measure_after: bool = False
        seed: Optional[int] = None
        """Seed of the safety-batch order (None: the run's seed)."""

    def validate(self) -> None:
        s = self.settings
        if s.selection not in (*SELECTION_METHODS, "all"):
            raise ValueError(f"spard selection must be one of {', '.join(SELECTION_METHODS)} or all, "
                             f"got {s.selection!r}")
        if s.mode not in ("paper", "official"):
            raise ValueError(f"spard mode must be 'paper' or 'official', got {s.mode!r}")
        require_number("spard tau_scale", s.tau_scale, low_open=True)

    def check_data(self, data) -> None:
        super().check_data(data)
        k = self.settings.k
        if k is not None and data.safety_pool and k > len(data.safety_pool):
            raise ValueError(f"selection.k: {k} exceeds the pool size {len(data.safety_pool)}")

    def select(self, model, tokenizer, data) -> tuple[list[int], dict]:
        from spard.embed import HFEmbedder
        from spard.select import select_safe_data, subset_size

        s = self.settings
        pool = data.safety_pool
        if s.selection == "all":
            return list(range(len(pool))), {"method": "all", "k": len(pool)}
        embedder = None
        if s.selection != "random":  # every other method reads the prompts' embeddings
            if s.embedder is None and is_distributed():
                raise ValueError("spard on several processes: name the selection's embedder "
                                 "(the base model's path) so rank 0 can load its own copy")
            embedder = s.embedder or HFEmbedder(unwrap(model), tokenizer, progress=False,
                                                max_length=data.max_length)
        # k = floor(p · |D_ft|) exactly as `spard select` computes it (0.29 · 100 is 29, not 28),
        # at most the pool; a k given explicitly must fit the pool (select_safe_data says so).
        k = s.k if s.k is not None else min(subset_size(s.p, len(data.user)), len(pool))
        seed = data.seed if s.selection_seed is None else s.selection_seed
        # Selected once (rank 0) and shared: every rank trains on the same safe set.
        return run_on_main(select_safe_data, pool, data.user, method=s.selection, k=k,
                           beta=s.beta, embedder=embedder, seed=seed, cache_dir=s.cache_dir)

    def setup(self, model, tokenizer, data, optimizer, ctx) -> None:
        from spard.data import safety_rows

        super().setup(model, tokenizer, data, optimizer, ctx)
        self.check_data(data)
        s = self.settings
        saved = ctx.resume_state or {}
        if "selection" in saved:  # a resumed run keeps the safe set it started with
            indices, report = saved["selection"]["indices"], saved["selection"]["report"]
        else:
            indices, report = self.select(model, tokenizer, data)  # LoRA is the identity here
        self.selection = {"indices": [int(i) for i in indices], "report": report}
        self.selection_report = {"k": len(indices), "method": report.get("method"),
                                 "logdet": report.get("logdet"), "relevance": report.get("relevance"),
                                 "quality": report.get("quality")}
        safe = safety_rows([data.safety_pool[i] for i in self.selection["indices"]])
        if not safe:
            raise ValueError("the selected safe set is empty (spard k / p too small?)")
        self.projector = DistributedSafetyProjector(
            model, safe, tokenizer, tau=s.tau, max_step=s.max_step, batch_size=s.batch_size,
            micro_batch_size=s.micro_batch_size or min(s.batch_size, ctx.micro_batch_size),
            mode=s.mode, delta=s.delta, alpha_max=s.alpha_max, max_grad_norm=s.max_grad_norm,
            max_length=data.max_length, optimizer=optimizer, measure_after=s.measure_after,
            seed=data.seed if s.seed is None else s.seed, progress=False)
        if "projector" not in saved:  # a resumed run gets τ from load_state_dict
            if self.projector.tau is None:
                self.projector.calibrate_tau()
            self.projector.tau *= float(s.tau_scale)

    def after_step(self, optimizer) -> dict:
        return self.projector.step(optimizer)

    def summary(self) -> dict:
        return {"selection": self.selection_report, "spag": self.projector.summary()}

    def state_dict(self) -> dict:
        return {"selection": self.selection, "projector": self.projector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.projector.load_state_dict(state["projector"])


class ProjectorDefense(Defense):
    """SPAG with a projector the caller built (``fit(..., projector=...)``): no selection."""

    NAME = "spag"
    NEEDS = ("user",)

    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def after_step(self, optimizer) -> dict:
        return self.projector.step(optimizer)

    def summary(self) -> dict:
        return {"spag": self.projector.summary()}

    def state_dict(self) -> dict:
        return {"projector": self.projector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "projector" not in state:
            raise ValueError("checkpoint has no projector state (it was not a SPAG run)")
        self.projector.load_state_dict(state["projector"])
