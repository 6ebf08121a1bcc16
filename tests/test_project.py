"""project_ / project_reduce / project_apply_ against the plain-torch reference."""

import math

import pytest
import torch
from torch.library import opcheck

import spard_ext
from spard_ext import project_, project_apply_, project_reduce
from spard_ext import reference as ref

from conftest import requires_cuda

TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-6, atol=1e-9),  # the coefficient is a float32
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
}


def lora_shapes(n_layers=64):
    # q,k,v,o LoRA A (r x d) and B (d x r) pairs: 256 tensors of 16x4096 / 4096x16.
    return [(16, 4096), (4096, 16)] * (2 * n_layers)


def make_lists(shapes, x_dtype=torch.float32, a_dtype=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    a_dtype = a_dtype or x_dtype
    x = [torch.randn(s, generator=g).to(device=device, dtype=x_dtype) for s in shapes]
    a = [torch.randn(s, generator=g).to(device=device, dtype=a_dtype) for s in shapes]
    return x, a


def check_against_reference(x, a, b, max_step, use_dot, device="cpu"):
    want_x, want_coef, want_dot, want_sq = ref.project([t.cpu() for t in x], [t.cpu() for t in a], b, max_step, use_dot)
    got = project_(x, a, b, max_step=max_step, use_dot=use_dot)
    torch.testing.assert_close(got.sqnorm.cpu(), want_sq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.dot.cpu(), want_dot, rtol=1e-5, atol=1e-5)
    assert float(got.coef) == pytest.approx(want_coef, rel=1e-5, abs=1e-12)
    for got_t, want_t in zip(x, want_x):
        if got_t is None:
            assert want_t is None
            continue
        torch.testing.assert_close(got_t.cpu(), want_t, **TOL[got_t.dtype])
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("use_dot", [False, True])
def test_matches_reference_odd_sizes(dtype, use_dot):
    shapes = [(3, 5), (1,), (0,), (7, 0, 2), (33,), (65537,), (2, 3, 4)]
    x, a = make_lists(shapes, dtype)
    # b chosen so the constraint is violated and the step is taken
    b = -1.0 if not use_dot else -2 * abs(float(ref.project_reduce(x, a)[0])) - 5.0  # no cancellation
    got = check_against_reference(x, a, b, math.inf, use_dot)
    assert float(got.coef) > 0


def test_lora_shaped_list_spag_form():
    x, a = make_lists(lora_shapes())
    loss, tau = torch.tensor(0.9), torch.tensor(0.2)
    got = check_against_reference(x, a, tau - loss, 1e-3, use_dot=False)
    assert float(got.coef) < 1e-3  # (ℓ - τ)/||g||² is far below the cap here


def test_many_tiny_tensors():
    shapes = [(i % 5,) for i in range(1000)]
    x, a = make_lists(shapes)
    check_against_reference(x, a, -3.0, math.inf, use_dot=False)


def test_one_huge_tensor():
    x, a = make_lists([(3_000_001,)])
    check_against_reference(x, a, -10.0, math.inf, use_dot=False)


@pytest.mark.parametrize("x_dtype,a_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16),
                                             (torch.float16, torch.bfloat16)])
def test_mixed_dtypes_between_lists(x_dtype, a_dtype):
    x, a = make_lists([(17, 9), (1000,)], x_dtype, a_dtype)
    check_against_reference(x, a, -2.0, math.inf, use_dot=True)


def test_mixed_dtypes_within_a_list():
    x = [torch.randn(10), torch.randn(20, dtype=torch.bfloat16), torch.randn(5, dtype=torch.float16)]
    a = [torch.randn(10, dtype=torch.bfloat16), torch.randn(20), torch.randn(5)]
    check_against_reference(x, a, -1.0, math.inf, use_dot=False)


