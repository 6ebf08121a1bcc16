"""Cheap checks of input sources, run before the expensive work (loading data, models).

A path that cannot be a model fails here with one line naming the argument, instead of deep in
``transformers`` after the data was loaded and a safe set selected.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator


def _looks_like_hub_name(name: str) -> bool:
    return name.count("/") <= 1 and not name.startswith((".", "/", "~"))


def check_model_source(name: str, what: str) -> None:
    """Raises ValueError naming ``what`` when ``name`` is a local path that is not a model folder
    (a file, a folder without config.json, a missing folder). Hub names pass (they are checked
    when loaded)."""
    path = Path(str(name)).expanduser()
    if path.is_file():
        raise ValueError(f"{what}: {name} is a file; expected a model folder (config.json and weights) "
                         "or a Hugging Face model name")
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = " (it is a LoRA adapter folder: give the base model here)" if (path / "adapter_config.json").is_file() else ""
            raise ValueError(f"{what}: {name} is not a model folder (no config.json){hint}")
        return
    if not _looks_like_hub_name(str(name)):
        raise ValueError(f"{what}: {name}: no such folder")


def load_error(what: str, name: str, exc: BaseException) -> ValueError:
    """A model or tokenizer that failed to load, as one line naming the argument."""
    text = " ".join(str(exc).split())
    return ValueError(f"{what}: cannot load {name!r} ({type(exc).__name__}: {text[:300]})")


@contextlib.contextmanager
def input_named(what: str, source=None) -> Iterator[None]:
    """Prefixes a data error raised inside the block with the argument or config key ``what``
    ("safety.pool: pool.jsonl:7: missing field(s) safe ..."). With ``source``, only errors about
    that source (messages starting with its name) are prefixed."""
    try:
        yield
    except (ValueError, OSError) as e:
        text = str(e)
        if text.startswith(f"{what}:") or (source is not None and not text.startswith(str(source))):
            raise
        raise ValueError(f"{what}: {text}") from e


def check_device(name, what: str) -> None:
    """Raises ValueError naming ``what`` unless ``name`` is a device this machine has: ``cpu``,
    ``cuda`` / ``cuda:N`` with a CUDA device visible, ``mps`` where available (None and
    ``auto`` pass: they mean "cuda when present, else cpu")."""
    import torch

    if name is None or name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{what}: expected cpu, cuda or cuda:N (or auto), got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: {name!r} asked for, but torch sees no CUDA device here (torch "
                             f"{torch.__version__}); use cpu, or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what}: {name!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{what}: 'mps' asked for, but torch sees no MPS device here; use cpu, or auto")
    elif device.type != "cpu":
        raise ValueError(f"{what}: expected cpu, cuda or cuda:N (or auto), got {name!r}")
