"""project_ on the LoRA-shaped list (256 tensors of 16x4096 / 4096x16, 16.8M fp32 elements)
against, in the same run: a per-tensor Python loop with a host read per tensor, a torch._foreach
composition, flatten + cat, and a plain copy of the same number of bytes (the bandwidth floor).

    pytest benchmarks/bench_project.py --benchmark-only --benchmark-json=out.json
    python benchmarks/summarize.py out.json
"""

import math

import pytest
import torch

import spard_ext

N_LAYERS = 64  # q,k,v,o A/B pairs per layer -> 256 tensors
SHAPES = [(16, 4096), (4096, 16)] * (2 * N_LAYERS)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def lists(device, dtype=torch.float32, scale=1):
    g = torch.Generator().manual_seed(0)
    shapes = [(s[0] * scale, s[1]) for s in SHAPES]
    x = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    a = [torch.randn(s, generator=g).to(device, dtype) * 1e-3 for s in shapes]
    return x, a


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# The surgery form reads x and a twice and writes x once: 20 bytes per fp32 element.
B = torch.tensor(-1e6)  # far outside the half-space: the capped step is always taken


def fused(x, a, b):
    spard_ext.project_(x, a, b, max_step=1e-9, use_dot=True)


def per_tensor_loop(x, a, b):
    # one host read per tensor, as a straightforward per-parameter implementation does
    dot = sum((xi * ai).sum().item() for xi, ai in zip(x, a))
    sq = sum((ai * ai).sum().item() for ai in a)
    coef = min(max((dot - float(b)) / sq, 0.0), 1e-9)
    for xi, ai in zip(x, a):
        xi.add_(ai, alpha=-coef)


def foreach(x, a, b):
    dots = torch._foreach_mul(x, a)  # composition of stock ops; no host read
    dot = torch.stack([d.sum() for d in dots]).sum()
    sq = torch.stack(torch._foreach_norm(a)).square().sum()
    coef = ((dot - b) / sq).clamp(0, 1e-9)
    torch._foreach_sub_(x, torch._foreach_mul(a, coef))


def flatten_cat(x, a, b):
    fx = torch.cat([t.reshape(-1) for t in x])
    fa = torch.cat([t.reshape(-1) for t in a])
    coef = ((fx @ fa - b) / (fa @ fa)).clamp(0, 1e-9)
    fx.sub_(coef * fa)
    for t, part in zip(x, fx.split([t.numel() for t in x])):
        t.copy_(part.view_as(t))


def fused_spag_form(x, a, b):
    # SPAG form (no dot term): the reduction reads only a, 16 bytes per element in all
    spard_ext.project_(x, a, b, max_step=1e-9, use_dot=False)


IMPLS = {"fused project_": fused, "fused project_ (SPAG form)": fused_spag_form, "per-tensor loop": per_tensor_loop, "foreach": foreach,
         "flatten+cat": flatten_cat}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLS))
def bench_project_lora(benchmark, impl, device):
    x, a = lists(device)
    b = B.to(device)
    fn = IMPLS[impl]
    benchmark.group = f"project_ LoRA list 16.8M fp32 ({device})"
    benchmark.extra_info["elements"] = sum(t.numel() for t in x)

    def run():
        fn(x, a, b)
        sync(device)

    benchmark.pedantic(run, rounds=15 if device == "cpu" else 50, warmup_rounds=2)


@pytest.mark.parametrize("device", DEVICES)
def bench_project_copy_floor(benchmark, device):
    n = sum(math.prod(s) for s in SHAPES)
    # 2.5 n floats read + 2.5 n written = the 20 bytes per element the fused op moves
    src = torch.randn(int(2.5 * n), device=device)
    dst = torch.empty_like(src)
    benchmark.group = f"project_ LoRA list 16.8M fp32 ({device})"

    def run():
        dst.copy_(src)
        sync(device)

    benchmark.pedantic(run, rounds=15 if device == "cpu" else 50, warmup_rounds=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_dot", [False, True], ids=["sqnorm", "dot+sqnorm"])
def bench_project_reduce(benchmark, use_dot, device):
    # The reduction alone (what the accuracy of the sums costs): reads a, and x for the dot.
    x, a = lists(device)
    benchmark.group = f"project_ LoRA list 16.8M fp32 ({device})"

    def run():
        spard_ext.project_reduce(x, a, use_dot=use_dot)
        sync(device)

    benchmark.pedantic(run, rounds=15 if device == "cpu" else 50, warmup_rounds=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU bandwidth figure")
@pytest.mark.parametrize("impl", ["fused project_", "per-tensor loop"])
def bench_project_cuda_30m(benchmark, impl):
    x, a = lists("cuda", scale=2)  # 33.6M elements
    b = B.cuda()
    fn = IMPLS[impl]
    benchmark.group = "project_ 33.6M fp32 (cuda)"
    benchmark.extra_info["bytes"] = 20 * sum(t.numel() for t in x)

    def run():
        fn(x, a, b)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, warmup_rounds=3)