def test_gradient_surgery_removes_conflict():
    # A-GEM: u <- u - min(0, <u, s>)/||s||² s, i.e. x = u, a = -s, b = 0, with the dot term.
    u, s = make_lists([(40, 3), (11,)], seed=3)
    s = [-si - ui for si, ui in zip(s, u)]  # make <u, s> < 0
    dot_us = float(sum((ui * si).sum() for ui, si in zip(u, s)))
    assert dot_us < 0
    check_against_reference(u, [-si for si in s], 0.0, math.inf, use_dot=True)
    after = float(sum((ui * si).sum() for ui, si in zip(u, s)))
    assert abs(after) < 1e-3 * abs(dot_us)  # projected onto <u, s> = 0


def test_constraint_already_satisfied_leaves_x_bitwise_unchanged():
    x, a = make_lists([(100,), (3, 3)])
    before = [t.clone() for t in x]
    got = project_(x, a, b=0.5, use_dot=False)  # 0 - 0.5 < 0: inside the half-space
    assert float(got.coef) == 0.0
    for t, t0 in zip(x, before):
        assert torch.equal(t, t0)


def test_trust_region_cap_is_hit():
    x, a = make_lists([(50,)])
    want = [t.clone() for t in x]
    got = project_(x, a, b=-1e6, max_step=1e-3)
    assert float(got.coef) == pytest.approx(1e-3)
    torch.testing.assert_close(x[0], want[0] - 1e-3 * a[0])


def test_none_entries_skipped_consistently():
    x, a = make_lists([(10,), (20,), (30,)])
    x_none = [x[0], None, x[2]]
    a_none = [a[0], a[1], None]
    before = [t.clone() for t in x]
    got = project_(x_none, a_none, b=-1.0)
    want_x, coef, _, sq = ref.project([before[0]], [a[0]], -1.0)
    torch.testing.assert_close(got.sqnorm, sq)
    torch.testing.assert_close(x[0], want_x[0])
    assert torch.equal(x[1], before[1]) and torch.equal(x[2], before[2])


def test_non_contiguous_tensors():
    base_x, base_a = make_lists([(64, 48), (30, 40)])
    x = [base_x[0].t(), base_x[1][:, ::2]]
    a = [base_a[0].t().contiguous().t().t(), base_a[1][:, 1::2]]  # views with other strides
    assert not x[0].is_contiguous() and not x[1].is_contiguous()
    want_x, coef, _, _ = ref.project([t.clone() for t in x], a, -2.0, math.inf, True)
    got = project_(x, a, b=-2.0, use_dot=True)
    assert float(got.coef) == pytest.approx(coef, rel=1e-5)
    for t, w in zip(x, want_x):
        torch.testing.assert_close(t, w)
    # the views wrote through to their bases
    torch.testing.assert_close(base_x[0].t(), want_x[0])


def test_empty_lists():
    got = project_([], [], b=-1.0)
    assert float(got.coef) == 0 and float(got.sqnorm) == 0
    dot, sq = project_reduce([], [])
    assert float(dot) == 0 and float(sq) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reduction_never_writes_nan(bad):
    x, a = make_lists([(10,), (5,)])
    a[1][2] = bad
    before = [t.clone() for t in x]
    got = project_(x, a, b=-1.0)
    assert float(got.coef) == 0.0
    assert not bool(got.finite)
    for t, t0 in zip(x, before):
        assert torch.equal(t, t0)


def test_non_finite_b_is_a_no_op():
    x, a = make_lists([(10,)])
    before = x[0].clone()
    got = project_(x, a, b=torch.tensor(float("nan")))
    assert float(got.coef) == 0.0 and torch.equal(x[0], before)


def test_zero_direction_is_a_no_op():
    x = [torch.randn(4)]
    before = x[0].clone()
    got = project_(x, [torch.zeros(4)], b=-1.0)
    assert float(got.coef) == 0.0 and torch.equal(x[0], before)


def test_split_entries_equal_fused():
    x1, a = make_lists([(123,), (45, 6)], seed=7)
    x2 = [t.clone() for t in x1]
    fused = project_(x1, a, b=-3.0, max_step=0.5, use_dot=True)
    dot, sq = project_reduce(x2, a, use_dot=True)
    coef = project_apply_(x2, a, dot, sq, b=-3.0, max_step=0.5, use_dot=True)
    assert torch.equal(coef, fused.coef)
    for t1, t2 in zip(x1, x2):
        assert torch.equal(t1, t2)


