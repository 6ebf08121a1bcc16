"""The GPU report in one command: build the CUDA kernels, run every CUDA test, benchmark the
kernels against their baselines, check CPU-vs-CUDA parity on random cases, and write
benchmarks/results/gpu_<device>.md and .json (named after the GPU).

    make gpu-report                   # = python benchmarks/gpu_report.py
    python benchmarks/gpu_report.py --skip-build --skip-tests   # measurements only

Made to fit one command of at most 10 minutes on an H100 machine, the build included: each
phase has a time budget, and the report is written with whatever finished. Without a CUDA
device it prints one line and exits with status 2. Exit status 1: the build or a test failed
(the report is still written).

Measured (times are medians of CUDA-event timings, baselines in the same run):
- project_ on 30M elements, fp32 and bf16, surgery form (reads x and a twice, writes x): a
  LoRA-shaped list (256 tensors of 16 x 7168 / 7168 x 16) and one flat tensor, against the copy
  floor (a copy moving the same bytes) and the per-tensor Python loop; targets on an H100:
  >= 80% of the copy bandwidth, >= 10x faster than the loop;
- dpp_greedy at N = 1,000,000, D = 1,024, k = 1,000 (float32 RD-DPP-shaped factor; target
  <= 2 s on an H100), and the Cholesky update at N = 50,000;
- parity: random project_ lists (dtype pairs, odd sizes, misaligned starts) and random
  dpp_greedy cases, CUDA against the CPU backend.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

try:
    import torch
except ImportError:  # e.g. `make gpu-report` with neither the virtual environment nor a torch install
    print(f"gpu-report: torch is not installed for {sys.executable}; run it with the python that holds torch")
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = 570  # the whole report, build included: under one 10-minute command
TARGETS = {"copy_fraction": 0.8, "loop_speedup": 10.0, "dpp_seconds": 2.0}
LORA_WIDTH = 7168  # 256 tensors of 16 x 7168 / 7168 x 16 = 29.4M elements
FLAT = 30_000_000

# CUDA results that no GPU run has confirmed yet (benchmarks/README.md, "Unverified on a GPU"):
# (what, the tests that check it: test ids as JUnit writes them, a parametrised id matching by
# prefix). The report says, for each, whether this run passed, failed or did not run its tests.
# Remove an entry once a GPU run has passed it (and say so in benchmarks/README.md).
UNVERIFIED = [
    ("the CUDA library on the LibTorch stable ABI (stable device guard, current stream through the shim, "
     "stable tensor construction, input checks on the device for dpp_greedy)", ["tests.test_kernels_cuda::"]),
    ("input errors whose message holds a number, and the CUDA-graph refusal (messages without streams)",
     ["tests.test_kernels_cuda::test_version_counter_and_no_partial_update",
      "tests.test_kernels_cuda::test_error_devices_differ_names_the_entry",
      "tests.test_project::test_cuda_error_devices_differ",
      "tests.test_kernels_cuda::test_input_checks_raise_after_the_loop",
      "tests.test_kernels_cuda::test_capture_is_refused_with_a_clear_error"]),
    ("one host read per dpp_greedy call, counted from the CUDA runtime's synchronising calls; a dense rank-8 "
     "kernel gives 8 picks", ["tests.test_kernels_cuda::test_one_host_read_per_call"]),
    ("project_ reduce forms products in float64 (x = [3e38, 3e38, 0], a = [2, -2, 1]: coef 1, not a NaN dot)",
     ["tests.test_kernels_cuda::test_products_that_leave_float32_are_formed_in_float64"]),
    ("dpp_greedy's host thread yields, then sleeps, while it waits for the device (no busy spin)",
     ["tests.test_kernels_cuda::test_dpp_greedy_does_not_spin_the_calling_thread"]),
    ("dpp_greedy's pinned progress block is not handed out again under queued kernels after an exception "
     "(event waited on first)", ["tests.test_kernels_cuda::test_progress_block_is_not_reused_under_queued_kernels"]),
    ("a dpp_greedy call leaves another thread's global-mode CUDA graph capture valid (thread-local capture mode)",
     ["tests.test_kernels_cuda::test_dpp_greedy_leaves_another_threads_global_capture_valid"]),
    ("a CPU-tensor b is captured by value in a CUDA graph (documented)",
     ["tests.test_kernels_cuda::test_a_cpu_tensor_b_is_captured_by_value"]),
    ("spard_ext.FlatLayout on CUDA parameters (two dtype groups) equals the list call, and its call captures "
     "in a CUDA graph; its eager copy-bandwidth fraction is the report's \"lora layout\" rows",
     ["tests.test_kernels_cuda::test_flat_layout_on_cuda_equals_the_list_call_and_captures"]),
]


def _bench(name: str):
    """A sibling benchmark module, whose helpers (inputs, baselines) the report reuses."""
    import importlib

    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------------------------------------
# Preflight, build, tests
# ------------------------------------------------------------------------------------------------
def preflight(skip_build: bool) -> str | None:
    """None when a report can be made here, else the one-line reason."""
    if not torch.cuda.is_available():
        return ("gpu-report: no CUDA device is visible (torch.cuda.is_available() is False); "
                "run it on a machine with an NVIDIA GPU")
    if not skip_build:
        from torch.utils.cpp_extension import CUDA_HOME

        if torch.version.cuda is None or CUDA_HOME is None:
            return (f"gpu-report: cannot build the CUDA kernels: torch.version.cuda={torch.version.cuda}, "
                    f"CUDA_HOME={CUDA_HOME} (need a CUDA build of torch and nvcc)")
    return None


def device_slug(name: str) -> str:
    """File-name part for a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def build(deadline: Deadline) -> dict:
    major, minor = torch.cuda.get_device_capability()
    env = _env()
    env.update(SPARD_EXT_CUDA="1", TORCH_CUDA_ARCH_LIST=f"{major}.{minor}", MAX_JOBS=str(os.cpu_count() or 4))
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=max(10.0, deadline.left() - 240))
        ok, tail = proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        ok, tail = False, "build timed out"
    return {"ok": ok, "seconds": round(time.monotonic() - t0, 1), "arch": f"{major}.{minor}",
            "log_tail": "" if ok else tail}


