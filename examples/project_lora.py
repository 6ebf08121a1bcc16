"""One SPAG safety projection on a LoRA model, by hand.

A tiny Llama gets LoRA adapters (peft); we take the safety loss ℓ on a refusal batch and its
gradient g over the trainable tensors, then project the adapters onto the linearised
constraint ℓ + <g, θ - θ+> <= τ with one fused call. Afterwards the safety loss is lower.

    python examples/project_lora.py
"""

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import spard_ext


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # LoRA B starts at zero; give the adapters some state to project
        torch.nn.init.normal_(p, std=0.02)

    batch = torch.randint(0, 128, (4, 24))  # stands in for tokenised (harmful prompt -> refusal) pairs
    tau = torch.tensor(0.2)

    def safety_loss():
        return model(input_ids=batch, labels=batch).loss

    loss = safety_loss()
    grads = torch.autograd.grad(loss, params)
    # α = clamp((ℓ - τ) / ||g||², 0, η_safe); θ <- θ - α g   (b = τ - ℓ, no dot term)
    # The cap η_safe keeps the step inside the region where the linearisation holds.
    result = spard_ext.project_(params, grads, tau - loss.detach(), max_step=1.0)
    after = safety_loss()
    print(f"trainable tensors: {len(params)}, elements: {sum(p.numel() for p in params):,}")
    print(f"safety loss before: {loss.item():.4f}  after: {after.item():.4f}  "
          f"(alpha = {result.coef.item():.3g}, ||g||^2 = {result.sqnorm.item():.3g})")
    assert after.item() < loss.item()


if __name__ == "__main__":
    main()