def test_split_entries_with_sharded_sums():
    # Two "ranks" each reduce their own shard; the summed reductions give the global projection.
    x, a = make_lists([(30,), (70,), (11, 3)], seed=11)
    want_x, want_coef, _, _ = ref.project([t.clone() for t in x], a, -5.0, math.inf, False)
    shards = [([x[0], x[2]], [a[0], a[2]]), ([x[1]], [a[1]])]
    sums = [project_reduce(xs, as_, use_dot=False) for xs, as_ in shards]
    dot = sum(s[0] for s in sums)
    sq = sum(s[1] for s in sums)
    coefs = [project_apply_(xs, as_, dot, sq, b=-5.0) for xs, as_ in shards]
    assert float(coefs[0]) == float(coefs[1]) == pytest.approx(want_coef, rel=1e-5)
    for t, w in zip(x, want_x):
        torch.testing.assert_close(t, w)


def test_deterministic_across_thread_counts():
    x, a = make_lists(lora_shapes(8), seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = project_reduce(x, a)
        torch.set_num_threads(max(2, threads))
        two = project_reduce(x, a)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_params_requiring_grad_are_updated_in_place():
    p = torch.nn.Parameter(torch.randn(8))
    g = torch.randn(8)
    want = p.detach() - (1.0 / float(g @ g)) * g  # b = -1: step (0 + 1)/||g||²
    got = project_([p], [g], b=-1.0)
    assert float(got.coef) == pytest.approx(1.0 / float(g @ g), rel=1e-5)
    torch.testing.assert_close(p.detach(), want)
    assert p.requires_grad and p.is_leaf


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_error_length_mismatch():
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        project_([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)])


def test_error_shape_mismatch_names_index():
    with pytest.raises(ValueError, match=r"shape mismatch at index 1"):
        project_([torch.zeros(2), torch.zeros(3)], [torch.zeros(2), torch.zeros(4)])


def test_error_non_floating_dtype():
    with pytest.raises(TypeError, match=r"x\[0\] must be float32"):
        project_([torch.zeros(2, dtype=torch.long)], [torch.zeros(2)])
    with pytest.raises(TypeError, match=r"a\[0\] must be float32"):
        project_([torch.zeros(2)], [torch.zeros(2, dtype=torch.int32)])


def test_error_bad_b_and_max_step():
    with pytest.raises(ValueError, match="b must be a scalar"):
        project_([torch.zeros(2)], [torch.ones(2)], b=torch.zeros(2))
    with pytest.raises(ValueError, match="max_step must be >= 0"):
        project_([torch.zeros(2)], [torch.ones(2)], max_step=-1.0)


