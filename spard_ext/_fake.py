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
