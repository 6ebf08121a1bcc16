"""AsFT (Yang et al., AAAI 2026): anchoring safety in fine-tuning within the narrow safety basin.

For each LoRA-adapted weight, the alignment direction is ``V = W_aligned - W_base`` and
``Ĉ = V Vᵀ / ||V||_F``. Every step adds, to the task loss, a penalty on the part of each LoRA
update ``ΔW = B A`` that leaves the alignment direction:

    L(θ) = L_task(θ) + λ Σ_layers ||(I - Ĉ) B A||²_F          (λ = 1)

computed as ``||M A||²_F = Σ (MᵀM) ∘ (A Aᵀ)`` with ``M = B - V (Vᵀ B) / ||V||_F``, so no
``d x d`` matrix is formed. Where our reading fills a gap: Ĉ is the paper's and the released
code's ``V Vᵀ / ||V||_F`` (Safe LoRA's alignment matrix, not an exact projector), ΔW is ``B A``
without LoRA's α/r scale as in the released code, and the penalty is added once per optimizer
step (the released code adds it per micro-batch, which with accumulation 1 is the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spard.distributed import full_tensor, get_world_size
from spard.space import Float, require_number

from .base import Defense, token_mean_terms


def lora_modules(model):
    """(plain weight name, LoRA layer) for each LoRA-adapted module of a peft model (under DDP
    too): the plain name is the aligned model's own parameter name (``base_weights``' keys)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            plain = name
            for prefix in ("module.", "base_model.model."):
                plain = plain[len(prefix):] if plain.startswith(prefix) else plain
            out.append((plain + ".weight", module))
    return out


def alignment_penalty(pairs, directions, lam: float) -> torch.Tensor:
    """λ Σ ||(I - V Vᵀ/||V||_F) B A||²_F over (A, B) pairs and directions V (d_out x d_in)."""
    total = torch.zeros(())
    for (a, b), (v, inv_norm) in zip(pairs, directions):
        a, b = full_tensor(a).float(), full_tensor(b).float()  # whole tensors under FSDP (differentiable)
        with torch.autocast(a.device.type, enabled=False):  # fp32 even inside a bf16 forward pass
            m = b - (v.float() @ (v.float().t() @ b)) * inv_norm          # (I - Ĉ) B, d_out x r
            total = total.to(a.device) + ((m.t() @ m) * (a @ a.t())).sum()  # ||M A||²_F
    return lam * total


class AsFT(Defense):
    NAME = "asft"
    STAGE = "fine-tuning"
    NEEDS = ("user", "base_model")
    # Tuning space: a decade either side of the released λ = 1.
    SEARCH_SPACE = {"lam": Float(0.1, 10.0, log=True)}
    AFTER_STEP_EDITS_WEIGHTS = False  # after_step only logs the penalty (spard.defenses.composed)

    @dataclass
    class Settings:
        lam: float = 1.0
        """λ, the weight of the penalty (the released scripts' lambda_reg 1)."""

    def validate(self) -> None:
        require_number("asft lam", self.settings.lam)

    def setup(self, model, tokenizer, data, optimizer, ctx) -> None:
        super().setup(model, tokenizer, data, optimizer, ctx)
        self.check_data(data)
        modules = lora_modules(model)
        if not modules:
            raise ValueError("asft needs a LoRA model: it penalises each LoRA update (B A)")
        self.pairs, self.directions = [], []
        for key, module in modules:
            if key not in data.base_weights:
                raise ValueError(f"base_model: has no parameter {key!r} (a LoRA-adapted weight of the aligned model)")
            aligned = full_tensor(module.base_layer.weight).detach()
            v = aligned.float() - data.base_weights[key].to(aligned.device).float()
            if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores Wᵀ
                v = v.t()
            norm = v.norm()
            # An unchanged weight has no alignment direction: all of its update is penalised.
            self.directions.append((v.contiguous(), 1.0 / norm if norm > 0 else torch.zeros(())))
            self.pairs.append((module.lora_A["default"].weight, module.lora_B["default"].weight))
        self._last = torch.zeros(())

    def penalty(self) -> torch.Tensor:
        return alignment_penalty(self.pairs, self.directions, self.settings.lam)

    def loss_terms(self, model, micro, source):
        terms = token_mean_terms(micro, self.ctx.device)
        first_mb, first = terms[0]
        world = get_world_size()

        def with_penalty(m, mb):
            # Every rank computes the whole penalty from whole tensors and adds 1/W of it; the
            # trainer scales by W: DDP's average and FSDP's shard gradients both give ∇(λ R) once,
            # and the logged loss (summed over ranks) holds it once.
            r = self.penalty()
            self._last = r.detach()
            return first(m, mb) + r / world

        return [(first_mb, with_penalty)] + terms[1:]

    def after_step(self, optimizer) -> dict:
        return {"alignment_penalty": self._last}