def test_error_single_tensor_instead_of_list():
    with pytest.raises(TypeError, match="lists of tensors"):
        project_(torch.zeros(2), torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# torch.library / torch.compile
# ---------------------------------------------------------------------------------------------
def test_opcheck_all_ops():
    x, a = make_lists([(5, 3), (7,)], seed=2)
    b = torch.tensor(-1.0)
    opcheck(torch.ops.spard_ext.project_reduce, (x, a, True))
    dot, sq = torch.ops.spard_ext.project_reduce(x, a, True)
    opcheck(torch.ops.spard_ext.project_apply_, ([t.clone() for t in x], a, dot, sq, b, 0.5, True))
    opcheck(torch.ops.spard_ext.project_, ([t.clone() for t in x], a, b, math.inf, False))
    opcheck(torch.ops.spard_ext.writable_b, (x, b, "project_"))  # the traced inference check


def test_torch_compile_fullgraph():
    x1, a = make_lists([(16, 8), (9,)], seed=4)
    x2 = [t.clone() for t in x1]

    def step(x, a, loss, tau):
        return project_(x, a, tau - loss, max_step=1.0).coef

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, tau = torch.tensor(3.0), torch.tensor(0.2)
    c1 = compiled(x1, a, loss, tau)
    c2 = step(x2, a, loss, tau)
    assert torch.equal(c1, c2)
    for t1, t2 in zip(x1, x2):
        torch.testing.assert_close(t1, t2)


def test_build_reports_cuda_kernels_flag():
    assert isinstance(spard_ext.CUDA_KERNELS, bool)


# ---------------------------------------------------------------------------------------------
# CUDA (run where a GPU is present)
# ---------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_dot", [False, True])
def test_cuda_matches_reference(dtype, use_dot):
    assert spard_ext.CUDA_KERNELS
    shapes = [(3, 5), (1,), (0,), (33,), (65537,), (16, 4096), (4096, 16)]
    x, a = make_lists(shapes, dtype, device="cuda")
    check_against_reference(x, a, -1.0 if not use_dot else -100.0, math.inf, use_dot, device="cuda")


@requires_cuda
@pytest.mark.cuda
def test_cuda_mixed_dtypes_cap_and_nonfinite():
    x, a = make_lists([(1000,), (17, 3)], torch.bfloat16, torch.float32, device="cuda")
    check_against_reference(x, a, -1e6, 1e-3, False, device="cuda")
    a[0][5] = float("nan")
    before = [t.clone() for t in x]
    got = project_(x, a, b=torch.tensor(-1.0, device="cuda"))
    assert float(got.coef) == 0.0
    assert all(torch.equal(t, t0) for t, t0 in zip(x, before))


@requires_cuda
@pytest.mark.cuda
def test_cuda_split_entries_and_opcheck():
    x, a = make_lists([(123,), (45, 6)], device="cuda")
    x2 = [t.clone() for t in x]
    fused = project_(x, a, b=-3.0, use_dot=True)
    dot, sq = project_reduce(x2, a)
    coef = project_apply_(x2, a, dot, sq, b=-3.0, use_dot=True)
    assert torch.equal(coef, fused.coef)
    opcheck(torch.ops.spard_ext.project_, ([t.clone() for t in x], a, torch.tensor(-1.0, device="cuda"), 1.0, False))


@requires_cuda
@pytest.mark.cuda
def test_cuda_error_devices_differ():
    with pytest.raises(ValueError, match="one device"):
        project_([torch.zeros(2, device="cuda"), torch.zeros(2)], [torch.zeros(2, device="cuda"), torch.zeros(2)])


# ---------------------------------------------------------------------------------------------
# Findings of the outside audit (issue 14)
# ---------------------------------------------------------------------------------------------
def test_fp32_overflow_of_a_sum_is_the_documented_no_op():
    # ||a||² = 4.5e38 leaves the float32 range: no update, coef 0, sums reported as inf.
    x, a = [torch.zeros(2)], [torch.full((2,), 1.5e19)]
    got = project_(x, a, -1.0)
    assert float(got.coef) == 0.0 and not bool(got.finite)
    assert math.isinf(float(got.sqnorm)) and torch.equal(x[0], torch.zeros(2))
    dot, sq = project_reduce(x, a)
    assert math.isinf(float(sq))
    assert float(project_apply_(x, a, dot, sq, b=-1.0)) == 0.0
    assert torch.equal(x[0], torch.zeros(2))


@pytest.mark.parametrize("use_dot", [False, True])
def test_fp64_large_sums_are_the_documented_no_op(use_dot):
    # Fine in float64, out of range for the float32 results.
    x = [torch.full((4,), 1e30, dtype=torch.float64)]
    a = [torch.full((4,), 1e30, dtype=torch.float64)]
    before = x[0].clone()
    got = project_(x, a, -1.0, use_dot=use_dot)
    assert float(got.coef) == 0.0 and not bool(got.finite)
    assert torch.equal(x[0], before)
    # a float64 b beyond the float32 range, as a tensor, is a no-op too (not a conversion error)
    got = project_(x, [torch.ones(4, dtype=torch.float64)], torch.tensor(-1e300, dtype=torch.float64))
    assert float(got.coef) == 0.0 and torch.equal(x[0], before)


def test_inplace_ops_bump_the_version_counter():
    x, a = make_lists([(10,), (3, 4)])
    before = [t._version for t in x]
    project_(x, a, b=-1.0)
    assert all(t._version > v for t, v in zip(x, before))
    before = [t._version for t in x]
    dot, sq = project_reduce(x, a)
    assert [t._version for t in x] == before  # the reduction does not write
    project_apply_(x, a, dot, sq, b=1e9)  # a no-op still counts as a write, as for native ops
    assert all(t._version > v for t, v in zip(x, before))


def test_backward_that_saved_x_raises_after_the_projection_like_a_native_inplace_op():
    w = torch.nn.Parameter(torch.randn(5))
    g = torch.randn(5)
    loss = (w * w).sum()  # saves w for backward
    project_([w], [g], b=-1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # a view of a parameter shares the counter of its base
    base = torch.nn.Parameter(torch.randn(4, 3))
    loss = (base * base).sum()
    with torch.no_grad():
        view = base[:, 1]
    project_([view], [torch.randn(4)], b=-1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_raw_op_on_a_leaf_requiring_grad_raises_under_grad_mode():
    w = torch.nn.Parameter(torch.randn(5))
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        torch.ops.spard_ext.project_([w], [torch.randn(5)], torch.tensor(-1.0), math.inf, False)
    assert torch.equal(w.detach(), before)


def test_inference_tensor_outside_inference_mode_raises_before_writing():
    with torch.inference_mode():
        inf_t = torch.randn(6)
    ok = torch.randn(6)
    before = [ok.clone(), inf_t.clone()]
    with pytest.raises(RuntimeError, match=r"x\[1\].*inference"):
        project_([ok, inf_t], [torch.randn(6), torch.randn(6)], b=-1.0)
    assert torch.equal(ok, before[0]) and torch.equal(inf_t, before[1])
    # a list of inference tensors only (no autograd keys, so no Python kernel on the way)
    with pytest.raises(RuntimeError, match=r"x\[0\].*inference"):
        project_([inf_t], [torch.randn(6)], b=-1.0)
    assert torch.equal(inf_t, before[1])
    with torch.inference_mode():  # inside inference mode it is allowed
        project_([inf_t], [torch.ones(6)], b=-1.0)
    assert not torch.equal(inf_t, before[1])


@pytest.mark.parametrize("op", ["project_", "project_apply_"])
def test_a_bad_entry_leaves_every_entry_untouched(op):
    good = torch.randn(10)
    expanded = torch.zeros(1).expand(4)  # four elements in one memory location
    x, a = [good, expanded], [torch.randn(10), torch.randn(4)]
    before = good.clone()
    with pytest.raises(ValueError, match=r"x\[1\] .*share memory"):
        if op == "project_":
            project_(x, a, b=-1.0)
        else:
            project_apply_(x, a, torch.tensor(0.0), torch.tensor(1.0), b=-1.0)
    assert torch.equal(good, before)


def test_error_non_tensor_entry_names_it():
    with pytest.raises(TypeError, match=r"project_: x\[1\] must be a tensor or None, got float"):
        project_([torch.zeros(2), 1.0], [torch.ones(2), torch.ones(1)])
    with pytest.raises(TypeError, match=r"project_reduce: a\[0\] must be a tensor or None, got str"):
        project_reduce([torch.zeros(2)], ["g"])
    with pytest.raises(TypeError, match=r"project_apply_: x and a must be lists of tensors, got int"):
        project_apply_(3, [torch.zeros(2)], torch.tensor(0.0), torch.tensor(1.0))


@pytest.mark.parametrize("b", ["x", None, [1.0], True, object()])
def test_error_bad_b_names_it(b):
    with pytest.raises(TypeError, match=r"project_: b must be a float or a one-element floating-point tensor"):
        project_([torch.zeros(2)], [torch.ones(2)], b)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    x = [torch.zeros(3)]
    got = project_(x, [torch.ones(3)], np.float32(-3.0), max_step=np.float64(10.0))
    assert float(got.coef) == pytest.approx(1.0)
    got = project_([torch.zeros(3)], [torch.ones(3)], np.int64(-3))
    assert float(got.coef) == pytest.approx(1.0)


def test_error_integer_b_tensor_names_it():
    with pytest.raises(TypeError, match="b must be a floating-point tensor"):
        project_([torch.zeros(2)], [torch.ones(2)], torch.tensor(-1))


def test_error_meta_tensor_mixed_with_cpu_tensors():
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="one device"):
        project_([meta, cpu], [torch.ones(2, device="meta"), torch.ones(2)], b=-1.0)
    with pytest.raises(ValueError, match="one device"):
        project_reduce([cpu], [torch.ones(2, device="meta")])
    with pytest.raises(ValueError, match=r"b must be on cpu"):
        project_([cpu], [torch.ones(2)], torch.tensor(-1.0, device="meta"))
    # the op itself, as callers of torch.ops.spard_ext.* reach it
    with pytest.raises(ValueError, match="one device"):
        torch.ops.spard_ext.project_([meta, cpu], [torch.ones(2, device="meta"), torch.ones(2)],
                                     torch.tensor(-1.0), math.inf, False)
    # all-meta stays a shape-only call
    coef, dot, sq = torch.ops.spard_ext.project_([meta], [meta], torch.tensor(-1.0), math.inf, False)
    assert coef.device.type == "meta"


def _rel_err(value, ref):
    return abs(float(value) - float(ref)) / abs(float(ref))


def _assert_sum_error_within_2x_of_torch(x, a):
    # flash-attention's habit: a kernel's error against a float64 reference is bounded by the
    # error of the same-dtype torch implementation. No float32 result can do better than the
    # rounding of the reference itself, so that is the floor of the bound.
    ref_dot = (x.double() * a.double()).sum()
    ref_sq = (a.double() * a.double()).sum()
    dot, sq = project_reduce([x], [a], use_dot=True)
    for got, ref, torch_value in ((dot, ref_dot, (x * a).sum()), (sq, ref_sq, (a * a).sum())):
        floor = _rel_err(ref.float(), ref)
        bound = 2 * max(_rel_err(torch_value, ref), floor)
        assert _rel_err(got, ref) <= bound, (float(got), float(ref), float(torch_value))


@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7, 3.3])
@pytest.mark.parametrize("n", [1000, 32768, 1_000_003])
def test_fp32_reduction_error_on_constant_tensors(n, value):
    _assert_sum_error_within_2x_of_torch(torch.full((n,), 1.7), torch.full((n,), value))