def parse_junit(path: Path) -> dict:
    """Counts and failing test ids from a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, reasons, outcomes = [], {}, {}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            case_id = f"{case.get('classname')}::{case.get('name')}"
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                failed.append(case_id)
                # the first line of the assertion or of a crashed worker's report, for the report
                first = (problem.get("message") or problem.text or "").strip().splitlines()
                reasons[failed[-1]] = first[0][:300] if first else ""
            outcomes[case_id] = ("failed" if problem is not None else
                                 "skipped" if case.find("skipped") is not None else "passed")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    counts["reasons"] = reasons
    counts["outcomes"] = outcomes
    return counts


def unverified_status(tests: dict | None) -> list[dict]:
    """Each UNVERIFIED entry with what this run's tests say of it: "passed" (every matching test
    passed), "FAILED" (one failed), or "not run" (no test of it ran or all were skipped)."""
    outcomes = (tests or {}).get("outcomes", {})
    rows = []
    for what, prefixes in UNVERIFIED:
        got = [o for case, o in outcomes.items() if any(case.startswith(p) for p in prefixes)]
        ran = [o for o in got if o != "skipped"]
        status = "FAILED" if "failed" in ran else "passed" if ran else "not run"
        rows.append({"what": what, "tests": prefixes, "status": status})
    return rows


def run_cuda_tests(deadline: Deadline) -> dict:
    """Every test marked cuda, in a subprocess (it imports the freshly built extension)."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        # with pytest-xdist, a test that kills its process is reported as failed and the rest run on
        workers = ["-n", "2"] if importlib.util.find_spec("xdist") else []
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *workers, "tests/test_kernels_cuda.py", "tests/test_project.py", "tests/test_dpp.py"]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                                  timeout=max(10.0, deadline.left() - 150))
            out = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            return {"ok": False, "seconds": round(time.monotonic() - t0, 1), "note": "tests timed out"}
        result = parse_junit(xml) if xml.exists() else {"tests": 0, "failed": [], "passed": 0}
    result.update(ok=proc.returncode == 0 and result.get("tests", 0) > 0, seconds=round(time.monotonic() - t0, 1))
    if not result["ok"]:
        result["output_tail"] = out
    return result


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps: int, warmup: int = 2) -> float:
    """Median wall time of fn in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_time_us(fn, device, calls: int = 20) -> float:
    """Mean host time of one call in microseconds: what the Python wrapper, the dispatcher and
    the launch code cost, whatever the device does."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    _sync(device)
    return host


