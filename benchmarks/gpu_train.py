"""Training on a GPU, for the GPU report: the one trainer (``spard.trainer.fit``) on CUDA.

- parity: the same short fp32 SPARD run (tiny Llama, LoRA, RD-DPP-free random selection) on the
  CPU and on the GPU: per-step losses and the final adapter must agree (the SPAG projection runs
  through the CUDA kernels on the GPU, the CPU kernels on the host);
- cost: one optimizer step of each defense against SFT on a bf16 Llama of realistic width
  (LoRA adapters and optimizer state in fp32, autocast forward passes), wall time per step
  after a synchronisation, and peak GPU memory above what the model holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_defenses as bd  # noqa: E402  (the defenses' settings and the Run helper)

# A 0.5B-parameter Llama (hidden 2048, 8 layers, vocab 32000): wide enough that the GPU's time
# goes to the matrices, small enough that a dozen runs fit side by side in one device's memory.
GPU_MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=16)
GPU_SEQ = 512
GPU_OPTIM = dict(bd.OPTIM, batch_size=8, grad_accum=4)
PARITY_MODEL = dict(vocab_size=bd.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
PARITY_TOL = dict(rtol=2e-3, atol=2e-5)


def _adapter(model) -> dict:
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _short_run(device, steps: int, defense: str = "spard") -> tuple[list[float], dict, dict]:
    optim = dict(bd.OPTIM, batch_size=4, grad_accum=2, lr=1e-2)
    # made on the CPU and moved: the same initial weights (the CUDA generator draws other numbers)
    run = bd.Run(defense, device="cpu", model_kw=PARITY_MODEL, seq=64, optim=optim, lora_r=4)
    run.model.to(device)
    losses = []
    run.fit(steps, log_every=1, on_step=lambda step, logs: losses.append(float(logs["loss"])))
    return losses, _adapter(run.model), run._defense.summary()


def train_parity(device, steps: int = 6) -> dict:
    """The same fp32 SPARD run on the CPU and on ``device``."""
    cpu_losses, cpu_w, cpu_summary = _short_run("cpu", steps)
    dev_losses, dev_w, dev_summary = _short_run(device, steps)
    worst = max(float(((dev_w[n] - cpu_w[n]).abs() / (cpu_w[n].abs() + PARITY_TOL["atol"] / PARITY_TOL["rtol"])).max())
                for n in cpu_w)
    close = all(torch.allclose(dev_w[n], cpu_w[n], **PARITY_TOL) for n in cpu_w)
    loss_gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(dev_losses, cpu_losses))
    spag_dev = (dev_summary.get("spag") or {})
    spag_cpu = (cpu_summary.get("spag") or {})
    return {"steps": steps, "adapter_close": close, "worst_adapter_rel": worst, "worst_loss_rel": loss_gap,
            "losses_cpu": cpu_losses, "losses_device": dev_losses,
            "spag_triggers_cpu": spag_cpu.get("triggers"), "spag_triggers_device": spag_dev.get("triggers"),
            "ok": close and loss_gap < 1e-3 and len(dev_losses) == steps
            and spag_cpu.get("triggers") == spag_dev.get("triggers")}


def train_cost(device, defenses: list[str], rounds: int = 2, steps: int = 2, dtype=torch.bfloat16,
               model_kw: dict = GPU_MODEL, seq: int = GPU_SEQ, optim: dict = GPU_OPTIM,
               deadline=None) -> dict:
    """Step time and peak memory of each defense against SFT, on ``device`` in ``dtype``."""
    names = ["sft"] + [n for n in defenses if n != "sft"]
    runs, skipped = {}, []
    for name in names:
        if deadline is not None and deadline.left() < 40 and name != "sft":
            skipped.append(name)
            continue
        runs[name] = bd.Run(name, device=device, dtype=dtype, model_kw=model_kw, seq=seq, optim=optim, lora_r=16)
    n_params = sum(p.numel() for p in runs["sft"].model.parameters())
    return {"setup": {"model": model_kw, "parameters": n_params, "dtype": str(dtype or torch.float32).replace("torch.", ""),
                      "seq": seq, "optim": optim, "lora_r": 16, "timed_steps": rounds * steps},
            "defenses": bd.cost_per_defense(runs, rounds, steps), "skipped": skipped}