@pytest.mark.parametrize("seed", range(4))
def test_fp32_reduction_error_on_random_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    n = [1000, 65537, 400_000, 2_000_001][seed]
    x = torch.randn(n, generator=g) + 0.5  # a mean, so the dot does not cancel to ~0
    a = torch.rand(n, generator=g) * 3
    _assert_sum_error_within_2x_of_torch(x, a)


# ---------------------------------------------------------------------------------------------
# Messages made without streams (csrc/message.h)
# ---------------------------------------------------------------------------------------------
def test_kernel_sources_raise_through_the_stream_free_checks():
    # c10::str's ostream, inlined into the extension, crashed (SIGSEGV) on a build that links
    # libstdc++ in; .ci/static_libstdcxx runs the kernels built that way. The stable ABI's
    # STD_TORCH_CHECK formats with an ostringstream too.
    import re
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    offenders = [f"{p.relative_to(csrc)}:{n}" for p in sorted(csrc.rglob("*")) if p.suffix in {".cpp", ".cu", ".h", ".cuh"}
                 and p.name != "message.h" and "tests" not in p.parts
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"\b(STD_)?TORCH_CHECK\w*\(|c10::str\(|std::(o|)stringstream|std::cout|std::cerr", line)]
    assert not offenders, f"use SPARD_CHECK* / spard::cat instead of stream-based formatting: {offenders}"


