"""Fake (meta) implementations so the ops trace under torch.compile and FakeTensor."""

import torch


def _scalar_like(device):
    return torch.empty((), dtype=torch.float32, device=device)


def _list_device(op, x, a, scalars=()):
    """The device of the call, with the checks of the compiled kernels (check_pair_lists,
    check_scalar), so a meta tensor mixed with others fails here as it would there."""
    device = x[0].device if x else None
    for name, ts in (("x", x), ("a", a)):
        for i, t in enumerate(ts):
            torch._check_value(
                t.device == device,
                lambda: f"{op}: all tensors must be on one device: x[0] is on {device} but {name}[{i}] is on {t.device}")
    if device is None:  # no tensors in the lists: the device of the first non-CPU scalar
        device = next((t.device for _, t in scalars if t.device.type != "cpu"), torch.device("cpu"))
    for name, t in scalars:
        torch._check_value(t.device == device or t.device.type == "cpu",
                           lambda: f"{op}: {name} must be on {device} (or a CPU scalar), got {t.device}")
    return device


@torch.library.register_fake("spard_ext::project_reduce")
def _project_reduce_fake(x, a, use_dot):
    device = _list_device("project_reduce", x, a)
    return _scalar_like(device), _scalar_like(device)


@torch.library.register_fake("spard_ext::project_apply_")
def _project_apply_fake(x, a, dot, sqnorm, b, max_step, use_dot):
    return _scalar_like(_list_device("project_apply_", x, a, (("dot", dot), ("sqnorm", sqnorm), ("b", b))))


@torch.library.register_fake("spard_ext::project_")
def _project_fake(x, a, b, max_step, use_dot):
    device = _list_device("project_", x, a, (("b", b),))
    return _scalar_like(device), _scalar_like(device), _scalar_like(device)


def _dpp_fake(mat):
    # The number of picks is data dependent (eps_stop may stop early): at most min(k, N).
    n_picked = torch.library.get_ctx().new_dynamic_size()
    indices = mat.new_empty((n_picked,), dtype=torch.int64)
    gains = mat.new_empty((n_picked,), dtype=torch.float64)
    return indices, gains


@torch.library.register_fake("spard_ext::dpp_greedy_dense")
def _dpp_greedy_dense_fake(kernel, k, eps_stop, include, exclude):
    torch._check(kernel.dim() == 2 and kernel.shape[0] == kernel.shape[1],
                 lambda: "dpp_greedy_dense: kernel must be square (N x N)")
    return _dpp_fake(kernel)


@torch.library.register_fake("spard_ext::dpp_greedy_lowrank")
def _dpp_greedy_lowrank_fake(factor, k, eps, eps_stop, include, exclude, method):
    torch._check(factor.dim() == 2, lambda: "dpp_greedy_lowrank: factor must be 2-D (N x D)")
    return _dpp_fake(factor)
