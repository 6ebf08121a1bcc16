"""spard_ext.dpp_greedy against the plain-torch incremental reference and a brute-force greedy."""

import math

import pytest
import torch

import spard_ext
from spard_ext import dpp_greedy
from spard_ext import reference as ref

METHODS = ["cholesky", "inverse"]


def _factor(n, d, seed, dtype=torch.float64, spread=True):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    if spread:  # varied item quality, as in RD-DPP (rows scaled by r_i)
        f = f * torch.rand(n, 1, generator=g, dtype=torch.float64).add(0.2)
    return f.to(dtype)


def _dense(n, rank, seed, ridge=0.0):
    f = _factor(n, rank, seed)
    return f @ f.T + ridge * torch.eye(n, dtype=torch.float64)


def _lowrank_kernel(f, eps):
    f = f.double()
    return f @ f.T + eps * torch.eye(f.shape[0], dtype=torch.float64)


def _assert_logdet(kernel, res):
    idx = res.indices
    sign, logdet = torch.linalg.slogdet(kernel.double()[idx][:, idx])
    assert float(sign) == 1.0
    assert math.isclose(float(res.logdet), float(logdet), rel_tol=1e-7, abs_tol=1e-7)


# ------------------------------------------------------------------------------------------------
# Picks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_matches_reference_and_brute_force(seed):
    kernel = _dense(40, 12, seed, ridge=1e-3)
    res = dpp_greedy(kernel, k=15)
    ref_idx, ref_gains = ref.dpp_greedy(kernel, k=15)
    bf_idx, bf_gains = ref.dpp_greedy_brute_force(kernel, k=15)
    assert res.indices.tolist() == ref_idx.tolist() == bf_idx.tolist()
    torch.testing.assert_close(res.gains, ref_gains, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.gains, bf_gains, rtol=1e-6, atol=1e-9)
    _assert_logdet(kernel, res)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,d,k", [(60, 4, 12), (60, 20, 8), (200, 16, 60)])
def test_lowrank_matches_reference(method, n, d, k):
    # D < k goes past the rank of F: gains fall to ~eps and picks follow the ridge.
    f = _factor(n, d, seed=n + d)
    for eps in (1e-2, 1e-6):
        res = dpp_greedy(factor=f, k=k, eps=eps, method=method)
        ref_idx, ref_gains = ref.dpp_greedy(factor=f, k=k, eps=eps)
        assert res.indices.tolist() == ref_idx.tolist()
        torch.testing.assert_close(res.gains, ref_gains, rtol=1e-7, atol=1e-12)
        if eps == 1e-2:
            _assert_logdet(_lowrank_kernel(f, eps), res)


@pytest.mark.parametrize("method", METHODS)
def test_lowrank_matches_brute_force(method):
    f = _factor(30, 5, seed=7)
    eps = 1e-2
    res = dpp_greedy(factor=f, k=10, eps=eps, method=method)
    bf_idx, bf_gains = ref.dpp_greedy_brute_force(_lowrank_kernel(f, eps), k=10)
    assert res.indices.tolist() == bf_idx.tolist()
    torch.testing.assert_close(res.gains, bf_gains, rtol=1e-6, atol=1e-9)