def test_messages_name_the_numbers_and_shapes():
    with pytest.raises(ValueError, match=r"^project_: shape mismatch at index 0: x\[0\] has shape \[3\] but a\[0\] "
                                         r"has shape \[4, 1\]$"):
        project_([torch.zeros(3)], [torch.ones(4, 1)], -1.0)
    with pytest.raises(TypeError, match=r"x\[0\] must be float32, float16, bfloat16 or float64, got Int$"):
        project_([torch.zeros(3, dtype=torch.int32)], [torch.ones(3)], -1.0)
    # the raw op (no Python entry point): the CPU kernels on the stable ABI raise RuntimeError
    with pytest.raises(RuntimeError, match=r"^project_: max_step must be >= 0 \(use inf for no cap\), got -0.5$"):
        torch.ops.spard_ext.project_([torch.zeros(3)], [torch.ones(3)], torch.tensor(0.0), -0.5, False)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e39])
def test_a_non_finite_number_is_refused_not_a_silent_no_op(bad):
    x = [torch.ones(3)]
    with pytest.raises(ValueError, match=r"project_: b must be a finite number \(in float32\)"):
        project_(x, [torch.ones(3)], bad, use_dot=True)
    with pytest.raises(ValueError, match=r"project_apply_: sqnorm must be a finite number"):
        project_apply_(x, [torch.ones(3)], 1.0, bad, 0.0)
    assert torch.equal(x[0], torch.ones(3))
    # a tensor b stays unread on the host: its non-finite value is the documented no-op
    assert float(project_(x, [torch.ones(3)], torch.tensor(bad), use_dot=True).coef) == 0.0


# ---------------------------------------------------------------------------------------------
# Findings of the outside audit (issue 22)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [False, True], ids=["project_", "reduce+apply"])
def test_a_step_beyond_the_float32_range_is_applied_not_dropped(split):
    # ||a||² = 1e-40 (a float32 subnormal) and b = -1: both sums are finite, but the float32
    # coefficient 1/1e-40 overflowed and the call did nothing. The step is formed in float64 and
    # applied: <a, x> reaches b; the coefficient reported in float32 is +inf.
    x, a = [torch.zeros(3)], [torch.tensor([1e-20, 0.0, 0.0])]
    if split:
        dot, sq = project_reduce(x, a)
        coef = project_apply_(x, a, dot, sq, b=-1.0, use_dot=True)
    else:
        coef = project_(x, a, -1.0, use_dot=True).coef
    assert math.isinf(float(coef)) and float(coef) > 0
    assert torch.isfinite(x[0]).all()
    assert float(x[0][0]) == pytest.approx(-1e20, rel=1e-4)  # sqnorm is a subnormal: 1e-5 rounding
    assert float(x[0][0].double() * 1e-20) == pytest.approx(-1.0, rel=1e-4)
    want_x, want_coef, _, _ = ref.project([torch.zeros(3)], a, -1.0, math.inf, True)
    assert want_coef == pytest.approx(1e40, rel=1e-4)
    torch.testing.assert_close(x[0], want_x[0], rtol=1e-6, atol=0)
    # a cap still caps it, in range
    x = [torch.zeros(3)]
    assert float(project_(x, a, -1.0, max_step=1e30, use_dot=True).coef) == pytest.approx(1e30, rel=1e-6)
    assert float(x[0][0]) == pytest.approx(-1e10, rel=1e-6)


@pytest.mark.parametrize("op", ["project_", "project_apply_"])
def test_entries_of_x_that_share_memory_are_refused_before_writing(op):
    def call(x, a):
        if op == "project_":
            return project_(x, a, b=-1.0)
        return project_apply_(x, a, torch.tensor(0.0), torch.tensor(1.0), b=-1.0)

    base = torch.zeros(10)
    t = torch.zeros(4)
    for x, pair in (([t, t], (0, 1)), ([torch.zeros(2), base[:6], base[4:]], (1, 2)),
                    ([base[::2], torch.zeros(1), base[1:3]], (0, 2)), ([base, base.view(2, 5)], (0, 1))):
        before = [e.clone() for e in x]
        a = [torch.ones_like(e) for e in x]
        with pytest.raises(ValueError, match=rf"{op}: x\[{pair[0]}\] and x\[{pair[1]}\] share memory"):
            call(x, a)
        assert all(torch.equal(e, w) for e, w in zip(x, before))
    # views of one buffer that do not meet (the parameters of a flat buffer) are fine
    x = [base[:5], base[5:].view(5, 1)]
    out = call(x, [torch.ones(5), torch.ones(5, 1)])
    coef = float(out.coef if op == "project_" else out)
    assert coef > 0
    torch.testing.assert_close(base, torch.full((10,), -coef))
    # reading the same tensor twice is fine
    dot, sq = project_reduce([t, t], [torch.ones(4), torch.ones(4)])
    assert float(sq) == 8.0


def test_errors_that_are_not_refusals_keep_their_type():
    # a sparse x has no kernel (NotImplementedError), not a bad value
    sparse = torch.zeros(3).to_sparse()
    with pytest.raises(NotImplementedError):
        project_([sparse], [torch.ones(3)], -1.0)
    with pytest.raises(NotImplementedError):
        project_reduce([sparse], [torch.ones(3)])
    # under vmap the real error comes through (no batching rule), not one from a re-check
    with pytest.raises(RuntimeError, match="Batching rule not implemented for spard_ext::project_") as info:
        torch.func.vmap(lambda x, a: project_([x], [a], -1.0).coef)(torch.zeros(2, 3), torch.ones(2, 3))
    assert type(info.value) is RuntimeError
    # the kernels' own refusals are still typed
    with pytest.raises(TypeError, match=r"project_: x\[0\] must be float32"):
        project_([torch.zeros(2, dtype=torch.int32)], [torch.ones(2)], -1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        project_reduce([torch.zeros(2)], [torch.ones(3)])


def test_inference_tensors_under_torch_compile_are_refused_before_writing_as_in_eager():
    with torch.inference_mode():
        x = [torch.randn(4), torch.randn(3)]
    before = [t.clone() for t in x]
    a = [torch.ones(4), torch.ones(3)]

    def step(x, a):
        return project_(x, a, -1.0).coef

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for fn in (step, compiled):
        with pytest.raises(RuntimeError, match=r"project_: x\[0\] is an inference tensor"):
            fn(x, a)
        assert all(torch.equal(t, w) for t, w in zip(x, before))
    # the split form too
    compiled_apply = torch.compile(lambda x, a: project_apply_(x, a, torch.tensor(0.0), torch.tensor(1.0), -1.0),
                                   fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"project_apply_: x\[0\] is an inference tensor"):
        compiled_apply(x, a)
    assert all(torch.equal(t, w) for t, w in zip(x, before))
    # inside inference mode the compiled call writes them, as the eager call does
    with torch.inference_mode():
        compiled(x, a)
    assert not torch.equal(x[0], before[0])


def test_eager_calls_bump_versions_and_refuse_inference_tensors_once_per_list():
    # the entry points do the ADInplaceOrView kernel's work themselves (project.py): same result
    x = [torch.zeros(3), torch.zeros(2)]
    versions = [t._version for t in x]
    project_(x, [torch.ones(3), torch.ones(2)], -1.0)
    assert [t._version for t in x] == [v + 1 for v in versions]
    project_apply_(x, [torch.ones(3), torch.ones(2)], torch.tensor(0.0), torch.tensor(1.0), -1.0)
    assert [t._version for t in x] == [v + 2 for v in versions]
    project_reduce(x, [torch.ones(3), torch.ones(2)])
    assert [t._version for t in x] == [v + 2 for v in versions]
    # a refused call bumps nothing
    with pytest.raises(ValueError):
        project_(x, [torch.ones(3), torch.ones(3)], -1.0)
    assert [t._version for t in x] == [v + 2 for v in versions]
