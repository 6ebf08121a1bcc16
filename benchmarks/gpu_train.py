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
import time
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


# Llama-2-7B's shapes (6.7B parameters): the paper's scale. Random weights, bf16.
SCALE_MODEL = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32)
SCALE_SEQ = 512
SCALE_LORA_R = 32  # the paper's LoRA rank, on q, k, v, o
SCALE_BATCH = 128  # the paper's effective batch
SCALE_MICRO = (8, 4, 2, 1)  # micro-batches tried in this order; the first SFT fits in is used
# Defenses first in this order; the rest in registry order. Those the budget does not reach are
# listed as skipped.
SCALE_FIRST = ("sft", "spard")


class _ProjectionClock:
    """Device time inside ``spard_ext.project_`` during a step (CUDA events around each call,
    summed after the step): SPARD's projection share without synchronising inside the step."""

    def __init__(self):
        import spard_ext

        self.mod, self.orig, self.pairs, self.on = spard_ext, spard_ext.project_, [], False

        def timed(*args, **kwargs):
            if not self.on or not torch.cuda.is_available():
                return self.orig(*args, **kwargs)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.orig(*args, **kwargs)
            end.record()
            self.pairs.append((start, end))
            return out

        spard_ext.project_ = timed

    def ms(self) -> float:
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in self.pairs)

    def close(self) -> None:
        self.mod.project_ = self.orig


def _free(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _one_defense_at_scale(name: str, device, dtype, model_kw: dict, seq: int, optim: dict, lora_r: int) -> dict:
    """Build one run, take three optimizer steps: the first (setup, selection, first launches)
    untimed, the second timed, the third with the projection clock; peak memory over steps 2-3."""
    on_cuda = torch.device(device).type == "cuda"
    t0 = time.perf_counter()
    run = bd.Run(name, device=device, dtype=dtype, model_kw=model_kw, seq=seq, optim=optim, lora_r=lora_r,
                 init_in_dtype=True)
    build_s = time.perf_counter() - t0
    clock = _ProjectionClock() if name.startswith("spard") else None
    marks: list[float] = []
    before = [0]

    def on_step(step, logs):
        if on_cuda:
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        if step == 1 and on_cuda:
            before[0] = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        if step == 2 and clock is not None:
            clock.on = True

    try:
        run.fit(3, on_step=on_step)
        proj_ms = clock.ms() if clock is not None and on_cuda else None
    finally:
        if clock is not None:
            clock.close()
    step_ms = 1e3 * (marks[1] - marks[0])
    held = run.held_bytes()
    peak = held + (torch.cuda.max_memory_allocated(device) - before[0] if on_cuda else 0)
    row = {"step_ms": round(step_ms, 1), "projection_step_ms": round(1e3 * (marks[2] - marks[1]), 1),
           "peak_mib": round(peak / 2**20, 1), "alignment_stage_s": round(run.stage_s, 2),
           "build_s": round(build_s, 1)}
    if proj_ms is not None:
        row["projection_ms"] = round(proj_ms, 2)
        row["projection_share"] = round(proj_ms / row["projection_step_ms"], 4)
    del run
    return row


def train_cost_at_scale(device, defenses: list[str], deadline=None, dtype=torch.bfloat16,
                        model_kw: dict = SCALE_MODEL, seq: int = SCALE_SEQ, lora_r: int = SCALE_LORA_R,
                        batch: int = SCALE_BATCH, micro_sizes=SCALE_MICRO) -> dict:
    """One optimizer step of each defense on a model of 7B shapes against SFT: the paper's
    effective batch with the largest micro-batch SFT fits in (said so), defenses one at a time
    (each gets the whole device), out-of-memory per defense reported, not fatal."""
    order = [n for n in SCALE_FIRST if n in defenses or n == "sft"] + [n for n in defenses if n not in SCALE_FIRST]
    rows, skipped, notes = {}, [], []
    micro = None
    for size in micro_sizes:  # the largest micro-batch SFT's step fits in
        optim = dict(bd.OPTIM, batch_size=size, grad_accum=max(1, batch // size))
        try:
            rows["sft"] = _one_defense_at_scale("sft", device, dtype, model_kw, seq, optim, lora_r)
            micro = size
            break
        except Exception as exc:
            if not _is_oom(exc):
                raise
            notes.append(f"SFT does not fit at micro-batch {size}")
        finally:
            _free(device)
    if micro is None:
        return {"setup": {"model": model_kw, "seq": seq}, "defenses": {}, "skipped": order[1:], "notes": notes}
    optim = dict(bd.OPTIM, batch_size=micro, grad_accum=max(1, batch // micro))
    sft = rows["sft"]
    per_defense_s = 3 * sft["step_ms"] / 1e3 + sft["build_s"] + 10  # SFT's cost, a defense's is higher
    for name in order[1:]:
        if deadline is not None and deadline.left() < 2 * per_defense_s:
            skipped.append(name)
            continue
        try:
            rows[name] = _one_defense_at_scale(name, device, dtype, model_kw, seq, optim, lora_r)
        except Exception as exc:
            if not _is_oom(exc):
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            else:
                rows[name] = {"error": f"out of memory at micro-batch {micro}"}
        finally:
            _free(device)
    for name, row in rows.items():
        if "step_ms" in row:
            row["step_ratio"] = round(row["step_ms"] / sft["step_ms"], 3)
            row["memory_ratio"] = round(row["peak_mib"] / sft["peak_mib"], 3) if sft["peak_mib"] else None
    n_params = sum(v for k, v in _param_count(model_kw).items())
    return {"setup": {"model": model_kw, "parameters": n_params, "dtype": str(dtype).replace("torch.", ""),
                      "seq": seq, "lora_r": lora_r, "effective_batch": batch, "micro_batch": micro,
                      "grad_accum": optim["grad_accum"], "paper_micro_batch_fits": micro == micro_sizes[0]},
            "defenses": rows, "skipped": skipped, "notes": notes}


def _param_count(m: dict) -> dict:
    """Parameters of a Llama of these shapes, from the config (no model needed)."""
    h, i, n, v = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    kv = h * m["num_key_value_heads"] // m["num_attention_heads"]
    layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return {"embeddings": 2 * v * h, "layers": n * layer, "norm": h}