def graph_ms(fn, device, reps: int) -> float | None:
    """Median time of one replay of ``fn`` captured in a CUDA graph (the device's work alone);
    None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, device, reps)


def _placed(t: torch.Tensor, dtype, device, offset: int = 0) -> torch.Tensor:
    """t as a contiguous tensor of `dtype` on `device` whose data starts `offset` elements into
    its allocation (offset > 0: not 16-byte aligned, so the kernels take their scalar path)."""
    buf = torch.empty(t.numel() + offset, dtype=dtype, device=device)
    view = buf[offset:].view(t.shape)
    view.copy_(t)
    return view


def bench_project(device, dtype, layout: str, lora_width: int = LORA_WIDTH, flat: int = FLAT,
                  reps: int = 30, loop_reps: int = 5) -> dict:
    import spard_ext

    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(16, lora_width), (lora_width, 16)] * 128 if layout.startswith("lora") else [(flat,)]
    offset = 1 if layout == "flat misaligned" else 0  # one element past a 16-byte boundary: scalar loads
    x = [_placed(torch.randn(s, generator=g, device=device), dtype, device, offset) for s in shapes]
    a = [_placed(torch.randn(s, generator=g, device=device) * 1e-3, dtype, device, offset) for s in shapes]
    n = sum(t.numel() for t in x)
    esize = torch.empty((), dtype=dtype).element_size()
    moved = 5 * n * esize  # the reduction reads x and a, the update reads x and a and writes x
    b, cap = -1e6, 1e-9  # far outside the half-space: the capped step is always taken
    call = lambda: spard_ext.project_(x, a, b, max_step=cap, use_dot=True)  # noqa: E731
    if layout == "lora layout":  # the same list as parameters laid out flat (spard_ext.FlatLayout), as SPAG does
        params = [torch.nn.Parameter(t.clone()) for t in x]
        x = spard_ext.FlatLayout(params)
        grads = x.zeros()
        torch._foreach_copy_(x.views(grads), a)
        a = grads
        call = lambda: spard_ext.project_(x, a, b, max_step=cap, use_dot=True)  # noqa: E731
    fused = time_ms(call, device, reps)
    host_us = host_time_us(call, device)
    graph = graph_ms(call, device, reps)
    src = torch.empty(int(2.5 * n), dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), device, reps)  # 2.5 n read + 2.5 n written = 5 n elements
    del src, dst
    row = {"layout": layout, "dtype": str(dtype).replace("torch.", ""), "elements": n, "tensors": len(shapes),
           "bytes_moved": moved, "fused_ms": round(fused, 4), "copy_floor_ms": round(copy, 4),
           "fused_gbs": round(moved / fused / 1e6, 1), "copy_gbs": round(moved / copy / 1e6, 1),
           "copy_fraction": round(copy / fused, 3), "host_us": round(host_us, 1)}
    if graph is not None:  # the kernels alone, without the host's work of a call
        row.update(graph_ms=round(graph, 4), graph_copy_fraction=round(copy / graph, 3))
    if layout == "lora":
        loop_fn = _bench("bench_project").per_tensor_loop  # a host read per tensor; its step cap is also 1e-9
        loop = time_ms(lambda: loop_fn(x, a, torch.tensor(b)), device, loop_reps, warmup=1)
        row.update(loop_ms=round(loop, 3), loop_speedup=round(loop / fused, 1))
    return row


def bench_dpp(device, n: int, d: int, k: int, method: str = "auto", runs: int = 2) -> dict:
    from spard_ext import dpp_greedy

    f = _bench("bench_dpp").rd_factor(n, d, device=device)  # generated on the device
    dpp_greedy(factor=f, k=min(k, 5), method=method)  # warm-up (allocations, first launches)
    times, picks = [], 0
    for _ in range(runs):
        if times and times[0] > 20:  # one slow run says enough, and keeps the budget
            break
        _sync(device)
        t0 = time.perf_counter()
        res = dpp_greedy(factor=f, k=k, method=method)
        _sync(device)
        times.append(time.perf_counter() - t0)
        picks = int(res.indices.numel())
    del f
    return {"n": n, "d": d, "k": k, "method": method, "picks": picks, "seconds": round(statistics.median(times), 4),
            "runs": len(times)}


def _rel(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(b), 1e-30)


def parity_project(device, cases: int, seed: int = 0) -> dict:
    """Random project_ cases on `device` against the CPU backend."""
    import spard_ext

    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    tol = {torch.float32: 1e-5, torch.float64: 1e-6, torch.bfloat16: 1.6e-2, torch.float16: 1e-3}
    g = torch.Generator().manual_seed(seed)
    worst = {"coef": 0.0, "sqnorm": 0.0}
    bad = []
    for case in range(cases):
        r = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731
        tx, ta = dtypes[r(4)], dtypes[r(4)]
        shapes = [(r(5000) + 1,) if r(3) else (r(70) + 1, r(70) + 1) for _ in range(r(12) + 1)]
        x_off, a_off = r(3), r(3)  # 0: aligned starts; else tensors that start that many elements in
        xs = [torch.randn(s, generator=g).to(tx) for s in shapes]
        as_ = [torch.randn(s, generator=g).to(ta) for s in shapes]
        use_dot, cap = bool(r(2)), [math.inf, 1e-3][r(2)]
        b = -float(r(100) + 1)
        want_x = [t.clone() for t in xs]
        want = spard_ext.project_(want_x, as_, b, max_step=cap, use_dot=use_dot)
        got_x = [_placed(t, tx, device, x_off) for t in xs]
        got_a = [_placed(t, ta, device, a_off) for t in as_]
        got = spard_ext.project_(got_x, got_a, b, max_step=cap, use_dot=use_dot)
        e_coef, e_sq = _rel(float(got.coef), float(want.coef)), _rel(float(got.sqnorm), float(want.sqnorm))
        worst["coef"], worst["sqnorm"] = max(worst["coef"], e_coef), max(worst["sqnorm"], e_sq)
        x_ok = all(torch.allclose(gx.cpu().double(), wx.double(), rtol=tol[tx], atol=tol[tx])
                   for gx, wx in zip(got_x, want_x))
        if e_coef > 1e-4 or e_sq > 1e-5 or not x_ok:
            bad.append({"case": case, "x_dtype": str(tx), "a_dtype": str(ta), "coef_rel": e_coef, "x_ok": x_ok})
    return {"cases": cases, "mismatches": len(bad), "worst_rel": worst, "examples": bad[:5]}


def parity_dpp(device, cases: int, seed: int = 0) -> dict:
    """Random dpp_greedy cases on `device` against the CPU backend (identical picks expected)."""
    from spard_ext import dpp_greedy

    g = torch.Generator().manual_seed(seed)
    bad, worst = [], 0.0
    for case in range(cases):
        r = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731
        n, d = r(3000) + 1, r(64) + 1
        f = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64)
        f = f.to([torch.float32, torch.float64][r(2)])
        kw = dict(k=r(100) + 1, eps=[1e-2, 1e-4, 1e-6][r(3)], method=["cholesky", "inverse", "auto"][r(3)])
        want = dpp_greedy(factor=f, **kw)
        got = dpp_greedy(factor=f.to(device), **kw)
        same = got.indices.cpu().tolist() == want.indices.tolist()
        if same and len(want.gains):
            worst = max(worst, float(((got.gains.cpu() - want.gains).abs() / want.gains.abs()).max()))
        if not same:
            bad.append({"case": case, "n": n, "d": d, **kw})
    return {"cases": cases, "mismatches": len(bad), "worst_gain_rel": worst, "examples": bad[:5]}


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _verdict(value, target, higher_is_better=True) -> str:
    if value is None:
        return "-"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


def render_markdown(report: dict) -> str:
    dev = report["device"]
    lines = [f"# GPU report: {dev['name']}", "",
             f"{report['date']} · torch {report['torch']} (CUDA {report['cuda']}) · capability {dev['capability']} · "
             f"{dev['multiprocessors']} SMs · {dev['memory_gib']} GiB · {report['seconds_total']} s in all", ""]
    b = report.get("build")
    if b:
        lines += [f"Build: {'ok' if b['ok'] else 'FAILED'} in {b['seconds']} s (arch {b['arch']}).", ""]
    t = report.get("tests")
    if t:
        if "tests" in t:
            lines += [f"CUDA tests: {t.get('passed', 0)} passed, {len(t.get('failed', []))} failed, "
                      f"{t.get('skipped', 0)} skipped of {t['tests']} ({t['seconds']} s)."]
            lines += [f"- failed: `{name}`" + (f": {t['reasons'][name]}" if t.get("reasons", {}).get(name) else "")
                      for name in t.get("failed", [])]
        else:
            lines += [f"CUDA tests: {t.get('note', 'not run')}."]
        lines += [""]
    lines += ["## CUDA results unverified before this run", "",
              "Written from reading and compiling the code, never run on a GPU before (benchmarks/README.md, "
              "\"Unverified on a GPU\"); what this run's tests say of each:", "",
              "| result | this run |", "| --- | --- |"]
    lines += [f"| {r['what']} | {r['status']} |" for r in report.get("unverified") or unverified_status(t)]
    lines += [""]
    rows = report.get("project", [])
    if rows:
        lines += ["## project_ (surgery form: reads x and a twice, writes x)", "",
                  "| layout | dtype | elements | fused (ms) | GB/s | copy floor (ms) | × copy bandwidth | "
                  "host per call (µs) | in a CUDA graph (ms) | × copy bandwidth | per-tensor loop (ms) | speedup |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['layout']} | {r['dtype']} | {r['elements']:,} | {r['fused_ms']} | {r['fused_gbs']} | "
                         f"{r['copy_floor_ms']} | {r['copy_fraction']} | {r.get('host_us', '-')} | "
                         f"{r.get('graph_ms', '-')} | {r.get('graph_copy_fraction', '-')} | {r.get('loop_ms', '-')} | "
                         f"{r.get('loop_speedup', '-')} |")
        lora = [r for r in rows if r["layout"] == "lora"]
        if lora:
            frac = min(r["copy_fraction"] for r in lora)
            speed = min(r["loop_speedup"] for r in lora)
            lines += ["", f"Targets (LoRA list): >= {TARGETS['copy_fraction']:.0%} of the copy bandwidth: "
                          f"{_verdict(frac, TARGETS['copy_fraction'])} (worst {frac}); >= {TARGETS['loop_speedup']:g}x "
                          f"the per-tensor loop: {_verdict(speed, TARGETS['loop_speedup'])} (worst {speed}x)."]
        flat_lora = [r for r in rows if r["layout"] == "lora layout"]
        if flat_lora:  # what SPAG's step runs: the eager call through its FlatLayout
            frac = min(r["copy_fraction"] for r in flat_lora)
            lines += ["", f"Target (eager call on the LoRA list laid out flat, as SPAG runs it): >= "
                          f"{TARGETS['copy_fraction']:.0%} of the copy bandwidth: "
                          f"{_verdict(frac, TARGETS['copy_fraction'])} (worst {frac})."]
        lines += [""]
    dpp = report.get("dpp", [])
    if dpp:
        lines += ["## dpp_greedy (float32 RD-DPP-shaped factor)", "",
                  "| N | D | k | method | picks | median (s) |", "| ---: | ---: | ---: | --- | ---: | ---: |"]
        lines += [f"| {r['n']:,} | {r['d']:,} | {r['k']:,} | {r['method']} | {r['picks']} | {r['seconds']} |" for r in dpp]
        big = [r for r in dpp if r["n"] >= 1_000_000]
        if big:
            lines += ["", f"Target N = 1,000,000, D = 1,024, k = 1,000 in <= {TARGETS['dpp_seconds']:g} s: "
                          f"{_verdict(big[0]['seconds'], TARGETS['dpp_seconds'], higher_is_better=False)}."]
        lines += [""]
    par = report.get("parity")
    if par:
        p, d = par.get("project"), par.get("dpp")
        lines += ["## CPU-vs-CUDA parity (random cases)", ""]
        if p:
            lines.append(f"- project_: {p['cases']} cases, {p['mismatches']} mismatches; worst relative difference "
                         f"coef {p['worst_rel']['coef']:.2e}, ||a||² {p['worst_rel']['sqnorm']:.2e}")
        if d:
            lines.append(f"- dpp_greedy: {d['cases']} cases, {d['mismatches']} with other picks; worst relative "
                         f"gain difference {d['worst_gain_rel']:.2e}")
        lines += [""]
    tp = report.get("train_parity")
    if tp:
        lines.append(f"- training (fp32 SPARD, {tp['steps']} steps, tiny Llama): "
                     f"{'same' if tp['ok'] else 'DIFFERENT'} on the GPU and the CPU; worst relative adapter "
                     f"difference {tp['worst_adapter_rel']:.2e}, loss {tp['worst_loss_rel']:.2e}; SPAG projections "
                     f"{tp['spag_triggers_device']} (GPU) / {tp['spag_triggers_cpu']} (CPU)")
        lines += [""]
    cost = report.get("train_cost")
    if cost:
        st = cost["setup"]
        m = st["model"]
        lines += ["## One optimizer step per defense (the one trainer on the GPU)", "",
                  f"Llama {m['num_hidden_layers']} x {m['hidden_size']} (vocab {m['vocab_size']}, "
                  f"{st['parameters'] / 1e6:.0f}M parameters) in {st['dtype']}, LoRA r={st['lora_r']} on q, k, v, o "
                  f"(fp32 adapters and optimizer state), sequences of {st['seq']} tokens, micro-batch "
                  f"{st['optim']['batch_size']} x accumulation {st['optim']['grad_accum']}; wall time per step "
                  f"(median of {st['timed_steps']}), peak memory = what the model holds + the step's peak above it.", "",
                  "| defense | step (ms) | x SFT | peak memory (MiB) | x SFT | alignment stage (s) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {n} | {d['step_ms']:.1f} | {d['step_ratio']:.2f} | {d['peak_mib']:.1f} | {d['memory_ratio']:.2f} | "
                  f"{d['alignment_stage_s']:.2f} |" for n, d in cost["defenses"].items()]
        if cost.get("skipped"):
            lines += ["", f"Not measured (time budget): {', '.join(cost['skipped'])}."]
        lines += [""]
    scale = report.get("train_cost_at_scale")
    if scale:
        lines += _render_scale(scale)
    errors = report.get("errors")
    if errors:
        lines += ["## Errors", ""] + [f"- {e}" for e in errors] + [""]
    skipped = report.get("skipped_phases")
    if skipped:
        lines += [f"Not run (time budget or options): {', '.join(skipped)}.", ""]
    return "\n".join(lines)


def _render_scale(scale: dict) -> list[str]:
    st = scale["setup"]
    lines = ["## One optimizer step per defense at the paper's scale", ""]
    if "micro_batch" not in st:
        return lines + ["SFT did not fit on this device at any micro-batch: " + "; ".join(scale.get("notes", [])), ""]
    m = st["model"]
    fits = ("the paper's micro-batch fits" if st["paper_micro_batch_fits"] else
            f"the largest micro-batch that fits ({'; '.join(scale.get('notes', []))})")
    lines += [f"Llama {m['num_hidden_layers']} x {m['hidden_size']} ({st['parameters'] / 1e9:.2f}B parameters, "
              f"random weights) in {st['dtype']}, LoRA r={st['lora_r']} on q, k, v, o, sequences of {st['seq']} "
              f"tokens, effective batch {st['effective_batch']} = micro-batch {st['micro_batch']} x accumulation "
              f"{st['grad_accum']} ({fits}). One defense at a time; wall time of the second step, peak memory over "
              "the second and third; SPARD's projection: device time inside `project_` during the third step "
              "(CUDA events) over that step's wall time.", "",
              "| defense | step (s) | x SFT | peak memory (GiB) | x SFT | projection (ms) | projection share |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, d in scale["defenses"].items():
        if "error" in d:
            lines.append(f"| {n} | {d['error']} | | | | | |")
            continue
        ratio = d.get("memory_ratio")
        lines.append(f"| {n} | {d['step_ms'] / 1e3:.2f} | {d['step_ratio']:.2f} | {d['peak_mib'] / 1024:.1f} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | {d.get('projection_ms', '-')} | "
                     f"{d.get('projection_share', '-')} |")
    if scale.get("skipped"):
        lines += ["", f"Not measured (time budget, in this order): {', '.join(scale['skipped'])}."]
    return lines + [""]


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """Writes gpu_<device>.json and .md atomically (temp file, then rename); returns the paths."""
    from spard.io import write_json_atomic, write_text_atomic

    stem = f"gpu_{device_slug(report['device']['name'])}"
    json_path, md_path = Path(out_dir) / f"{stem}.json", Path(out_dir) / f"{stem}.md"
    write_json_atomic(json_path, report)
    write_text_atomic(md_path, render_markdown(report))
    return json_path, md_path


def device_info(device) -> dict:
    if torch.device(device).type != "cuda":
        return {"name": platform.processor() or "cpu", "capability": "-", "multiprocessors": "-", "memory_gib": "-"}
    p = torch.cuda.get_device_properties(device)
    return {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1)}


def measure(report: dict, device, deadline: Deadline, small: bool) -> None:
    """The benchmarks and parity checks, each phase only while the budget allows."""
    skipped = report.setdefault("skipped_phases", [])

    def phase(name: str, need_s: float, fn):
        if deadline.left() < need_s:
            skipped.append(name)
            return None
        try:
            return fn()
        except Exception as exc:  # one phase failing must not lose the others
            report.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}"[:500])
            return None

    sizes = dict(lora_width=64, flat=10_001, reps=3, loop_reps=1) if small else {}
    report["project"] = []
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("lora", "lora layout", "flat", "flat misaligned"):
            row = phase(f"project_ {layout} {dtype}", 20, lambda: bench_project(device, dtype, layout, **sizes))
            if row:
                report["project"].append(row)
    dpp_cases = [(2_000, 64, 50, "auto"), (1_000, 32, 40, "cholesky")] if small else [
        (1_000_000, 1024, 1000, "auto"), (50_000, 256, 500, "cholesky")]
    report["dpp"] = []
    for n, d, k, method in dpp_cases:
        row = phase(f"dpp_greedy N={n}", 60, lambda: bench_dpp(device, n, d, k, method, runs=1 if small else 2))
        if row:
            report["dpp"].append(row)
    report["parity"] = {
        "project": phase("parity project_", 30, lambda: parity_project(device, 10 if small else 200)),
        "dpp": phase("parity dpp_greedy", 30, lambda: parity_dpp(device, 4 if small else 40)),
    }
    train = _bench("gpu_train")
    report["train_parity"] = phase("training parity", 30, lambda: train.train_parity(device))
    defense_names = _bench("bench_defenses").cost_names

    cost_kw = dict(model_kw=train.PARITY_MODEL, seq=64, rounds=1, steps=1,
                   optim=dict(train.GPU_OPTIM, batch_size=2, grad_accum=2)) if small else {}
    report["train_cost"] = phase("defense cost", 90, lambda: train.train_cost(
        device, defense_names(), deadline=deadline, **cost_kw))
    # last: the paper's scale (a model of 7B shapes), as many defenses as the budget reaches
    scale_kw = dict(model_kw=train.PARITY_MODEL, seq=32, lora_r=4, batch=4, micro_sizes=(8, 2)) if small else {}
    scale_names = ["sft", "spard", "lisa"] if small else defense_names()
    report["train_cost_at_scale"] = phase("defense cost at 7B shapes", 120, lambda: train.train_cost_at_scale(
        device, scale_names, deadline=deadline, **scale_kw))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report files")
    parser.add_argument("--skip-build", action="store_true", help="use the extension as it is built")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole report")
    args = parser.parse_args(argv)
    problem = preflight(args.skip_build)
    if problem:
        print(problem)
        return 2
    sys.path[:0] = [str(ROOT), str(ROOT / "python")]
    deadline = Deadline(args.budget)
    t0 = time.monotonic()
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "cuda": torch.version.cuda,
              "device": device_info("cuda"), "targets": TARGETS}
    failed = False
    if not args.skip_build:
        report["build"] = build(deadline)
        print(f"gpu-report: build {'ok' if report['build']['ok'] else 'FAILED'} in {report['build']['seconds']} s",
              flush=True)
        if not report["build"]["ok"]:
            failed = True
            print(report["build"]["log_tail"])
    if not failed and not args.skip_tests:
        report["tests"] = run_cuda_tests(deadline)
        failed = not report["tests"]["ok"]
        print(f"gpu-report: CUDA tests {'ok' if not failed else 'FAILED'}: {report['tests'].get('passed', 0)} passed, "
              f"{len(report['tests'].get('failed', []))} failed", flush=True)
    if report.get("build", {"ok": True})["ok"]:
        try:
            import spard_ext

            cuda_kernels = spard_ext.CUDA_KERNELS
        except ImportError as exc:  # --skip-build with no extension built
            report["errors"], cuda_kernels = [f"cannot import spard_ext: {exc}"], None
        if cuda_kernels:
            measure(report, "cuda", deadline, small=False)
        elif cuda_kernels is not None:
            report["errors"] = ["the extension was built without the CUDA kernels"]
    report["unverified"] = unverified_status(report.get("tests"))
    report["seconds_total"] = round(time.monotonic() - t0, 1)
    json_path, md_path = write_report(report, args.out)
    print(render_markdown(report))
    print(f"gpu-report: wrote {md_path.relative_to(ROOT) if md_path.is_relative_to(ROOT) else md_path} and "
          f"{json_path.name}", flush=True)
    return 1 if failed or report.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
