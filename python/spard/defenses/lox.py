"""LoX (Perin et al., COLM 2025): low-rank extrapolation of the safety subspace, before
fine-tuning and without training.

For every weight matrix W of the aligned model, with ``ΔW_align = W_aligned - W_base`` and its
SVD ``U S Vᵀ``:

    W  <-  W + α · U_k S_k V_kᵀ                 (k = 6, α = 1.25)

i.e. the aligned model is moved further along the top-k singular subspace of its own alignment
(``k = 0``: the whole ΔW_align). k and α are the paper's main setting (Llama-2-7B aligned on
65.6k examples; k is the "effective rank" it measures per model, 3 for its other models). Fine-tuning then starts from the extrapolated weights. Where our
reading fills a gap: "every weight matrix" is every 2-D weight of the model but the token
embeddings and the output head (which the paper does not discuss), and the SVD runs in fp32
whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spard.space import Float, Int, require_int, require_number

from .base import Defense


def low_rank(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The rank-k truncation U_k S_k V_kᵀ of ``delta`` (fp32; ``k = 0`` or k >= rank: ``delta``)."""
    d = delta.float()
    if k == 0 or k >= min(d.shape):
        return d
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def extrapolated_names(model) -> list[str]:
    """The weights LoX edits: every 2-D parameter but the embeddings and the output head."""
    skip = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and getattr(module, "weight", None) is not None:
            skip.add(id(module.weight))
    return [n for n, p in model.named_parameters() if p.dim() == 2 and id(p) not in skip]


class LoX(Defense):
    NAME = "lox"
    STAGE = "alignment"
    NEEDS = ("user", "base_model")
    # Tuning space: the extrapolation factor and the rank around the paper's α = 1.25, k = 6.
    SEARCH_SPACE = {"alpha": Float(0.25, 2.5, log=True), "k": Int(1, 64, log=True)}

    @dataclass
    class Settings:
        k: int = 6
        """Singular directions extrapolated per matrix (0: the whole alignment update)."""
        alpha: float = 1.25
        """α, the extrapolation factor."""

    def validate(self) -> None:
        s = self.settings
        require_int("lox k", s.k, 0, " (0: full rank)")
        require_number("lox alpha", s.alpha)

    @torch.no_grad()
    def alignment_stage(self, model, tokenizer, data):
        self.check_data(data)
        s = self.settings
        params = dict(model.named_parameters())
        names = extrapolated_names(model)
        missing = [n for n in names if n not in data.base_weights]
        if missing:
            raise ValueError(f"base_model: has no parameter {missing[0]!r} of the aligned model")
        moved, rel = 0, []
        for name in names:
            w = params[name]
            delta = w.float() - data.base_weights[name].to(w.device).float()
            if not delta.any():
                continue  # not changed by alignment: nothing to extrapolate
            step = s.alpha * low_rank(delta, s.k)
            rel.append(float(step.norm() / w.float().norm().clamp_min(1e-12)))
            w.copy_((w.float() + step).to(w.dtype))
            moved += 1
        self.stage_log = {"matrices": moved, "of": len(names),
                          "mean_relative_change": sum(rel) / len(rel) if rel else 0.0}
        return model

    def summary(self) -> dict:
        return dict(getattr(self, "stage_log", {}))
