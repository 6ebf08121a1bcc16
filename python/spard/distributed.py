"""SPARD on several processes: DDP and FSDP2 under ``torchrun`` / ``accelerate launch``.

What changes when training runs on W ranks (docs/distributed.md):

- Batches are global: every rank draws the same seeded order and takes its contiguous share
  (:func:`rank_share`), so W ranks see exactly the batch one process would see.
- The safety loss ℓ is a token mean over the whole safety batch: token counts and loss sums are
  all-reduced. Under DDP (replicated parameters) the safety gradients are all-reduced too; under
  FSDP2 (``fully_shard``: each rank holds a shard of every parameter) the gradient shards come
  from FSDP's reduce-scatter and ``||g||²`` is the all-reduced sum of the shards' partial sums
  (``spard_ext.project_reduce`` -> all_reduce -> ``spard_ext.project_apply_`` on the local shard).
  ℓ and ||g||² are identical on every rank after the reductions, so α is too.
- A non-finite ℓ or ||g||² on any rank turns the reduced values non-finite on every rank (NaN and
  inf survive a sum), so every rank skips the projection for that step: no extra collective.
- The safe-set selection runs on rank 0 and is broadcast (:func:`run_on_main`).
- Checkpoints hold full (gathered) tensors, written by rank 0, so they are the single-process
  format and a run may resume on another number of ranks.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is used rather than FSDP1: it shards every
parameter on dim 0 as a DTensor, handles frozen and trainable (LoRA) parameters in the same
module, runs on CPU with gloo as well as on GPUs with NCCL, and is the FSDP that torch develops.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import spard_ext


STRATEGIES = ("ddp", "fsdp")


# ----------------------------------------------------------------------------------------------
# Process group
# ----------------------------------------------------------------------------------------------
def is_distributed(group=None) -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_distributed() -> bool:
    """True when started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: Optional[str] = None, timeout_s: float = 1800) -> bool:
    """Starts the default process group from the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...); a no-op for one process or when a group is already running.

    The backend defaults to NCCL when CUDA is available (each rank then uses cuda:LOCAL_RANK),
    else gloo. Returns whether training is distributed.
    """
    if not launched_distributed():
        return is_distributed()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return is_distributed()


