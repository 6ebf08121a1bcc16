"""SPARD step against the SFT step on the same tiny model and data, and the projection itself
(fused ``project_`` against per-tensor Python ops).

    make bench                                    # pytest-benchmark timings (groups spag-*)
    python benchmarks/bench_spag.py               # interleaved timings + peak memory -> table + JSON

The model is a 4-layer, 256-wide Llama (vocab 2048) with LoRA r=8 on q, k, v, o; a utility batch
of 32 sequences of 128 tokens and a safety batch of 1 (1/32 of the utility batch). The SFT step
is forward + backward + clipping + AdamW; the SPARD step adds ``SafetyProjector.step()``.

Peak memory on the CPU is the peak of live tensor bytes during a step (from the profiler's
allocation events) plus the bytes already held at the step's start (weights, buffers, optimizer
state). Script mode alternates SFT and SPARD rounds so load on a shared machine hits both alike.
``SPARD_BENCH_THREADS`` sets torch's thread count (default 1: stable figures on a shared CPU).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

import spard_ext
from spard.formatting import IGNORE_INDEX
from spard.io import write_json_atomic
from spard.lora import apply_lora
from spard.spag import SafetyProjector, token_loss_sum

UTILITY_BATCH, SAFETY_BATCH, SEQ, VOCAB = 32, 1, 128, 2048
THREADS = int(os.environ.get("SPARD_BENCH_THREADS", "1"))


class _Tok:
    """Just enough tokenizer for encode_example: ids are the words' integers."""
    bos_token_id, eos_token_id, pad_token_id, chat_template, bos_token = 1, 2, 0, None, "<s>"
    add_bos_token = True

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (hash(w) % (VOCAB - 3)) for w in text.split()]}


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(500)]
    pick = lambda k: " ".join(words[i] for i in torch.randint(0, 500, (k,), generator=g).tolist())  # noqa: E731
    return [{"prompt": pick(SEQ // 2 - 40), "response": pick(SEQ // 2)} for _ in range(n)]


def build(seed: int = 0):
    """(model, optimizer, utility batch, projector) for the benchmark."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    model = apply_lora(tf.LlamaForCausalLM(cfg), r=8, alpha=16, dropout=0.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (UTILITY_BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 2] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    proj = SafetyProjector(model, _rows(64, seed), _Tok(), tau=0.0, batch_size=SAFETY_BATCH,
                           max_length=SEQ, optimizer=opt, progress=False)
    return model, opt, batch, proj


def sft_step(model, opt, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    (token_loss_sum(model, batch) / n).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def spard_step(model, opt, batch, proj):
    params = [p for p in model.parameters() if p.requires_grad]
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    (token_loss_sum(model, batch) / n).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    proj.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# The projection alone, on LoRA-shaped gradients of a 7B model (r=16 on q, k, v, o of 32 layers)
# ----------------------------------------------------------------------------------------------
LORA_SHAPES = [(16, 4096), (4096, 16)] * (4 * 32)


def lora_lists(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) * 0.01 for s in LORA_SHAPES]
    grads = [torch.randn(s, generator=g) for s in LORA_SHAPES]
    return params, grads


def projection_fused(params, grads, loss, tau):
    return spard_ext.project_(params, grads, tau - loss, max_step=None, use_dot=False).coef


def projection_per_tensor(params, grads, loss, tau):
    """The same math written the plain way: per-tensor norms, then per-tensor updates."""
    with torch.no_grad():
        sq = sum(g.float().pow(2).sum() for g in grads)
        alpha = torch.clamp((loss - tau) / sq, min=0.0)
        for p, g in zip(params, grads):
            p.sub_(alpha * g)
    return alpha


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------
def held_bytes(model, opt) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def step_peak_bytes(fn) -> int:
    """Peak of live tensor bytes allocated during ``fn()``, relative to its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    return max(itertools.accumulate((b for _, b in events), initial=0))


# ----------------------------------------------------------------------------------------------
# pytest-benchmark
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    n = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    model, opt, batch, proj = build()
    sft_step(model, opt, batch)  # warm-up: optimizer state and one-time initialisation
    spard_step(model, opt, batch, proj)
    yield model, opt, batch, proj
    torch.set_num_threads(n)


@pytest.mark.benchmark(group="spag-step")
def test_sft_step(benchmark, setup):
    model, opt, batch, _ = setup
    benchmark.pedantic(sft_step, args=(model, opt, batch), rounds=8, warmup_rounds=1)


@pytest.mark.benchmark(group="spag-step")
def test_spard_step(benchmark, setup):
    model, opt, batch, proj = setup
    benchmark.pedantic(spard_step, args=(model, opt, batch, proj), rounds=8, warmup_rounds=1)


@pytest.mark.benchmark(group="spag-projection")
@pytest.mark.parametrize("impl", [projection_fused, projection_per_tensor], ids=["fused", "per_tensor"])
def test_projection(benchmark, impl):
    params, grads = lora_lists()
    loss, tau = torch.tensor(1.0), 0.5
    benchmark.pedantic(impl, args=(params, grads, loss, tau), rounds=20, warmup_rounds=2)


# ----------------------------------------------------------------------------------------------
# Script mode: interleaved rounds, memory, table + JSON
# ----------------------------------------------------------------------------------------------
def _median_ms(samples):
    return 1e3 * statistics.median(samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "spag_step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)

    model, opt, batch, proj = build()
    for _ in range(2):  # warm-up
        sft_step(model, opt, batch)
        spard_step(model, opt, batch, proj)
    times = {"sft": [], "spard": []}
    for _ in range(args.rounds):
        for name, fn in (("sft", lambda: sft_step(model, opt, batch)),
                         ("spard", lambda: spard_step(model, opt, batch, proj))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    held = held_bytes(model, opt)
    peak = {"sft": step_peak_bytes(lambda: sft_step(model, opt, batch)),
            "spard": step_peak_bytes(lambda: spard_step(model, opt, batch, proj))}

    params, grads = lora_lists()
    loss, tau = torch.tensor(1.0), 0.5
    proj_times = {"fused": [], "per_tensor": []}
    for _ in range(3 * args.rounds):
        for name, fn in (("fused", projection_fused), ("per_tensor", projection_per_tensor)):
            t = time.perf_counter()
            fn(params, grads, loss, tau)
            proj_times[name].append(time.perf_counter() - t)

    res = {
        "setup": {"utility_batch": UTILITY_BATCH, "safety_batch": SAFETY_BATCH, "seq": SEQ,
                  "model": "Llama 4x256, vocab 2048, LoRA r=8 q,k,v,o", "threads": THREADS,
                  "rounds": args.rounds, "trainable_params": sum(p.numel() for p in proj.params)},
        "step_ms": {k: _median_ms(v) for k, v in times.items()},
        "step_ratio": statistics.median(times["spard"]) / statistics.median(times["sft"]),
        "held_mb": held / 2**20,
        "step_peak_mb": {k: v / 2**20 for k, v in peak.items()},
        "total_peak_mb": {k: (held + v) / 2**20 for k, v in peak.items()},
        "memory_ratio": (held + peak["spard"]) / (held + peak["sft"]),
        "projection_ms": {k: _median_ms(v) for k, v in proj_times.items()},
        "projection_speedup": statistics.median(proj_times["per_tensor"]) / statistics.median(proj_times["fused"]),
        "projection_list": f"{len(LORA_SHAPES)} tensors, {sum(a * b for a, b in LORA_SHAPES) / 1e6:.1f}M fp32",
    }
    write_json_atomic(args.out, res)
    print(f"| measure | SFT | SPARD | ratio (target) |\n| --- | ---: | ---: | ---: |")
    print(f"| step time (ms, median of {args.rounds}) | {res['step_ms']['sft']:.1f} | "
          f"{res['step_ms']['spard']:.1f} | {res['step_ratio']:.3f} (<= 1.15) |")
    print(f"| peak memory (MiB) | {res['total_peak_mb']['sft']:.1f} | {res['total_peak_mb']['spard']:.1f} | "
          f"{res['memory_ratio']:.3f} (<= 1.10) |")
    print(f"| peak during the step (MiB) | {res['step_peak_mb']['sft']:.1f} | {res['step_peak_mb']['spard']:.1f} | "
          f"{res['step_peak_mb']['spard'] / res['step_peak_mb']['sft']:.3f} |")
    print(f"\nprojection ({res['projection_list']}): fused {res['projection_ms']['fused']:.2f} ms, "
          f"per-tensor {res['projection_ms']['per_tensor']:.2f} ms, "
          f"speedup {res['projection_speedup']:.2f}x")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
