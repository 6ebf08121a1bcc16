"""Benchmarks of spard_ext.dpp_greedy against plain-torch greedy DPP solvers, in the same run.

    make bench                                   # default sizes
    SPARD_BENCH_LARGE=1 python -m pytest benchmarks/bench_dpp.py --benchmark-only -q
                                                 # + N = 1,000,000 and the O(N k³) baseline at N = 20,000

Baselines:
- ``torch_incremental``: the incremental Cholesky update in plain torch (float32 matmuls), kernel
  rows F f_j computed on the fly;
- ``torch_resolve``: what the paper's released code does, a dense N x N kernel and, every step,
  a triangular solve against the whole Cholesky factor of L_Y (O(N k³)).

Data is RD-DPP shaped: unit embeddings drawn around clusters, rows scaled by relevance r_i = q_i^4
(``rd``), plus isotropic Gaussian rows (``gauss``), the worst case for the lazy refresh of the
CPU op. Medians and ratios go to benchmarks/results/dpp_greedy.json and a table on stdout.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch

from spard.io import write_json_atomic
from spard_ext import dpp_greedy

LARGE = os.environ.get("SPARD_BENCH_LARGE") == "1"
RESULTS: dict[str, dict] = {}
OUT = Path(__file__).parent / "results" / "dpp_greedy.json"


def rd_factor(n: int, d: int, seed: int = 0, clusters: int = 64, device="cpu") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g, device=device)
    x = centres[torch.randint(0, clusters, (n,), generator=g, device=device)]
    x.add_(torch.randn(n, d, generator=g, device=device), alpha=0.8)
    x.div_(x.norm(dim=1, keepdim=True))
    q = torch.rand(n, generator=g, device=device)
    return x.mul_(q.pow_(4).unsqueeze(1))


def gauss_factor(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) / math.sqrt(d)


def torch_incremental(factor: torch.Tensor, k: int, eps: float = 1e-6, eps_stop: float = 1e-10):
    """Plain-torch incremental Cholesky greedy (Chen et al. 2018), low-rank kernel rows."""
    n = factor.shape[0]
    d2 = (factor * factor).sum(1) + eps
    c = torch.zeros(k, n, dtype=factor.dtype)
    picks = []
    for t in range(min(k, n)):
        j = int(torch.argmax(d2))
        if not float(d2[j]) >= eps_stop:
            break
        picks.append(j)
        row = factor @ factor[j]
        row[j] += eps
        e = (row - c[:t].T @ c[:t, j]) / torch.sqrt(d2[j])
        c[t] = e
        d2 -= e * e
        d2[j] = -math.inf
    return picks


def torch_resolve(kernel: torch.Tensor, k: int, eps_stop: float = 1e-10):
    """Greedy re-solving L_Y^{1/2} V = L_{Y,:} against the whole Cholesky factor each step."""
    diag = kernel.diagonal().clone()
    picks = [int(torch.argmax(diag))]
    while len(picks) < k:
        idx = torch.tensor(picks)
        chol = torch.linalg.cholesky(kernel[idx][:, idx])
        v = torch.linalg.solve_triangular(chol, kernel[idx], upper=False)
        d2 = diag - (v * v).sum(0)
        d2[idx] = -math.inf
        j = int(torch.argmax(d2))
        if not float(d2[j]) >= eps_stop:
            break
        picks.append(j)
    return picks


def record(name: str, benchmark, **info):
    stats = benchmark.stats.stats
    RESULTS[name] = {"median_s": stats.median, "rounds": stats.rounds, **info}
    benchmark.extra_info.update(info)


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if not RESULTS:
        return
    rows = []
    for name, r in sorted(RESULTS.items()):
        case = name.rsplit("/", 1)[0]
        base = RESULTS.get(f"{case}/torch_incremental")
        r["speedup_vs_torch_incremental"] = base["median_s"] / r["median_s"] if base else None
        rows.append(name)
    write_json_atomic(OUT, {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "device": "cpu", "results": RESULTS})
    print(f"\n{'case / impl':48s} {'median s':>10s} {'× vs torch_incremental':>24s}")
    for name in rows:
        r = RESULTS[name]
        ratio = r["speedup_vs_torch_incremental"]
        print(f"{name:48s} {r['median_s']:10.3f} {ratio and f'{ratio:.2f}' or '-':>24s}")


PAPER_CASES = [(4516, 150, 384, "rd"), (20000, 600, 384, "rd"), (20000, 600, 384, "gauss")]


@pytest.mark.parametrize("n,k,d,data", PAPER_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("impl", ["spard_ext", "torch_incremental"])
def test_paper_sizes(benchmark, n, k, d, data, impl):
    f = (rd_factor if data == "rd" else gauss_factor)(n, d)
    if impl == "spard_ext":
        res = benchmark.pedantic(lambda: dpp_greedy(factor=f, k=k), rounds=3, iterations=1)
        picks = res.indices.tolist()
    else:
        picks = benchmark.pedantic(lambda: torch_incremental(f, k), rounds=3, iterations=1)
    record(f"N={n},k={k},D={d},{data}/{impl}", benchmark, picks=len(picks))


@pytest.mark.parametrize("n,k", [(4516, 150)] + ([(20000, 600)] if LARGE else []), ids=str)
def test_paper_sizes_resolve(benchmark, n, k):
    f = rd_factor(n, 384)
    kernel = f @ f.T + 1e-6 * torch.eye(n)
    picks = benchmark.pedantic(lambda: torch_resolve(kernel, k), rounds=1, iterations=1)
    record(f"N={n},k={k},D=384,rd/torch_resolve", benchmark, picks=len(picks))


@pytest.mark.parametrize("n", [5_000, 20_000, 100_000] + ([400_000] if LARGE else []), ids=str)
@pytest.mark.parametrize("impl", ["spard_ext", "torch_incremental"])
def test_scaling_in_n(benchmark, n, impl):
    k, d = 200, 256
    f = rd_factor(n, d)
    if impl == "spard_ext":
        benchmark.pedantic(lambda: dpp_greedy(factor=f, k=k), rounds=2, iterations=1)
    else:
        benchmark.pedantic(lambda: torch_incremental(f, k), rounds=2, iterations=1)
    record(f"scaling N={n},k={k},D={d},rd/{impl}", benchmark)


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not LARGE, reason="set SPARD_BENCH_LARGE=1 (about a minute)")
@pytest.mark.parametrize("data", ["rd", "gauss"])
def test_million_items(benchmark, data):
    n, d, k = 1_000_000, 256, 1000
    f = (rd_factor if data == "rd" else gauss_factor)(n, d)
    before = _vm_hwm_bytes()  # peak so far includes building the input
    t0 = time.perf_counter()
    res = benchmark.pedantic(lambda: dpp_greedy(factor=f, k=k), rounds=1, iterations=1)
    extra = max(0, _vm_hwm_bytes() - before)
    record(f"N={n},k={k},D={d},{data}/spard_ext", benchmark, picks=len(res.indices),
           peak_extra_gib=round(extra / 2**30, 3), wall_s=round(time.perf_counter() - t0, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_million_items_cuda(benchmark):
    n, d, k = 1_000_000, 1024, 1000
    f = rd_factor(n, d).cuda()

    def run():
        res = dpp_greedy(factor=f, k=k)
        torch.cuda.synchronize()
        return res

    run()
    benchmark.pedantic(run, rounds=3, iterations=1)
    record(f"cuda N={n},k={k},D={d},rd/spard_ext", benchmark, device=torch.cuda.get_device_name())