def shutdown() -> None:
    """Destroys the default process group if one is running (the end of a launched command).

    A wrapped model that is only cyclic garbage still holds the group (through its device
    mesh); collecting it first lets the group's threads be joined now rather than during
    interpreter teardown.
    """
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier(group=None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


# ----------------------------------------------------------------------------------------------
# Sharing work and results
# ----------------------------------------------------------------------------------------------
def rank_share(items: Sequence, rank: Optional[int] = None, world_size: Optional[int] = None,
               group=None) -> list:
    """This rank's contiguous share of ``items``; shares differ in size by at most one and,
    concatenated in rank order, give ``items`` back."""
    rank = get_rank(group) if rank is None else rank
    world_size = get_world_size(group) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank_share: expected 0 <= rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")
    n = len(items)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(items[start:start + base + (rank < extra)])


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects)."""
    if not is_distributed(group):
        return obj
    box = [obj if get_rank(group) == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def run_on_main(fn: Callable, *args, group=None, **kwargs) -> Any:
    """Runs ``fn`` on rank 0 only and returns its result on every rank.

    Used for the RD-DPP selection: one computation, so no rank trains on a different safe set.
    An exception on rank 0 is raised on every rank (instead of leaving them waiting).
    """
    if not is_distributed(group):
        return fn(*args, **kwargs)
    result, error = None, None
    if get_rank(group) == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # shipped to the other ranks, then raised everywhere
            error = e
    result, error = broadcast_object((result, error), src=0, group=group)
    if error is not None:
        raise error
    return result


def all_reduce_sum(tensors: Sequence[Tensor], group=None) -> None:
    """Sums 0-d/any tensors over ranks in place, with one collective (they are packed)."""
    if not is_distributed(group) or not tensors:
        return
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def global_count(count: int, device, group=None) -> Tensor:
    """A host count summed over ranks, as a 0-d float32 tensor on ``device``."""
    t = torch.tensor(float(count), dtype=torch.float32, device=device)
    if is_distributed(group):
        dist.all_reduce(t, group=group)
    return t


# ----------------------------------------------------------------------------------------------
# Sharded tensors
# ----------------------------------------------------------------------------------------------
def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: Optional[Tensor]) -> Optional[Tensor]:
    """The rank's local shard of a DTensor (a view: writes reach the parameter); else ``t``."""
    if t is None:
        return None
    return t.to_local() if is_sharded(t) else t


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor (gathered from every rank for a DTensor: a collective)."""
    return t.full_tensor() if is_sharded(t) else t


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (FSDP2 modules are not wrappers)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def project_across_ranks(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]], b: Tensor, *,
                         max_step: Optional[float] = None, use_dot: bool = False,
                         group=None) -> tuple[Tensor, Tensor]:
    """SPAG projection ``θ <- θ - clamp(-b / ||g||², 0, max_step) · g`` over every rank.

    Replicated parameters (DDP: ``grads`` already all-reduced) need no communication. Sharded
    parameters (FSDP2 DTensors) work on the local shards: the partial ``||g||²`` is all-reduced,
    then each rank updates its shard with the same α. Returns (α, ||g||²) as 0-d tensors.
    """
    xs = [local_tensor(p) for p in params]
    gs = [local_tensor(g) for g in grads]
    device = xs[0].device if xs else b.device
    dot, sqnorm = spard_ext.project_reduce(xs, gs, use_dot=use_dot, device=device)
    if any(is_sharded(p) for p in params) and is_distributed(group):
        all_reduce_sum([dot, sqnorm], group=group)
    coef = spard_ext.project_apply_(xs, gs, dot, sqnorm, b, max_step=max_step, use_dot=use_dot)
    return coef, sqnorm


# ----------------------------------------------------------------------------------------------
# Wrapping a model
# ----------------------------------------------------------------------------------------------
def default_strategy() -> str:
    """fsdp under ``accelerate launch --use_fsdp`` (ACCELERATE_USE_FSDP=true), else ddp."""
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") else "ddp"


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Blocks to shard one by one: the classes a transformers model names in _no_split_modules
    (its decoder layers), else the entries of its longest ModuleList."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def wrap_model(model: torch.nn.Module, strategy: str = "ddp", *, group=None) -> torch.nn.Module:
    """Wraps ``model`` (already on its device, LoRA applied) for data-parallel training.

    ddp: ``DistributedDataParallel`` (parameters replicated, gradients all-reduced).
    fsdp: FSDP2 ``fully_shard`` on every decoder layer, then on the root (parameters sharded).
    With one process the model is returned as it is.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not is_distributed(group):
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=group)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (get_world_size(group),))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ----------------------------------------------------------------------------------------------
# Whole trainable tensors on several ranks
# ----------------------------------------------------------------------------------------------
def trainable_full_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """Trainable parameters by name as whole CPU tensors (a collective under FSDP: call it on
    every rank). Names are those of the unwrapped model, as in a single-process checkpoint."""
    return {n: full_tensor(p.detach()).to("cpu", copy=True).contiguous()
            for n, p in unwrap(model).named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_full_state(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copies whole tensors into the trainable parameters (into each rank's shard under FSDP)."""
    from torch.distributed.tensor import distribute_tensor

    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model's trainable parameters: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        if tuple(state[name].shape) != tuple(p.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(state[name].shape)}, "
                             f"the model's has {tuple(p.shape)}")
        value = state[name].to(device=p.device, dtype=p.dtype)
        if is_sharded(p):
            p.to_local().copy_(distribute_tensor(value, p.device_mesh, p.placements).to_local())
        else:
            p.copy_(value)
