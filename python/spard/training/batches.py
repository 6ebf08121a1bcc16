"""Global batches split into this rank's micro-batches.

Every rank draws the same seeded order of examples (:class:`~spard.training.checkpoint.ResumableOrder`),
takes its contiguous share of each global batch, and splits that share into micro-batches of at
most ``micro_batch_size`` examples. A loss that is a sum over examples divided by a global
normaliser (tokens, or weights times tokens) then gives the same gradient however the global
batch is split: over micro-batches, over ranks, or both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


from .checkpoint import ResumableOrder
from ..distributed import rank_share
from ..formatting import EncodedExample, collate, label_token_count


@dataclass
class MicroBatch:
    """One forward pass: ``batch`` (input_ids, attention_mask, labels on the device), the indices
    of its examples in the stream, and its labelled-token count (read on the host)."""

    batch: dict
    indices: list[int]
    n_tokens: int

    def __len__(self) -> int:
        return len(self.indices)


def micro_batches(examples: Sequence[EncodedExample], indices: Sequence[int], *, pad_id: int,
                  micro_batch_size: int, device=None) -> list[MicroBatch]:
    """``indices`` (already this rank's share) as collated micro-batches on ``device``."""
    out = []
    for start in range(0, len(indices), micro_batch_size):
        chunk = list(indices[start:start + micro_batch_size])
        batch = collate([examples[i] for i in chunk], pad_id)
        n_tokens = label_token_count(batch["labels"])  # on the host, before the copy: no sync
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out.append(MicroBatch(batch, chunk, n_tokens))
    return out


class BatchStream:
    """An endless, resumable stream of global batches over encoded examples.

    ``take(n)`` draws the next ``n`` examples of the global order and returns this rank's share
    as micro-batches. The state is the order's (epoch, position).
    """

    def __init__(self, examples: Sequence[EncodedExample], *, pad_id: int, micro_batch_size: int,
                 seed: int, device=None, what: str = "rows"):
        if not examples:
            raise ValueError(f"{what}: no examples to draw batches from")
        if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be an int >= 1, got {micro_batch_size!r}")
        self.examples = list(examples)
        self.pad_id, self.micro_batch_size, self.device = pad_id, micro_batch_size, device
        self.order = ResumableOrder(len(self.examples), seed=seed)
        self.what = what

    def __len__(self) -> int:
        return len(self.examples)

    def take(self, global_count: int, *, rank: Optional[int] = None,
             world_size: Optional[int] = None) -> list[MicroBatch]:
        share = rank_share(self.order.take(global_count), rank, world_size)
        return micro_batches(self.examples, share, pad_id=self.pad_id,
                             micro_batch_size=self.micro_batch_size, device=self.device)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
