"""Fake (meta) implementations so the ops trace under torch.compile and FakeTensor."""

import torch


def _scalar_like(device):
    return torch.empty((), dtype=torch.float32, device=device)


@torch.library.register_fake("spard_ext::project_reduce")
def _project_reduce_fake(x, a, use_dot):
    torch._check(len(x) > 0, lambda: "project_reduce: x must not be empty")
    return _scalar_like(x[0].device), _scalar_like(x[0].device)


@torch.library.register_fake("spard_ext::project_apply_")
def _project_apply_fake(x, a, dot, sqnorm, b, max_step, use_dot):
    return _scalar_like(x[0].device if x else b.device)


@torch.library.register_fake("spard_ext::project_")
def _project_fake(x, a, b, max_step, use_dot):
    device = x[0].device if x else b.device
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