def test_methods_agree_past_rank_at_scale():
    # The lazy refresh of the inverse update and the eager Cholesky update pick the same items.
    f = _factor(3000, 24, seed=3)
    a = dpp_greedy(factor=f, k=80, method="cholesky")
    b = dpp_greedy(factor=f, k=80, method="inverse")
    assert a.indices.tolist() == b.indices.tolist()
    torch.testing.assert_close(a.gains, b.gains, rtol=1e-7, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_repeated_items_and_exact_ties(method):
    base = _factor(6, 3, seed=11)
    f = torch.cat([base, base, base[:2]])  # item i + 6 repeats item i
    res = dpp_greedy(factor=f, k=9, eps=1e-3, method=method)
    ref_idx, _ = ref.dpp_greedy(factor=f, k=9, eps=1e-3)
    bf_idx, _ = ref.dpp_greedy_brute_force(_lowrank_kernel(f, 1e-3), k=9)
    assert res.indices.tolist() == ref_idx.tolist() == bf_idx.tolist()
    # an exact tie always goes to the smaller index: a copy is never picked before its original
    picked = res.indices.tolist()
    for i in range(6, 14):
        if i in picked:
            assert i - 6 in picked[: picked.index(i)]
    # all gains equal: the identity picks in index order
    eye = dpp_greedy(torch.eye(7, dtype=torch.float64), k=7)
    assert eye.indices.tolist() == list(range(7))
    assert dpp_greedy(factor=torch.zeros(5, 3), k=3, method=method).indices.tolist() == [0, 1, 2]


def test_dense_repeated_items_stop_at_rank():
    base = _dense(5, 5, seed=4, ridge=0.1)
    kernel = torch.cat([torch.cat([base, base], 1), torch.cat([base, base], 1)], 0)  # 10 items, rank 5
    res = dpp_greedy(kernel, k=10, eps_stop=1e-8)
    assert res.indices.tolist() == ref.dpp_greedy(kernel, k=10, eps_stop=1e-8)[0].tolist()
    assert len(res.indices) == 5 and max(res.indices.tolist()) < 5


@pytest.mark.parametrize("method", METHODS)
def test_masks(method):
    f = _factor(40, 6, seed=5)
    include = [33, 2, 17]
    exclude = torch.zeros(40, dtype=torch.bool)
    exclude[[0, 5, 9]] = True
    res = dpp_greedy(factor=f, k=10, eps=1e-2, include=include, exclude=exclude, method=method)
    ref_idx, ref_gains = ref.dpp_greedy(factor=f, k=10, eps=1e-2, include=include, exclude=exclude)
    bf_idx, _ = ref.dpp_greedy_brute_force(_lowrank_kernel(f, 1e-2), k=10, include=include, exclude=exclude)
    assert res.indices.tolist() == ref_idx.tolist() == bf_idx.tolist()
    torch.testing.assert_close(res.gains, ref_gains, rtol=1e-7, atol=1e-12)
    assert sorted(res.indices[:3].tolist()) == sorted(include)  # included first
    assert not set(res.indices.tolist()) & {0, 5, 9}
    # included items are picked first even when k is smaller than the include set
    assert set(dpp_greedy(factor=f, k=2, include=include, method=method).indices.tolist()) <= set(include)
    # excluding everything but two items leaves two picks
    keep = torch.ones(40, dtype=torch.bool)
    keep[[3, 4]] = False
    assert sorted(dpp_greedy(factor=f, k=10, exclude=keep, method=method).indices.tolist()) == [3, 4]


def test_an_include_item_that_cannot_be_picked_is_skipped_not_the_end():
    # item 10 repeats included item 1 (and item 4 is a zero row, also included): once 1 is
    # picked their gains are 0 (dense) or the ridge (low rank, below eps_stop here); the selection
    # skips them and goes on filling k from all items
    dense_f = _factor(20, 8, seed=12)
    dense_f[10] = dense_f[1]
    dense_f[4] = 0
    kernel = dense_f @ dense_f.T
    for kw in (dict(include=[1, 10], k=6), dict(include=[4, 1, 10], k=6)):
        res = dpp_greedy(kernel, eps_stop=1e-8, **kw)
        ref_idx, ref_gains = ref.dpp_greedy(kernel, eps_stop=1e-8, **kw)
        bf_idx, _ = ref.dpp_greedy_brute_force(kernel, eps_stop=1e-8, **kw)
        assert res.indices.tolist() == ref_idx.tolist() == bf_idx.tolist()
        assert len(res.indices) == 6 and res.indices[0] == 1
        assert 10 not in res.indices.tolist() and 4 not in res.indices.tolist()
        torch.testing.assert_close(res.gains, ref_gains, rtol=1e-7, atol=1e-12)
    for method in METHODS:
        res = dpp_greedy(factor=dense_f, k=6, eps=1e-9, eps_stop=1e-6, include=[1, 10], method=method)
        ref_idx, _ = ref.dpp_greedy(factor=dense_f, k=6, eps=1e-9, eps_stop=1e-6, include=[1, 10])
        assert res.indices.tolist() == ref_idx.tolist()
        assert len(res.indices) == 6 and res.indices[0] == 1 and 10 not in res.indices.tolist()


def test_dense_rank_8_kernel_with_masks_stops_at_its_rank():
    # the data of test_kernels_cuda.py::test_one_host_read_per_call[dense] (k = 20): 8 picks
    g = torch.Generator().manual_seed(2)
    f = torch.randn(300, 8, generator=g, dtype=torch.float64)
    f = f * torch.rand(300, 1, generator=g, dtype=torch.float64).add(0.2)
    kw = dict(k=20, include=[3, 10], exclude=[7])
    res = dpp_greedy(f @ f.T, **kw)
    assert len(res.indices) == 8 and res.indices[:2].tolist() in ([3, 10], [10, 3])
    assert len(dpp_greedy(factor=f, **kw).indices) == 20


def test_float32_singular_kernel_stops_where_the_docs_say():
    # docs/dpp.md: past the rank, a float32 kernel's gains are its rounding (~1e-7 x max diag),
    # above the default eps_stop; eps_stop = 1e-5 x max diag stops at the numerical rank
    for seed in range(3):
        f = torch.randn(40, 5, generator=torch.Generator().manual_seed(seed))
        kernel = f @ f.T
        top = float(kernel.diagonal().max())
        default = dpp_greedy(kernel, k=20)
        assert 5 < len(default.indices) < 20
        assert float(default.gains[5:].max()) < 1e-6 * top  # the rounding, not the data
        assert len(dpp_greedy(kernel, k=20, eps_stop=1e-5 * top).indices) == 5
        assert len(dpp_greedy(kernel.double(), k=20, eps_stop=1e-5 * top).indices) == 5


def test_dense_masks():
    kernel = _dense(30, 30, seed=6)
    kw = dict(k=8, include=torch.arange(30) % 7 == 3, exclude=[0, 1, 2])
    res = dpp_greedy(kernel, **kw)
    assert res.indices.tolist() == ref.dpp_greedy(kernel, **kw)[0].tolist()
    assert res.indices.tolist() == ref.dpp_greedy_brute_force(kernel, **kw)[0].tolist()


@pytest.mark.parametrize("method", METHODS)
def test_float32(method):
    f64 = _factor(500, 32, seed=8)
    f32 = f64.float()
    res = dpp_greedy(factor=f32, k=20, eps=1e-3, method=method)
    ref_idx, ref_gains = ref.dpp_greedy(factor=f32.double(), k=20, eps=1e-3)
    assert res.indices.tolist() == ref_idx.tolist()
    assert res.gains.dtype == torch.float64 and res.indices.dtype == torch.int64
    torch.testing.assert_close(res.gains, ref_gains, rtol=1e-6, atol=1e-9)
    kernel32 = (f32 @ f32.T).contiguous()
    kernel32 = (kernel32 + kernel32.T) / 2
    dense = dpp_greedy(kernel32, k=20)
    assert dense.indices.tolist() == ref.dpp_greedy(kernel32, k=20)[0].tolist()
    _assert_logdet(kernel32, dense)


# ------------------------------------------------------------------------------------------------
# Sizes at the edges
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_edge_sizes(method):
    empty = dpp_greedy(factor=torch.zeros(0, 4), k=3, method=method)
    assert empty.indices.numel() == 0 and empty.gains.numel() == 0
    one = dpp_greedy(factor=torch.ones(1, 4), k=3, eps=0.5, method=method)
    assert one.indices.tolist() == [0] and math.isclose(float(one.gains[0]), 4.5)
    f = _factor(10, 3, seed=9)
    assert dpp_greedy(factor=f, k=0, method=method).indices.numel() == 0
    # k > N: every item, once; k > rank: picks go on by the ridge
    assert sorted(dpp_greedy(factor=f, k=50, method=method).indices.tolist()) == list(range(10))
    # eps_stop above the ridge stops at the rank of F
    assert len(dpp_greedy(factor=f, k=10, eps=1e-6, eps_stop=1e-4, method=method).indices) == 3
    assert dpp_greedy(torch.zeros(0, 0), k=2).indices.numel() == 0
    single = torch.full((1, 1), 2.0, dtype=torch.float64)
    assert dpp_greedy(single, k=2).gains.tolist() == [2.0]
    assert single.item() == 2.0  # the input is never written to
    assert len(dpp_greedy(_dense(12, 4, seed=1), k=12).indices) == 4  # singular dense: stops at rank


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input():
    f = _factor(8, 3, seed=0)
    kernel = _dense(8, 8, seed=0)
    with pytest.raises(ValueError, match="square"):
        dpp_greedy(torch.zeros(3, 4), k=1)
    with pytest.raises(ValueError, match="symmetric"):
        dpp_greedy(kernel + torch.triu(torch.ones(8, 8, dtype=torch.float64), 1), k=1)
    bad = kernel.clone()
    bad[1, 1] = math.nan
    with pytest.raises(ValueError, match="finite"):
        dpp_greedy(bad, k=1)
    bad = f.clone()
    bad[0, 0] = math.inf
    with pytest.raises(ValueError, match="factor must be finite"):
        dpp_greedy(factor=bad, k=1)
    with pytest.raises(ValueError, match="k must be"):
        dpp_greedy(factor=f, k=-1)
    with pytest.raises(ValueError, match="include.*length"):
        dpp_greedy(factor=f, k=1, include=torch.ones(7, dtype=torch.bool))
    with pytest.raises(ValueError, match="exclude indices"):
        dpp_greedy(factor=f, k=1, exclude=[8])
    with pytest.raises(ValueError, match="share"):
        dpp_greedy(factor=f, k=1, include=[1], exclude=[1, 2])
    with pytest.raises(TypeError, match="float32 or float64"):
        dpp_greedy(factor=torch.ones(4, 2, dtype=torch.int32), k=1)
    with pytest.raises(TypeError, match="float32 or float64"):
        dpp_greedy(factor=f.half(), k=1)
    with pytest.raises(ValueError, match="exactly one"):
        dpp_greedy(kernel, factor=f, k=1)
    with pytest.raises(ValueError, match="method"):
        dpp_greedy(factor=f, k=1, method="qr")
    with pytest.raises(ValueError, match="eps > 0"):
        dpp_greedy(factor=f, k=1, eps=0.0, method="inverse")
    with pytest.raises(ValueError, match="2-D"):
        dpp_greedy(factor=torch.ones(4), k=1)
    # the op itself checks too (callers of torch.ops.spard_ext.*, no Python entry point): the CPU
    # kernels on the stable ABI raise RuntimeError, with the same message
    with pytest.raises(RuntimeError, match="^dpp_greedy_lowrank: include must be a 1-D mask of length N = 8"):
        torch.ops.spard_ext.dpp_greedy_lowrank(f, 1, 1e-6, 1e-10, torch.ones(3, dtype=torch.bool), None, "auto")
    with pytest.raises(RuntimeError, match="^dpp_greedy_dense: include must be a bool mask, got Float$"):
        torch.ops.spard_ext.dpp_greedy_dense(kernel, 1, 1e-10, torch.ones(8), None)


@pytest.mark.parametrize("empty", [[], (), torch.zeros(0, dtype=torch.long), "np-int", "np-float"],
                         ids=["list", "tuple", "tensor", "np-int", "np-float"])
def test_empty_include_and_exclude_mean_none(empty):
    if isinstance(empty, str):
        np = pytest.importorskip("numpy")
        empty = np.array([], dtype=np.int64 if empty == "np-int" else np.float64)
    f = _factor(30, 4, seed=2)
    want = dpp_greedy(factor=f, k=6).indices.tolist()
    assert dpp_greedy(factor=f, k=6, include=empty, exclude=empty).indices.tolist() == want
    kernel = _dense(12, 12, seed=3)
    assert dpp_greedy(kernel, k=4, include=empty).indices.tolist() == dpp_greedy(kernel, k=4).indices.tolist()


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    f = _factor(30, 4, seed=2)
    want = dpp_greedy(factor=f, k=6).indices.tolist()
    assert dpp_greedy(factor=f, k=np.int64(6), eps=np.float32(1e-6)).indices.tolist() == want
    assert dpp_greedy(factor=f, k=6, include=np.array([3, 7])).indices[:2].tolist() in ([3, 7], [7, 3])


@pytest.mark.parametrize("kw,match", [
    (dict(k=2.5), "k must be an int >= 0, got 2.5"),
    (dict(k=True), "k must be an int >= 0, got True"),
    (dict(k="3"), "k must be an int >= 0, got '3'"),
    (dict(k=3, eps="x"), "eps must be a number >= 0, got 'x'"),
    (dict(k=3, eps=None), "eps must be a number >= 0, got None"),
    (dict(k=3, eps=float("nan")), "eps must be a number >= 0, got nan"),
    (dict(k=3, eps_stop=None), "eps_stop must be a number, got None"),
    (dict(k=3, include=[1.5]), "include must be a bool mask or integer indices"),
    (dict(k=3, exclude="ab"), "exclude must be a bool mask or integer indices"),
])
def test_bad_arguments_name_themselves(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        dpp_greedy(factor=_factor(8, 3, seed=0), **kw)


def test_mask_on_another_device_than_the_input_is_refused():
    f = _factor(8, 3, seed=0)
    with pytest.raises(ValueError, match="include must be on cpu like the factor, got meta"):
        dpp_greedy(factor=f, k=2, include=torch.zeros(8, dtype=torch.bool, device="meta"))


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def test_opcheck():
    f = _factor(20, 4, seed=1)
    kernel = _dense(20, 6, seed=2)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[3, 7]] = True
    for method in ("auto", "cholesky", "inverse"):
        torch.library.opcheck(torch.ops.spard_ext.dpp_greedy_lowrank.default,
                              (f, 5, 1e-6, 1e-10, mask, None, method))
    torch.library.opcheck(torch.ops.spard_ext.dpp_greedy_lowrank.default,
                          (f.float(), 3, 1e-3, 1e-10, None, mask, "auto"))
    torch.library.opcheck(torch.ops.spard_ext.dpp_greedy_dense.default, (kernel, 10, 1e-8, None, mask))


# ------------------------------------------------------------------------------------------------
# CUDA (runs when a GPU is present)
# ------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and spard_ext.CUDA_KERNELS),
                          reason="needs a CUDA device and a CUDA build")


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_cpu(method, dtype):
    f = _factor(3000, 48, seed=12, dtype=dtype)
    include = torch.zeros(3000, dtype=torch.bool)
    include[[5, 2999]] = True
    exclude = torch.zeros(3000, dtype=torch.bool)
    exclude[:10:3] = True
    kw = dict(k=100, eps=1e-4, include=include, exclude=exclude, method=method)
    cpu = dpp_greedy(factor=f, **kw)
    gpu = dpp_greedy(factor=f.cuda(), **{**kw, "include": include.cuda(), "exclude": exclude.cuda()})
    assert gpu.indices.device.type == "cuda"
    assert gpu.indices.cpu().tolist() == cpu.indices.tolist()
    torch.testing.assert_close(gpu.gains.cpu(), cpu.gains, rtol=1e-5 if dtype == torch.float32 else 1e-9,
                               atol=1e-12)
    kernel = _dense(500, 40, seed=13, ridge=1e-3).to(dtype)
    assert dpp_greedy(kernel.cuda(), k=60).indices.cpu().tolist() == dpp_greedy(kernel, k=60).indices.tolist()


@cuda
@pytest.mark.cuda
def test_cuda_edges_and_opcheck():
    f = _factor(50, 4, seed=3).cuda()
    assert dpp_greedy(factor=f[:0], k=3).indices.numel() == 0
    assert dpp_greedy(factor=f, k=100).indices.numel() == 50
    assert len(dpp_greedy(factor=f, k=50, eps_stop=1e-3).indices) == 4
    ties = dpp_greedy(factor=torch.zeros(6, 2, device="cuda"), k=4)
    assert ties.indices.cpu().tolist() == [0, 1, 2, 3]
    torch.library.opcheck(torch.ops.spard_ext.dpp_greedy_lowrank.default, (f, 5, 1e-6, 1e-10, None, None, "auto"))
    kernel = _dense(30, 30, seed=5).cuda()
    torch.library.opcheck(torch.ops.spard_ext.dpp_greedy_dense.default, (kernel, 5, 1e-10, None, None))
