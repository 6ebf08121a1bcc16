"""Cost per defense: one optimizer step and peak memory of every registered defense against SFT
on the same model and batch, all through the one trainer (``spard.trainer.fit``).

    python benchmarks/bench_defenses.py        # table + results/defense_cost.json

Model: a 4-layer, 256-wide Llama (vocab 2048) with LoRA r=8 on q, k, v, o; 64 training rows of
128 tokens; micro-batch 8 x accumulation 4 (effective batch 32), one torch thread. Each
defense keeps its paper settings except the second batches, scaled to this effective batch as
in the papers: SPARD's safety batch 1 (4 of 128 in the paper), BDS's alignment batch 10, SafeGrad's
8, Panacea's harmful batch 32 (10 of 10). Alignment stages (Booster, Antibody-align, LoX) run
before fine-tuning and post-fine-tuning stages after it: their cost is reported apart (wall
seconds) and the step is the one between.

Step time: the process's CPU time per step (one torch thread, so other jobs on a shared
machine do not inflate it the way they inflate wall time), median over the timed steps,
defenses interleaved round by round. Peak memory: the peak of live tensor bytes during two
steps (profiler allocation events) plus the bytes held before them (weights, buffers, adapter,
optimizer state).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Optional

import torch

from spard.config import OptimConfig
from spard.defenses import DefenseData, defense_names, make_defense
from spard.io import write_json_atomic

sys.path.insert(0, str(Path(__file__).parent))
from bench_spag import step_peak_bytes  # noqa: E402  (the same peak-memory measure)

SEQ, VOCAB = 128, 2048  # 64 training rows: two effective batches
OPTIM = dict(lr=1e-4, warmup_steps=0, batch_size=8, grad_accum=4, seed=0, weight_decay=0.0)
SETTINGS = {  # second batches scaled to the effective batch (see the docstring)
    "spard": {"selection": "random", "batch_size": 1, "p": 0.5},
    "spard-official": {"selection": "random", "batch_size": 1, "p": 0.5},
    "spard-random": {"batch_size": 1, "p": 0.5},
    "spard-lr-cap": {"selection": "random", "batch_size": 1, "p": 0.5},
    "lisa": {"alignment_steps": 1, "finetune_steps": 9},
    "booster": {"steps": 2, "batch_size": 8},
    "antibody-align": {"stage_steps": 2, "stage_batch_size": 8},
    "panacea": {"harmful_batch_size": 32},
}
# SPARD's step with another one-off selection (the selection ablations): not costed apart.
SELECTION_ONLY = ("spard-relevance", "spard-dpp", "spard-k-center", "spard-behavior-aware")


def cost_names() -> list[str]:
    """The defenses whose step cost differs: the registry less the selection ablations."""
    return [n for n in defense_names() if n not in SELECTION_ONLY]


THREADS = int(os.environ.get("SPARD_BENCH_THREADS", "1"))


def settings_for(name: str) -> dict:
    """A defense's settings here; a composition's members (antibody+spard) each get their own."""
    if "+" in name:
        return {m: SETTINGS.get(m, {}) for m in name.split("+")}
    return SETTINGS.get(name, {})


class _Tok:
    """Just enough tokenizer for encode_example: ids are the words' integers."""
    bos_token_id, eos_token_id, pad_token_id, chat_template, bos_token = 1, 2, 0, None, "<s>"
    add_bos_token = True

    def __init__(self, vocab: int = VOCAB):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + zlib.crc32(w.encode()) % (self.vocab - 3) for w in text.split()]}

    def __len__(self):
        return self.vocab


