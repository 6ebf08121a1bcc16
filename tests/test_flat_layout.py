"""spard_ext.FlatLayout: parameters as views of one flat buffer, the projection through it equal
to the list call, staleness (replaced, resized, moved) refused or refreshed, bad input in one
line; and SPAG with the layout against SPAG on lists."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import spard_ext
from spard_ext import FlatLayout, StaleLayoutError

from test_spag import safe_rows, tiny_lora_model, tiny_tokenizer


def params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def grads_like(ps, seed=1, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in ps]


ODD = [(3, 5), (7,), (0,), (1, 1), (11, 2), (0, 4), (13,)]


# ----------------------------------------------------------------------------------------------
# The layout itself
# ----------------------------------------------------------------------------------------------
def test_layout_keeps_objects_values_and_groups_by_dtype():
    ps = params(ODD) + params([(4, 3), (5,)], torch.bfloat16, seed=2)
    before = [p.detach().clone() for p in ps]
    ids = [id(p) for p in ps]
    layout = FlatLayout(ps)
    assert [id(p) for p in ps] == ids
    assert len(layout.buffers) == 2 and [b.dtype for b in layout.buffers] == [torch.float32, torch.bfloat16]
    assert layout.buffers[0].numel() == sum(p.numel() for p in ps[:len(ODD)])
    for p, b in zip(ps, before):
        assert p.shape == b.shape and torch.equal(p.detach(), b)
        assert p.is_leaf and p.requires_grad
    with torch.no_grad():  # a write to the buffer is a write to the parameters
        layout.buffers[0].add_(1.0)
    assert torch.equal(ps[0].detach(), before[0] + 1)
    assert layout.stale() is None


def test_non_contiguous_parameter_keeps_its_values():
    p = torch.nn.Parameter(torch.randn(4, 6).t())  # a transposed (non-contiguous) leaf
    value = p.detach().clone()
    layout = FlatLayout([p])
    assert torch.equal(p.detach(), value) and p.is_contiguous()
    assert layout.buffers[0].data_ptr() == p.data_ptr()


def test_module_and_optimizer_work_on_laid_out_parameters():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    FlatLayout(list(a.parameters()))
    x = torch.randn(7, 5)
    for m in (a, b):
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        m(x).square().sum().backward()
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_dot", [False, True])
def test_project_through_layout_equals_list_call(dtype, use_dot):
    shapes = ODD * 3
    ps, qs = params(shapes, dtype), params(shapes, dtype)
    gs = grads_like(ps)
    layout = FlatLayout(ps)
    a = layout.zeros()
    torch._foreach_copy_(layout.views(a), gs)
    b, cap = -0.5, 1e3
    flat = spard_ext.project_(layout, a, b, max_step=cap, use_dot=use_dot)
    ref = spard_ext.project_(qs, gs, b, max_step=cap, use_dot=use_dot)
    assert float(flat.coef) > 0
    torch.testing.assert_close(flat.coef, ref.coef, rtol=1e-6, atol=0)
    torch.testing.assert_close(flat.sqnorm, ref.sqnorm, rtol=1e-6, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_reduce_and_apply_through_layout_equal_list_calls():
    ps, qs = params(ODD * 2), params(ODD * 2)
    gs = grads_like(ps)
    layout = FlatLayout(ps)
    a = layout.zeros(dtype=torch.float64)  # a of another dtype than x
    torch._foreach_copy_(layout.views(a), gs)
    dot, sq = spard_ext.project_reduce(layout, a)
    rdot, rsq = spard_ext.project_reduce(qs, gs)
    torch.testing.assert_close((dot, sq), (rdot, rsq), rtol=1e-6, atol=0)
    coef = spard_ext.project_apply_(layout, a, dot, sq, 1.0, use_dot=True)
    rcoef = spard_ext.project_apply_(qs, gs, rdot, rsq, 1.0, use_dot=True)
    torch.testing.assert_close(coef, rcoef, rtol=1e-6, atol=0)
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_write_bumps_the_version_of_every_tensor():
    ps = params([(3, 4), (5,)])
    layout = FlatLayout(ps)
    a = layout.zeros()
    a[0].fill_(1.0)
    before = [p._version for p in ps]
    spard_ext.project_(layout, a, -1.0)
    assert all(p._version > v for p, v in zip(ps, before))


def test_empty_layout():
    layout = FlatLayout([])
    assert layout.buffers == [] and layout.stale() is None
    res = spard_ext.project_(layout, [], 1.0)
    assert float(res.coef) == 0.0


# ----------------------------------------------------------------------------------------------
# Staleness
# ----------------------------------------------------------------------------------------------
def _stale_cases():
    def replaced(ps, layout):
        ps[2].data = ps[2].data.clone()
        return "tensors[2] was replaced or moved"

    def resized(ps, layout):
        ps[1].data = ps[1].data.reshape(-1)[:3]  # still inside the buffer, fewer elements
        return "tensors[1] was resized (7 -> 3 elements)"

    def moved_dtype(ps, layout):
        ps[0].data = ps[0].data.double()
        return "tensors[0] was replaced or moved"

    return {"replaced": replaced, "resized": resized, "moved": moved_dtype}


@pytest.mark.parametrize("case", ["replaced", "resized", "moved"])
def test_stale_layout_is_refused_before_writing_then_refreshes(case):
    ps = params([(2, 3), (7,), (4, 4), (5,)])
    layout = FlatLayout(ps)
    a = layout.zeros()
    a[0].fill_(1.0)
    expected = _stale_cases()[case](ps, layout)
    values = [p.detach().clone() for p in ps]
    buffer = layout.buffers[0].clone()
    for call in (lambda: spard_ext.project_(layout, a, -1.0),
                 lambda: spard_ext.project_reduce(layout, a),
                 lambda: spard_ext.project_apply_(layout, a, torch.tensor(0.0), torch.tensor(1.0), -1.0)):
        with pytest.raises(StaleLayoutError, match=re.escape(expected)) as err:
            call()
        assert "\n" not in str(err.value) and "layout.refresh()" in str(err.value)
    assert torch.equal(layout.buffers[0], buffer)  # nothing written
    assert all(torch.equal(p.detach(), v) for p, v in zip(ps, values))
    old = layout.buffers[0]
    assert layout.refresh() is True and layout.rebuilds == 1 and layout.stale() is None
    assert layout.buffers[0] is not old
    assert all(torch.equal(p.detach(), v) for p, v in zip(ps, values))  # values kept
    a = layout.zeros()
    a[0].fill_(1.0)
    spard_ext.project_(layout, a, -1.0)  # now writes the tensors as they are
    assert not torch.equal(ps[0].detach(), values[0]) or not torch.equal(ps[1].detach(), values[1])
    assert layout.refresh() is False


def test_module_converted_to_another_dtype_is_stale_then_refreshed():
    m = torch.nn.Linear(4, 3)
    layout = FlatLayout(list(m.parameters()))
    m.double()  # module._apply: the same parameters, new memory
    assert "replaced or moved" in layout.stale()
    assert layout.refresh() and [b.dtype for b in layout.buffers] == [torch.float64]
    assert m.weight.data_ptr() == layout.buffers[0].data_ptr()


def test_refresh_refuses_what_the_constructor_refuses():
    p = torch.nn.Parameter(torch.randn(3))
    layout = FlatLayout([p])
    p.data = torch.randn(3).expand(2, 3)
    with pytest.raises(ValueError, match=r"FlatLayout.refresh: tensors\[0\] has elements that share memory"):
        layout.refresh()


# ----------------------------------------------------------------------------------------------
# Bad input: one line each, naming what was expected
# ----------------------------------------------------------------------------------------------
def _bad(kind):
    p = torch.nn.Parameter(torch.randn(4, 3))
    if kind == "int":
        return [p, torch.zeros(3, dtype=torch.int64)], r"tensors\[1\] has dtype torch.int64"
    if kind == "view":
        base = torch.randn(10)
        return [base[2:5]], r"tensors\[0\] is a view of another tensor"
    if kind == "twice":
        return [p, p], r"tensors\[0\] and tensors\[1\] share memory"
    if kind == "tied":
        q = torch.nn.Parameter(torch.empty(0))
        q.data = p.data
        return [p, q], r"tensors\[0\] and tensors\[1\] share memory"
    if kind == "nonleaf":
        return [p * 2], r"is not a leaf"
    if kind == "inference":
        with torch.inference_mode():
            t = torch.randn(3)
        return [t], "inference tensor"
    if kind == "expanded":
        return [torch.randn(3).expand(4, 3)], "share memory"
    if kind == "sparse":
        return [torch.randn(3, 3).to_sparse()], "dense"
    if kind == "fsdp1":
        p._is_flat_param = True  # how FSDP marks its FlatParameter
        return [p], "an FSDP flat parameter"
    if kind == "zero3":
        p.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned parameter
        return [p], "DeepSpeed ZeRO-3"
    if kind == "foreign buffer":  # as DeepSpeed ZeRO-1/2 or FSDP use_orig_params lay out parameters
        flat = torch.zeros(100)
        p.data = flat[10:22].view(4, 3)
        return [p], r"tensors\[0\] lies inside a larger buffer \(another library's flat parameters"
    if kind == "not a list":
        return p, "must be a list of tensors"
    if kind == "none entry":
        return [p, None], r"tensors\[1\] must be a tensor, got NoneType"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["int", "view", "twice", "tied", "nonleaf", "inference", "expanded",
                                  "sparse", "fsdp1", "zero3", "foreign buffer", "not a list", "none entry"])
def test_bad_input_is_refused_in_one_line(kind):
    tensors, match = _bad(kind)
    kept = [t.data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.layout == torch.strided] \
        if isinstance(tensors, list) else []
    with pytest.raises((ValueError, TypeError), match=match) as err:
        FlatLayout(tensors)
    assert "\n" not in str(err.value)
    if isinstance(tensors, list):  # nothing was laid out
        assert [t.data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.layout == torch.strided] == kept


def test_a_second_layout_over_laid_out_tensors_takes_them_over():
    import gc

    ps = params([(3, 4), (5,)])
    first = FlatLayout(ps)
    assert FlatLayout(ps).stale() is None  # inside a live layout's buffer: ours, not another library's
    assert first.stale() is not None
    del first
    gc.collect()
    second = FlatLayout(ps)  # inside the buffer of a layout that is gone (the tensors hold it): still ours
    a = second.zeros()
    a[0].fill_(1.0)
    before = [p.detach().clone() for p in ps]
    spard_ext.project_(second, a, -1.0)
    assert not torch.equal(ps[0].detach(), before[0])
    assert second.refresh() is False


def test_names_in_messages():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="layer.0.lora_A and layer.0.lora_B share memory"):
        FlatLayout([p, p], names=["layer.0.lora_A", "layer.0.lora_B"])


def test_dtensor_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        d = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match=r"tensors\[0\] is a DTensor \(sharded by FSDP2") as err:
            FlatLayout([d])
        assert "local shards" in str(err.value)
    finally:
        dist.destroy_process_group()


def test_a_of_the_wrong_shape_is_refused():
    layout = FlatLayout(params([(3,), (4,)]) + params([(2,)], torch.bfloat16))
    with pytest.raises(ValueError, match="FlatLayout of 2 buffer"):
        spard_ext.project_(layout, [torch.zeros(7)], 1.0)
    with pytest.raises(ValueError, match="FlatLayout.views: buffers must be 2 flat tensors"):
        layout.views([torch.zeros(7), torch.zeros(3)])


# ----------------------------------------------------------------------------------------------
# SPAG with the layout
# ----------------------------------------------------------------------------------------------
def _run_spag(flat_params, steps=4, replace_at=None, dtype=torch.float32):
    from spard.spag import SafetyProjector

    tok = tiny_tokenizer()
    model = tiny_lora_model("llama", dtype=dtype)
    proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, batch_size=3, micro_batch_size=2,
                           max_step=0.5, progress=False, flat_params=flat_params)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    alphas = []
    for step in range(steps):
        if step == replace_at:  # as a load with assign=True or .to() would
            p = next(p for p in model.parameters() if p.requires_grad)
            p.data = p.data.clone()
        opt.zero_grad()
        out = model(input_ids=torch.tensor([[1, 5, 6, 7, 2]]), labels=torch.tensor([[1, 5, 6, 7, 2]]))
        out.loss.backward()
        opt.step()
        alphas.append(float(proj.step(opt)["alpha"]))
    return model, proj, alphas


def test_spag_with_layout_equals_spag_on_lists():
    m_flat, p_flat, a_flat = _run_spag(None)
    m_list, p_list, a_list = _run_spag(False)
    assert p_flat.layout is not None and p_list.layout is None
    assert all(a > 0 for a in a_flat)
    assert a_flat == pytest.approx(a_list, rel=1e-6)
    for (n, x), (_, y) in zip(m_flat.named_parameters(), m_list.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=n)
    assert all(p.data_ptr() >= p_flat.layout.buffers[0].data_ptr() for p in p_flat.params)


def test_spag_lays_out_again_after_a_parameter_is_replaced():
    m_flat, p_flat, a_flat = _run_spag(None, replace_at=2)
    m_list, _, a_list = _run_spag(False, replace_at=2)
    assert p_flat.layout.rebuilds == 1
    assert a_flat == pytest.approx(a_list, rel=1e-6)
    for x, y in zip(m_flat.parameters(), m_list.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_spag_flat_params_settings():
    from spard.spag import SafetyProjector

    tok, model = tiny_tokenizer(), tiny_lora_model("llama")
    with pytest.raises(ValueError, match="flat_params=True applies to mode='paper'"):
        SafetyProjector(model, safe_rows(), tok, mode="official", flat_params=True, progress=False)
    with pytest.raises(ValueError, match="flat_params must be None"):
        SafetyProjector(model, safe_rows(), tok, flat_params="yes", progress=False)
    official = SafetyProjector(model, safe_rows(), tok, mode="official", progress=False)
    assert official.flat_params is False
    p = next(p for p in model.parameters() if p.requires_grad)
    p.ds_id = 3  # a ZeRO-3 partition: automatic mode stays on lists, an explicit ask is refused
    assert SafetyProjector(model, safe_rows(), tok, progress=False).flat_params is False
    with pytest.raises(ValueError, match=r"flat_params=True: base_model\.model\..*lora_A.* is a DeepSpeed ZeRO-3"):
        SafetyProjector(model, safe_rows(), tok, flat_params=True, progress=False)


def test_peft_adapter_saves_and_loads_after_layout(tmp_path):
    from peft import PeftModel

    from test_spag import tiny_model

    model, proj, _ = _run_spag(None, steps=2)
    model.save_pretrained(tmp_path / "adapter")  # safetensors refuses shared storage unless handled
    again = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter")
    for (n, x), (_, y) in zip(model.named_parameters(), again.named_parameters()):
        if "lora" in n:
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=n)


def test_full_model_saves_and_loads_after_layout(tmp_path):
    # every parameter in one buffer: transformers' save_pretrained must see disjoint views, not shared tensors
    import transformers as tf

    from test_spag import tiny_model

    model = tiny_model("llama")
    FlatLayout(list(model.parameters()))
    model.save_pretrained(tmp_path)
    again = tf.LlamaForCausalLM.from_pretrained(tmp_path)
    for (n, x), (_, y) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(x, y), n


def test_spag_automatic_mode_falls_back_to_lists_when_parameters_change_kind():
    # parameters taken over by another library between the projector's construction and its
    # first step: the automatic mode projects the lists; an explicit flat_params=True says why not
    from spard.spag import SafetyProjector

    results = {}
    for asked in (None, True):
        tok, model = tiny_tokenizer(), tiny_lora_model("llama")
        proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, batch_size=2, progress=False, flat_params=asked)
        assert proj.flat_params is True
        p = proj.params[0]
        foreign = torch.zeros(p.numel() + 8)
        with torch.no_grad():
            foreign[4:4 + p.numel()].copy_(p.reshape(-1))
        p.data = foreign[4:4 + p.numel()].view(p.shape)
        if asked:
            with pytest.raises(ValueError, match="lies inside a larger buffer"):
                proj.step()
        else:
            before = p.detach().clone()
            results[asked] = float(proj.step()["alpha"])
            assert proj.flat_params is False and proj.layout is None
            assert not torch.equal(p.detach(), before)  # projected through the lists, in place
            assert foreign.data_ptr() + 4 * 4 == p.data_ptr()  # still in the other library's buffer
    assert results[None] > 0
