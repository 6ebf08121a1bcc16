"""The autograd side of the in-place ops ``project_`` and ``project_apply_``, registered here.

The CPU kernels are built on the LibTorch stable ABI (see csrc/stable.h), whose C++ API has no
boxed kernels for the Autograd and ADInplaceOrView dispatch keys, so this side is registered with
torch.library (for every backend, the CUDA kernels included), in one Python kernel: each Python
layer converts the lists of tensors to Python objects and back, which costs more than the work
for a few hundred small tensors.

- Autograd: a fallthrough (the ops have no derivative; their outputs never require grad).
- ADInplaceOrView (every normal tensor has this key, whatever the grad mode):
  1. under grad mode, refuse to write a tensor that requires grad, as a native in-place op
     refuses a leaf (the Python entry points run under no_grad, as optimizers do);
  2. refuse an inference tensor outside inference mode;
  3. then, after the kernel ran, bump the version counter of every written tensor (a view shares
     its base's counter), as native in-place ops do, so a backward that saved one of them before
     the call raises instead of silently using the new values.
  All checks run before anything is written.

A list made only of inference tensors reaches no Python kernel (such tensors have neither key):
the entry points in project.py refuse it themselves (eager: before the call; traced by
torch.compile: through ``writable_b``, run in the graph before the op); the raw op writes it.
Eager calls of the entry points do this kernel's work themselves and call the op below it
(project.py: converting the lists to Python objects costs more than the kernels).
"""

from __future__ import annotations

import torch

WRITING_OPS = ("project_", "project_apply_")
"""Ops whose first argument (x, ``Tensor(a!)[]``) is written in place."""


def inference_error(op: str, i: int) -> RuntimeError:
    return RuntimeError(f"spard_ext::{op}: x[{i}] is an inference tensor: update it inside torch.inference_mode(), "
                        "or pass a clone")


@torch.library.custom_op("spard_ext::writable_b", mutates_args=())
def writable_b(x: list[torch.Tensor], b: torch.Tensor, op: str) -> torch.Tensor:
    """b (a copy), once every entry of x may be written: the inference check of a traced call.

    torch.compile cannot trace ``is_inference`` (its fake tensors drop it), and a list made only
    of inference tensors reaches no Python kernel, so a compiled call used to write x and only
    then fail. The entry points pass b through this op while tracing: the compiled graph runs it
    on the real tensors before the op that writes x, which takes its output (so it is neither
    dropped nor reordered), and refuses as an eager call does."""
    _check_not_inference(op, x)
    return b.clone()


@writable_b.register_fake
def _writable_b_fake(x, b, op):
    return torch.empty_like(b)


def _check_not_inference(op: str, x) -> None:
    if torch.is_inference_mode_enabled() or not any(map(torch.Tensor.is_inference, x)):
        return
    raise inference_error(op, next(i for i, t in enumerate(x) if t.is_inference()))


def _check_grad(op: str, x) -> None:
    if not torch.is_grad_enabled():
        return
    for t in x:
        if t.requires_grad:
            if t.is_leaf:
                raise RuntimeError(f"spard_ext::{op}: a leaf Variable that requires grad is being used in an in-place "
                                   "operation (call it under torch.no_grad(), as the spard_ext entry points do)")
            raise RuntimeError(f"spard_ext::{op}: has no derivative and writes a tensor that requires grad; "
                               "call it under torch.no_grad()")


def _inplace_kernel(name: str):
    op = getattr(torch.ops.spard_ext, name).default
    below = torch._C._after_ADInplaceOrView_keyset

    def kernel(keyset, x, *args):
        _check_grad(name, x)
        _check_not_inference(name, x)
        with torch._C._AutoDispatchBelowADInplaceOrView():
            out = op.redispatch(keyset & below, x, *args)
        torch.autograd.graph.increment_version(x)
        return out

    return kernel


_LIB = torch.library.Library("spard_ext", "IMPL")  # kept alive: the registrations live as long as it
for _name in WRITING_OPS:
    _LIB.impl(_name, torch.library.fallthrough_kernel, "Autograd")
    _LIB.impl(_name, _inplace_kernel(_name), "ADInplaceOrView", with_keyset=True)
