"""LoRA through peft, with the defaults of docs/algorithms.md (r 32, alpha 8, dropout 0.05,
attention projections q, k, v, o)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .training.precision import upcast_trainable

DEFAULT_R = 32
DEFAULT_ALPHA = 8
DEFAULT_DROPOUT = 0.05

# The attention projections (q, k, v, o) under the names different model families use.
_ATTENTION_FAMILIES: list[list[str]] = [
    ["q_proj", "k_proj", "v_proj", "o_proj"],   # Llama, Qwen2, Mistral, Gemma, ...
    ["c_attn", "attn.c_proj"],                   # GPT-2 (fused qkv + output)
    ["query_key_value", "attention.dense"],      # GPT-NeoX, Pythia
    ["Wqkv", "out_proj"],                        # MPT-style fused attention
]


def attention_targets(model: torch.nn.Module) -> list[str]:
    """The first family of attention projection names the model has all of."""
    names = [n for n, _ in model.named_modules()]
    for family in _ATTENTION_FAMILIES:
        if all(any(n == t or n.endswith("." + t) for n in names) for t in family):
            return list(family)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in known:
        return list(known[model_type])
    raise ValueError(f"cannot find attention projections in this model (model_type={model_type!r}): "
                     "set lora.target_modules explicitly")


def apply_lora(model: torch.nn.Module, *, r: int = DEFAULT_R, alpha: float = DEFAULT_ALPHA,
               dropout: float = DEFAULT_DROPOUT, target_modules: Optional[Sequence[str]] = None):
    """Wraps ``model`` in a peft LoRA model (only the adapters are trainable).

    ``target_modules=None`` picks the model's attention projections (q, k, v, o). The adapter
    weights are fp32 whatever the base model's dtype (spard.training.precision).
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(r, int) or r < 1:
        raise ValueError(f"lora r must be an int >= 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"lora alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    targets = list(target_modules) if target_modules else attention_targets(model)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM",
                        fan_in_fan_out=getattr(getattr(model, "config", None), "model_type", "") == "gpt2")
    peft_model = get_peft_model(model, config)
    upcast_trainable(peft_model)  # fp32 adapters (and optimizer state) on a bf16/fp16 base
    return peft_model
