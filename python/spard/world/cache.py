"""The aligned world model's cache: ``<cache dir>/<key>/`` holding ``config.json``,
``model.safetensors``, ``meta.json`` and ``base.safetensors`` (the model before its alignment,
the base model of the defenses that read the alignment direction). Written into a temporary folder then renamed, so a
crash never leaves a half-written entry; an entry that fails to load is rebuilt."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from spard.io import atomic_path, write_json_atomic


def cache_dir() -> Path:
    """``$SPARD_CACHE``, else ``$XDG_CACHE_HOME/spard``, else ``~/.cache/spard``; then ``/world``."""
    root = os.environ.get("SPARD_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "spard")
    return Path(root) / "world"


def load_cached_model(folder: str | os.PathLike, key: str) -> LlamaForCausalLM | None:
    """The cached model for ``key``, or None when the entry is missing or unreadable."""
    entry = Path(folder) / key
    if not (entry / "model.safetensors").is_file():
        return None
    try:
        config = LlamaConfig.from_pretrained(str(entry))
        model = LlamaForCausalLM(config)
        state = load_file(str(entry / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # tied output weights are saved once; anything else missing means a bad entry
        missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        if not all(torch.isfinite(t).all() for t in state.values()):
            raise ValueError("non-finite weights")
    except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt
        warnings.warn(f"world model cache entry {entry} is unreadable ({e}); rebuilding it")
        return None
    model.eval()
    return model


def _weights(model) -> dict:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def load_cached_base(folder: str | os.PathLike, key: str, config: LlamaConfig) -> LlamaForCausalLM | None:
    """The entry's model before alignment, or None when the entry has none (made before the
    base was kept) or it is unreadable."""
    path = Path(folder) / key / BASE_FILE
    if not path.is_file():
        return None
    try:
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        if [m for m in missing if m != "lm_head.weight"] or unexpected:
            raise ValueError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except Exception as e:  # noqa: BLE001 - an unreadable base is made again
        warnings.warn(f"world model cache entry {path} is unreadable ({e}); making it again")
        return None
    model.eval()
    return model


def save_cached_base(folder: str | os.PathLike, key: str, base) -> None:
    """Adds ``base.safetensors`` to an existing entry (atomically: temporary file + rename)."""
    with atomic_path(Path(folder) / key / BASE_FILE) as tmp:
        save_file(_weights(base), str(tmp))


BASE_FILE = "base.safetensors"


def save_cached_model(folder: str | os.PathLike, key: str, model, meta: dict, base=None) -> Path:
    """Writes the entry for ``key`` atomically (temporary folder + rename), with the model
    before alignment (``base``) when given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder))
    try:
        model.config.save_pretrained(str(tmp))
        save_file(_weights(model), str(tmp / "model.safetensors"))
        if base is not None:
            save_file(_weights(base), str(tmp / BASE_FILE))
        write_json_atomic(tmp / "meta.json", meta)
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry
