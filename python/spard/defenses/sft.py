"""SFT: plain LoRA fine-tuning on the user's data (no defense)."""

from __future__ import annotations

from .base import Defense


class SFT(Defense):
    NAME = "sft"
    STAGE = "fine-tuning"
    NEEDS = ("user",)