def rows(n: int, seed: int, key: str = "response", seq: int = SEQ) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    pick = lambda k: " ".join(f"w{i}" for i in torch.randint(0, 2000, (k,), generator=g).tolist())  # noqa: E731
    return [{"prompt": pick(seq // 2 - 8), key: pick(seq // 2)} for _ in range(n)]


CPU_MODEL = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=4)


def base_model(model_kw: dict = CPU_MODEL, seq: int = SEQ, device="cpu", dtype=None, init_in_dtype: bool = False):
    """A randomly initialised Llama, made on ``device`` (no host copy of a large model).
    ``init_in_dtype``: initialise directly in ``dtype`` (a 7B model in fp32 first would need
    twice the memory and time; the weights are random either way)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**model_kw, max_position_embeddings=seq)
    previous = torch.get_default_dtype()
    if init_in_dtype and dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype) if dtype is not None else model


def perturbed_weights(model, scale: float = 0.01) -> dict:
    """A stand-in base model for the defenses that need one: every parameter moved by seeded
    noise of ``scale`` times its own standard deviation."""
    g = torch.Generator(device="cpu").manual_seed(1)
    out = {}
    for n, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        out[n] = (p.detach() + scale * p.detach().float().std().to(p.dtype) * noise)
    return out


def _clock(device) -> float:
    """CPU time of the process on the host (robust to other jobs); wall time after a
    synchronisation on a GPU, where the work is not the host's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


class Run:
    """One defense set up through the trainer's own code path, stepped on demand."""

    def __init__(self, name: str, device="cpu", dtype=None, model_kw: dict = CPU_MODEL, seq: int = SEQ,
                 optim: dict = OPTIM, lora_r: int = 8, init_in_dtype: bool = False):
        from spard.lora import apply_lora
        from spard.trainer import fit

        self.name, self.device, self.seq, self.optim = name, torch.device(device), seq, dict(optim)
        self.tok = _Tok(model_kw["vocab_size"])
        micro = self.optim["batch_size"]
        n_rows = micro * self.optim["grad_accum"] * 2
        pool = [{"prompt": r["prompt"], "safe": r["response"], "unsafe": u["response"]}
                for r, u in zip(rows(64, 1, seq=seq), rows(64, 2, seq=seq))]
        data = DefenseData(user=rows(n_rows, 0, seq=seq), safety_pool=pool, seed=0, max_length=seq,
                           micro_batch_size=micro)
        defense = make_defense(name, **settings_for(name))
        model = base_model(model_kw, seq, device, dtype, init_in_dtype=init_in_dtype)
        if "base_model" in defense.NEEDS:  # AsFT, LoX: a "base" 1% away from these weights
            data.base_weights = perturbed_weights(model)
        t = time.perf_counter()
        model = defense.alignment_stage(model, self.tok, data)
        _clock(self.device)
        self.stage_s = time.perf_counter() - t
        torch.manual_seed(0)
        self.model = apply_lora(model, r=lora_r, alpha=2 * lora_r, dropout=0.0)
        self.times: list[float] = []
        self.post_s: Optional[float] = None  # the post-fine-tuning stage of the last fit (None: none)
        self._fit, self._data, self._defense = fit, data, defense
        self._rows = defense.training_rows(data)

    def fit(self, max_steps: int, **kwargs) -> dict:
        """One ``spard.trainer.fit`` call of ``max_steps`` steps on this run's model and data."""
        return self._fit(self.model, self.tok, self._rows, defense=self._defense, data=self._data,
                         optim=OptimConfig(**self.optim, max_steps=max_steps), max_length=self.seq,
                         progress=False, **kwargs)

    def steps(self, n: int, timed: bool = True) -> None:
        """``n`` timed steps; each call is a fresh ``fit`` whose first step (after the defense's
        setup: selection, calibration) is not timed."""
        last = [_clock(self.device)]

        def on_step(step, logs):
            now = _clock(self.device)
            if timed and step > 1:
                self.times.append(now - last[0])
            last[0] = now

        post = self.fit(n + 1, on_step=on_step)["summary"]["post_training_seconds"]
        self.post_s = post if post is None else max(post, self.post_s or 0.0)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.model.parameters(), self.model.buffers()))

    def peak_bytes(self) -> int:
        """What the model holds plus the peak allocated during one step above what was allocated
        before it (CUDA's allocator statistics on a GPU, profiler allocation events on the CPU)."""
        if self.device.type != "cuda":
            return self.held_bytes() + step_peak_bytes(lambda: self.steps(1, timed=False))
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.steps(1, timed=False)
        return self.held_bytes() + torch.cuda.max_memory_allocated(self.device) - before


def cost_per_defense(runs: dict[str, Run], rounds: int, steps: int) -> dict:
    """Step time and peak memory of each run against ``runs["sft"]``: a warm-up step each, then
    ``rounds`` rounds of ``steps`` timed steps with the defenses interleaved, then one step each
    for the memory."""
    for r in runs.values():
        r.steps(1, timed=False)  # warm-up: the defense's setup, first launches
    for _ in range(rounds):
        for r in runs.values():
            r.steps(steps)
    memory = {n: r.peak_bytes() for n, r in runs.items()}
    sft_t, sft_m = statistics.median(runs["sft"].times), memory["sft"]
    return {n: {"step_ms": 1e3 * statistics.median(r.times), "step_ratio": statistics.median(r.times) / sft_t,
                "peak_mib": memory[n] / 2**20, "memory_ratio": memory[n] / sft_m, "alignment_stage_s": r.stage_s,
                "post_training_s": r.post_s}
            for n, r in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of --steps steps per defense")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--defenses", default=",".join(cost_names()))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "defense_cost.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    names = [n for n in args.defenses.split(",") if n]
    if "sft" not in names:
        names.insert(0, "sft")
    runs = {n: Run(n) for n in names}
    res = {"setup": {"model": "Llama 4x256, vocab 2048, LoRA r=8 q,k,v,o", "seq": SEQ, "optim": OPTIM,
                     "settings": SETTINGS, "threads": THREADS, "timed_steps": args.rounds * args.steps},
           "defenses": cost_per_defense(runs, args.rounds, args.steps)}
    write_json_atomic(args.out, res)
    print("| defense | step (ms) | x SFT | peak memory (MiB) | x SFT | alignment stage (s) | post-fine-tuning (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, d in res["defenses"].items():
        post = "-" if d["post_training_s"] is None else f"{d['post_training_s']:.1f}"
        print(f"| {n} | {d['step_ms']:.0f} | {d['step_ratio']:.2f} | {d['peak_mib']:.0f} | "
              f"{d['memory_ratio']:.2f} | {d['alignment_stage_s']:.1f} | {post} |")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
