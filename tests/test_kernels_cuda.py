"""CUDA kernels of spard_ext: what the CPU tests cannot reach (run where a GPU is present;
`make gpu-report` runs them with the benchmarks).

- no host synchronisation in project_ for every kind of b, and capture in a CUDA graph;
- the 128-bit vectorised paths against the scalar fallback (aligned and misaligned starts,
  odd sizes, every dtype pair), launches split over many tensors, parity with the CPU backend;
- empty lists and the device of a call with a CPU b;
- dpp_greedy: no launch after the stop rule, one host read per call, input checks raised after
  the loop, the Cholesky update at sizes where items outnumber threads;
- what the issue-22 audit found by reading the CUDA code (each test fails on the code before the
  fix): float64 products in the reduce, no busy-spinning host thread, the pinned progress block
  not reused under queued kernels after an exception, no harm to another thread's global-mode
  graph capture, and a CPU-tensor b captured by value (documented).
"""

import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import spard_ext
from spard_ext import dpp_greedy, project_, project_apply_, project_reduce
from spard_ext import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not (torch.cuda.is_available() and spard_ext.CUDA_KERNELS),
                       reason="needs a CUDA device and a CUDA build"),
]

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-6, atol=1e-9),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def lists(shapes, x_dtype=torch.float32, a_dtype=None, seed=0, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(s, generator=g).to(device=device, dtype=x_dtype) for s in shapes]
    a = [torch.randn(s, generator=g).to(device=device, dtype=a_dtype or x_dtype) for s in shapes]
    return x, a


def assert_matches_cpu(x, a, b, max_step, use_dot):
    """Runs project_ on the CUDA lists and on CPU copies; results agree to the dtype's rounding."""
    x_cpu = [t.cpu() for t in x]
    a_cpu = [t.cpu() for t in a]
    b_cpu = b.cpu() if isinstance(b, torch.Tensor) else b
    want = project_(x_cpu, a_cpu, b_cpu, max_step=max_step, use_dot=use_dot)
    got = project_(x, a, b, max_step=max_step, use_dot=use_dot)
    assert got.coef.device.type == "cuda"
    torch.testing.assert_close(got.sqnorm.cpu(), want.sqnorm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.dot.cpu(), want.dot, rtol=1e-5, atol=1e-4)
    assert float(got.coef) == pytest.approx(float(want.coef), rel=1e-5, abs=1e-12)
    for g_t, w_t in zip(x, x_cpu):
        torch.testing.assert_close(g_t.cpu(), w_t, **TOL[w_t.dtype])


