"""CUDA kernels of spard_ext: what the CPU tests cannot reach (run where a GPU is present;
`make gpu-report` runs them with the benchmarks).

- no host synchronisation in project_ for every kind of b, and capture in a CUDA graph;
- the 128-bit vectorised paths against the scalar fallback (aligned and misaligned starts,
  odd sizes, every dtype pair), launches split over many tensors, parity with the CPU backend;
- empty lists and the device of a call with a CPU b;
- dpp_greedy: no launch after the stop rule, one host read per call, input checks raised after
  the loop, the Cholesky update at sizes where items outnumber threads.
"""

import math
import warnings

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
    assert 0 < steps <= 4 + 1 + 4 + 1, steps  # picks, the step that stops, the lookahead, slack


@pytest.mark.parametrize("dense", [False, True])
def test_one_host_read_per_call(dense, capfd):
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
    capfd.readouterr()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = dpp_greedy(mat, **kw) if dense else dpp_greedy(factor=mat, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # A warning raised inside a torch.ops call (the op's own host read) goes to the C++ warning
    # handler, which prints it on stderr, not to Python's warnings (on the CPU:
    # torch.ops.aten.add.out with a wrongly sized out does the same); one from Python code
    # (the wrapper) reaches warnings. Count both.
    in_python = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    in_ops = [line for line in capfd.readouterr().err.splitlines() if "synchroniz" in line]
    assert len(in_python) + len(in_ops) == 1, (in_python, in_ops)
    # the factor form goes past the rank of F (every gain is at least eps); the dense rank-8
    # kernel stops at its rank (test_dpp.py checks the CPU gives the same 8)
    assert res.indices.numel() == (8 if dense else 20)


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