# ------------------------------------------------------------------------------------------------
# project_: no host synchronisation, CUDA graphs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b_kind", ["float", "cpu tensor", "cuda tensor", "cuda float64 tensor"])
def test_no_host_sync_for_any_b(b_kind):
    x, a = lists([(33, 7), (4096, 16), (5,)])
    x.append(torch.randn(64, 48, device="cuda").t())  # non-contiguous: worked on through a copy
    a.append(torch.randn(48, 64, device="cuda"))
    b = {"float": -50.0, "cpu tensor": torch.tensor(-50.0), "cuda tensor": torch.tensor(-50.0, device="cuda"),
         "cuda float64 tensor": torch.tensor(-50.0, dtype=torch.float64, device="cuda")}[b_kind]
    cpu_dot, cpu_sq = torch.tensor(0.0), torch.tensor(1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        res = project_(x, a, b, max_step=1.0, use_dot=True)
        dot, sq = project_reduce(x, a)
        coef = project_apply_(x, a, dot, sq, b, use_dot=True)
        coef2 = project_apply_(x, a, cpu_dot, cpu_sq, b)  # sums given as CPU scalars
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.coef.device.type == coef.device.type == coef2.device.type == "cuda"
    assert float(res.coef) > 0


@pytest.mark.parametrize("b_kind", ["float", "cuda tensor"])
def test_capture_in_a_cuda_graph(b_kind):
    x, a = lists([(17, 5), (70001,), (3,)], seed=1)
    b_dev = torch.tensor(-3.0, device="cuda")
    b = -3.0 if b_kind == "float" else b_dev
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        project_([t.clone() for t in x], a, b, max_step=0.5, use_dot=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = project_(x, a, b, max_step=0.5, use_dot=True)
    for seed, b_value in ((2, -3.0), (3, -7.0)):
        fresh, _ = lists([(17, 5), (70001,), (3,)], seed=seed)
        for t, f in zip(x, fresh):
            t.copy_(f)
        if b_kind == "cuda tensor":
            b_dev.fill_(b_value)  # read at replay time
        else:
            b_value = -3.0  # a float is part of the captured launch
        want_x, want_coef, _, _ = ref.project([t.cpu() for t in fresh], [t.cpu() for t in a], b_value, 0.5, True)
        graph.replay()
        torch.cuda.synchronize()
        assert float(res.coef) == pytest.approx(want_coef, rel=1e-5)
        for t, w in zip(x, want_x):
            torch.testing.assert_close(t.cpu(), w, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------
# project_: vectorised and scalar paths, launches, parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dot", [False, True])
def test_aligned_and_misaligned_starts_and_odd_sizes(x_dtype, a_dtype, use_dot):
    g = torch.Generator().manual_seed(5)
    for x_off, a_off in ((0, 0), (1, 0), (0, 3), (2, 1)):
        for n in (1, 3, 7, 31, 32767, 32769, 65541):
            x_base = torch.randn(n + 8, generator=g).to("cuda", x_dtype)
            a_base = torch.randn(n + 8, generator=g).to("cuda", a_dtype)
            x = [x_base[x_off:x_off + n]]  # contiguous, but not 16-byte aligned when off > 0
            a = [a_base[a_off:a_off + n]]
            before_x = x_base.clone()
            b = -2 * float(ref.project_reduce([t.cpu() for t in x], [t.cpu() for t in a])[0].abs()) - 5.0
            assert_matches_cpu(x, a, b, math.inf, use_dot)
            # the elements around the view are never written
            assert torch.equal(x_base[:x_off], before_x[:x_off])
            assert torch.equal(x_base[x_off + n:], before_x[x_off + n:])


def test_more_tensors_than_one_launch_holds():
    shapes = [((i * 7919) % 3000 + 1,) for i in range(300)] + [(70000,), (0,), (1,)]
    x, a = lists(shapes, seed=6)
    x[5] = x[5].to(torch.bfloat16)  # a second dtype pair: another group of launches
    assert_matches_cpu(x, a, -10.0, math.inf, True)


@pytest.mark.parametrize("seed", range(8))
def test_parity_with_cpu_on_random_lists(seed):
    g = torch.Generator().manual_seed(100 + seed)
    n_tensors = int(torch.randint(1, 40, (1,), generator=g))
    shapes = [tuple(int(v) for v in torch.randint(0, 300, (int(torch.randint(1, 3, (1,), generator=g)),),
                                                   generator=g)) for _ in range(n_tensors)]
    x_dtype = DTYPES[seed % 4]
    a_dtype = DTYPES[(seed // 2) % 4]
    x, a = lists(shapes, x_dtype, a_dtype, seed=seed)
    use_dot = bool(seed % 2)
    max_step = [math.inf, 1e-3, 0.5][seed % 3]
    assert_matches_cpu(x, a, -float(seed + 1), max_step, use_dot)


def test_overflow_is_the_same_no_op_as_on_the_cpu():
    x, a = [torch.zeros(2, device="cuda")], [torch.full((2,), 1.5e19, device="cuda")]
    got = project_(x, a, -1.0)
    assert float(got.coef) == 0.0 and math.isinf(float(got.sqnorm))
    assert torch.equal(x[0], torch.zeros(2, device="cuda"))


def test_version_counter_and_no_partial_update():
    x, a = lists([(10,), (4,)])
    before = [t._version for t in x]
    project_(x, a, -1.0)
    assert all(t._version > v for t, v in zip(x, before))
    good = x[0].clone()
    with pytest.raises(ValueError, match=r"x\[1\] .*share memory"):
        project_([x[0], torch.zeros(1, device="cuda").expand(4)], a, -1.0)
    assert torch.equal(x[0], good)


# ------------------------------------------------------------------------------------------------
# project_: empty lists, devices
# ------------------------------------------------------------------------------------------------
def test_project_reduce_accepts_an_empty_list():
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    dot, sq = torch.ops.spard_ext.project_reduce.default.redispatch(keys, [], [], True)
    assert dot.device.type == sq.device.type == "cuda"
    assert float(dot) == 0.0 and float(sq) == 0.0
    dot, sq = project_reduce([], [], device="cuda")
    assert dot.device.type == "cuda"


def test_empty_x_with_a_cpu_b_runs_on_the_device_of_the_sums():
    dot = torch.tensor(5.0, device="cuda")
    sq = torch.tensor(2.0, device="cuda")
    coef = project_apply_([], [], dot, sq, b=1.0, use_dot=True)  # b is a CPU scalar
    assert coef.device.type == "cuda" and float(coef) == pytest.approx(2.0)
    res = project_([], [], b=torch.tensor(-1.0, device="cuda"))
    assert res.coef.device.type == "cuda" and float(res.coef) == 0.0


def test_error_devices_differ_names_the_entry():
    with pytest.raises(ValueError, match=r"x\[1\] is on cpu"):
        project_([torch.zeros(2, device="cuda"), torch.zeros(2)], [torch.zeros(2, device="cuda"), torch.zeros(2)])


# ------------------------------------------------------------------------------------------------
# dpp_greedy
# ------------------------------------------------------------------------------------------------
def _factor(n, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (f * torch.rand(n, 1, generator=g, dtype=torch.float64).add(0.2)).to(dtype)


def _kernel_names(prof):
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("method", ["cholesky", "inverse"])
def test_no_launches_after_the_stop_rule(method):
    f = _factor(2000, 4, seed=1).cuda()
    dpp_greedy(factor=f, k=5, method=method)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = dpp_greedy(factor=f, k=1000, eps=1e-6, eps_stop=1e-3, method=method)
        torch.cuda.synchronize()
    assert len(res.indices) == 4  # the rank of F
    steps = sum("argmax_partial" in name for name in _kernel_names(prof))
    assert 0 < steps <= 4 + 1 + 8 + 1, steps  # picks, the step that stops, the lookahead (8), slack


# CUDA runtime calls that make the host wait for the device.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


@pytest.mark.parametrize("dense", [False, True])
def test_one_host_read_per_call(dense):
    # Counted from the CUDA runtime calls the profiler records: torch's sync-debug warning is
    # raised inside the op and, from a torch.ops call, goes to the C++ warning handler (stderr),
    # not to Python's warnings (the first GPU run counted 0).
    n = 300
    f = _factor(n, 8, seed=2).cuda()
    mat = (f @ f.T) if dense else f
    include = torch.zeros(n, dtype=torch.bool, device="cuda")
    include[[3, 10]] = True
    exclude = torch.zeros(n, dtype=torch.bool, device="cuda")
    exclude[7] = True
    kw = dict(k=20, include=include, exclude=exclude)
    dpp_greedy(mat, **kw) if dense else dpp_greedy(factor=mat, **kw)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        res = dpp_greedy(mat, **kw) if dense else dpp_greedy(factor=mat, **kw)
    syncs = [e.name for e in prof.events() if e.name in SYNC_CALLS]
    assert len(syncs) == 1, syncs
    # a dense kernel of rank 8 stops at 8 picks; the low-rank form has the ridge and goes on to k
    cpu_kw = dict(k=20, include=include.cpu(), exclude=exclude.cpu())
    want = dpp_greedy(mat.cpu(), **cpu_kw) if dense else dpp_greedy(factor=mat.cpu(), **cpu_kw)
    assert res.indices.numel() == (8 if dense else 20)
    assert res.indices.cpu().tolist() == want.indices.tolist()


def test_input_checks_raise_after_the_loop():
    f = _factor(50, 4, seed=3).cuda()
    bad = f.clone()
    bad[3, 1] = math.nan
    with pytest.raises(ValueError, match="factor must be finite"):
        dpp_greedy(factor=bad, k=5)
    kernel = (f @ f.T).contiguous()
    kernel[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        dpp_greedy(kernel, k=5)
    with pytest.raises(ValueError, match="share"):
        dpp_greedy(factor=f, k=5, include=[1], exclude=[1, 2])


def test_capture_is_refused_with_a_clear_error():
    f = _factor(50, 4, seed=3).cuda()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            dpp_greedy(factor=f, k=5)


@pytest.mark.parametrize("n,d,k", [(50_000, 32, 120), (20_001, 37, 60)])
def test_cholesky_update_at_many_items(n, d, k):
    # more items than threads per block and more picks than kPickSplit; D = 37 reads rows with
    # scalar loads, D = 32 with 16-byte loads
    f = _factor(n, d, seed=4, dtype=torch.float32)
    cpu = dpp_greedy(factor=f, k=k, eps=1e-4, method="cholesky")
    gpu = dpp_greedy(factor=f.cuda(), k=k, eps=1e-4, method="cholesky")
    assert gpu.indices.cpu().tolist() == cpu.indices.tolist()
    torch.testing.assert_close(gpu.gains.cpu(), cpu.gains, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", ["cholesky", "inverse"])
def test_misaligned_factor_rows(method):
    n, d = 3000, 64
    flat = _factor(n * d + 1, 1, seed=5, dtype=torch.float32).reshape(-1).cuda()
    f = flat[1:].view(n, d)  # contiguous, 4 bytes past a 16-byte boundary: scalar loads
    assert f.data_ptr() % 16 != 0
    cpu = dpp_greedy(factor=f.cpu(), k=40, eps=1e-4, method=method)
    gpu = dpp_greedy(factor=f, k=40, eps=1e-4, method=method)
    assert gpu.indices.cpu().tolist() == cpu.indices.tolist()
    torch.testing.assert_close(gpu.gains.cpu(), cpu.gains, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# From the issue-22 audit (read and compiled, first run on a GPU pending: see benchmarks/README.md)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 4099])  # the scalar loop, and the 16-byte vector loop
def test_products_that_leave_float32_are_formed_in_float64(n):
    # 3e38 * 2 is inf in float32: two such products of opposite sign summed to NaN and the call
    # did nothing, where the CPU (float64 products) sums them to 0 and steps with coef 1.
    pairs = (n - 1) // 2
    x = torch.tensor([3e38, 3e38] * pairs + [0.0] * (n - 2 * pairs), dtype=torch.float32)
    a = torch.tensor([2.0, -2.0] * pairs + [1.0] * (n - 2 * pairs), dtype=torch.float32)
    sq = float((a.double() ** 2).sum())
    want = project_([x.clone()], [a], -sq, use_dot=True)
    assert float(want.coef) == 1.0 and float(want.dot) == 0.0
    x_gpu = [x.cuda()]
    got = project_(x_gpu, [a.cuda()], -sq, use_dot=True)
    assert float(got.dot) == 0.0 and float(got.sqnorm) == pytest.approx(sq, rel=1e-6)
    assert float(got.coef) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(x_gpu[0].cpu(), x - a, rtol=1e-6, atol=0)
    dot, sqnorm = project_reduce(x_gpu, [a.cuda()])
    assert math.isfinite(float(dot)) and math.isfinite(float(sqnorm))


def test_dpp_greedy_does_not_spin_the_calling_thread():
    # A call whose time is the device's: the host thread waits most of it, sleeping (the thread's
    # CPU time stays well under the call's wall time; a busy loop makes them equal). A resource
    # bound, not a speed one: a slower or faster GPU only changes how long both take.
    f = _factor(400_000, 64, seed=7, dtype=torch.float32).cuda()
    dpp_greedy(factor=f, k=5, method="cholesky")  # warm-up
    torch.cuda.synchronize()
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    dpp_greedy(factor=f, k=300, eps=1e-4, method="cholesky")
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    assert cpu < 0.5 * wall, (cpu, wall)


_REUSE_SCRIPT = """
import torch, spard_ext
f = torch.randn(2_000_000, 64, device="cuda")
spard_ext.dpp_greedy(factor=f, k=3, method="cholesky")  # warm-up (no fault before step 6)
torch.cuda.synchronize()
try:
    spard_ext.dpp_greedy(factor=f, k=50, method="cholesky")
except RuntimeError as e:
    assert "fault injected at step 6" in str(e), e
else:
    raise SystemExit("no fault was injected")
# pinned blocks of the progress block's size, taken at once: one is the block the call released
blocks = [torch.full((2,), -7, dtype=torch.long, pin_memory=True) for _ in range(16)]
torch.cuda.synchronize()
print("overwritten" if any(b.tolist() != [-7, -7] for b in blocks) else "intact")
"""


def test_progress_block_is_not_reused_under_queued_kernels_after_an_exception():
    env = {**os.environ, "SPARD_EXT_DPP_FAULT_STEP": "6"}
    out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "intact"


def test_dpp_greedy_leaves_another_threads_global_capture_valid():
    f = _factor(5000, 16, seed=8).cuda()
    want = dpp_greedy(factor=f, k=30)  # also initialises everything the call needs
    x = torch.zeros(1000, device="cuda")
    capturing, called = threading.Event(), threading.Event()
    errors, results = [], []

    def capture():
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # capture_error_mode="global", torch's default
                x.add_(1.0)
                capturing.set()
                called.wait(timeout=120)
                x.mul_(2.0)
            graph.replay()
            torch.cuda.synchronize()
            results.append(x.clone())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            capturing.set()

    t = threading.Thread(target=capture)
    t.start()
    assert capturing.wait(timeout=120)
    try:
        got = dpp_greedy(factor=f, k=30)  # no masks: their index form reads the host
    finally:
        called.set()
        t.join(timeout=120)
    assert not errors, errors
    assert got.indices.cpu().tolist() == want.indices.cpu().tolist()
    assert torch.equal(results[0], torch.full_like(x, 2.0))  # (0 + 1) * 2, once


def test_a_cpu_tensor_b_is_captured_by_value():
    # Documented (csrc/cuda/project_cuda.cu, docs): the kernels read a CPU scalar on the host, so a
    # captured graph holds its value at capture time; a b that changes between replays must be a
    # device tensor.
    x, a = lists([(4096,)], seed=9)
    b_cpu = torch.tensor(-3.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        project_([t.clone() for t in x], a, b_cpu)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = project_(x, a, b_cpu)
    fresh, _ = lists([(4096,)], seed=10)
    x[0].copy_(fresh[0])
    b_cpu.fill_(-7.0)  # not seen by the replay
    graph.replay()
    torch.cuda.synchronize()
    _, want_coef, _, _ = ref.project([fresh[0].cpu()], [a[0].cpu()], -3.0, math.inf, False)
    assert float(res.coef) == pytest.approx(want_coef, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# The CPU kernels' rules of issue 22, mirrored in the CUDA kernels: the same result as the CPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cholesky", "inverse"])
@pytest.mark.parametrize("dense", [False, True])
def test_an_include_item_that_cannot_be_picked_does_not_end_the_selection(method, dense):
    f = _factor(40, 8, seed=11)
    f[10] = f[1]  # a duplicate of an included item: its gain is ~0 once row 1 is picked
    mat = f @ f.T if dense else f
    kw = dict(k=6, include=[1, 10]) if dense else dict(k=6, include=[1, 10], method=method)
    cpu = dpp_greedy(mat, **kw) if dense else dpp_greedy(factor=mat, **kw)
    gpu = dpp_greedy(mat.cuda(), **kw) if dense else dpp_greedy(factor=mat.cuda(), **kw)
    assert cpu.indices.numel() == 6 and cpu.indices[0] == 1
    assert gpu.indices.cpu().tolist() == cpu.indices.tolist()
    torch.testing.assert_close(gpu.gains.cpu(), cpu.gains, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_beyond_float32_is_applied_as_on_the_cpu(fused):
    # a = 1e-20: ||a||² = 1e-40 (a float32 subnormal), the step 1e40 leaves float32
    x, a = [torch.zeros(3)], [torch.full((3,), 1e-20)]

    def run(xs, as_):
        if fused:
            return project_(xs, as_, -1.0).coef
        dot, sq = project_reduce(xs, as_, use_dot=False)
        return project_apply_(xs, as_, dot, sq, -1.0)

    got_x = [torch.zeros(3, device="cuda")]
    want_coef = run(x, a)
    got_coef = run(got_x, [a[0].cuda()])
    assert float(got_coef) == float(want_coef)
    torch.testing.assert_close(got_x[0].cpu(), x[0], rtol=1e-6, atol=0)


def test_x_entries_that_share_memory_are_refused_as_on_the_cpu():
    t_cpu = torch.zeros(8)
    with pytest.raises(Exception) as cpu_error:
        project_([t_cpu, t_cpu], [torch.ones(8), torch.ones(8)], -1.0)
    t = torch.zeros(8, device="cuda")
    base = torch.zeros(16, device="cuda")
    for x in ([t, t], [base[:10], base[6:]]):
        with pytest.raises(type(cpu_error.value), match=r"x\[0\] and x\[1\] share memory"):
            project_(x, [torch.ones_like(v) for v in x], -1.0)
    assert torch.equal(t, torch.zeros(8, device="cuda")) and torch.equal(base, torch.zeros(16, device="cuda"))
    project_([base[:8], base[8:]], [torch.ones(8, device="cuda")] * 2, -1.0)  # views that do not meet pass


# ----------------------------------------------------------------------------------------------
# FlatLayout on the device: what SPAG's step runs
# ----------------------------------------------------------------------------------------------
def test_flat_layout_on_cuda_equals_the_list_call_and_captures():
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(16, 200), (200, 16), (7,), (0, 3)] * 8
    dtypes = [torch.float32, torch.bfloat16]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda").to(dtypes[i % 2]))
          for i, s in enumerate(shapes)]
    qs = [p.detach().clone() for p in ps]
    gs = [(torch.randn(p.shape, generator=g, device="cuda") * 1e-2).to(p.dtype) for p in ps]
    layout = spard_ext.FlatLayout(ps)
    assert len(layout.buffers) == 2 and all(b.is_cuda for b in layout.buffers)
    a = layout.zeros()
    torch._foreach_copy_(layout.views(a), gs)
    res = project_(layout, a, -0.5, max_step=1e3, use_dot=True)
    ref_res = project_(qs, gs, -0.5, max_step=1e3, use_dot=True)
    torch.testing.assert_close(res.coef, ref_res.coef, rtol=1e-5, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q, **TOL[p.dtype])
    # the layout call in a CUDA graph: the staleness check runs on the host at capture
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        project_(layout, a, -0.5, max_step=1e-6, use_dot=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        project_(layout, a, -0.5, max_step=1e-6, use_dot=True)
    before = layout.buffers[0].clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(layout.buffers[0], before)
