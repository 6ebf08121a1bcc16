"""Model loading (base + LoRA adapter) and batched generation.

Prompts go through ``spard.formatting.prompt_ids``, so the model sees exactly the text it was
trained on (its chat template, else the instruction template). Batches are left padded, greedy
unless sampling is asked for, and every row is cut at its first end-of-sequence token.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from spard.formatting import pad_id_of, prompt_ids
from spard.io import read_jsonl, write_jsonl_atomic

log = logging.getLogger(__name__)

__all__ = [
    "AdapterError",
    "check_adapter",
    "eos_ids_of",
    "generate",
    "generate_from_ids",
    "load_generations",
    "load_model",
    "read_adapter_config",
    "save_generations",
]


class AdapterError(ValueError):
    """The LoRA adapter is missing or does not fit the base model."""


# --------------------------------------------------------------------------------------- loading
def _adapter_tensors(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the adapter's saved tensors, read without loading them."""
    st = adapter_dir / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    bin_path = adapter_dir / "adapter_model.bin"
    if bin_path.is_file():
        state = torch.load(bin_path, map_location="meta", weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    raise AdapterError(
        f"adapter {str(adapter_dir)!r} has adapter_config.json but no adapter_model.safetensors "
        "or adapter_model.bin"
    )


def read_adapter_config(adapter: str | os.PathLike) -> dict:
    """The adapter's ``adapter_config.json``; AdapterError when the folder or file is missing."""
    adapter_dir = Path(adapter)
    cfg_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.exists():
        raise AdapterError(f"adapter not found: {str(adapter_dir)!r} does not exist")
    if not cfg_path.is_file():
        raise AdapterError(f"adapter {str(adapter_dir)!r} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: malformed JSON ({e.msg})") from None


def check_adapter(model: torch.nn.Module, adapter: str | os.PathLike) -> dict:
    """Checks that ``adapter`` (a PEFT LoRA folder) exists and fits ``model`` module by module
    (names and shapes), before any weight is loaded. Returns the adapter's config as a dict.
    Raises AdapterError naming the first module that does not fit."""
    adapter_dir = Path(adapter)
    config = read_adapter_config(adapter_dir)
    made_for = config.get("base_model_name_or_path")
    modules = dict(model.named_modules())
    for key, shape in _adapter_tensors(adapter_dir).items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        # "base_model.model.<module path>.lora_A.weight" -> "<module path>"
        path = key.split(".lora_")[0]
        if path.startswith("base_model.model."):
            path = path[len("base_model.model."):]
        module = modules.get(path)
        if module is None:
            raise AdapterError(
                f"adapter {str(adapter_dir)!r} was made for another base model (made for {made_for!r}): "
                f"it adapts module {path!r}, which this model does not have"
            )
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue  # embeddings / convs: leave the detailed check to peft
        out_f, in_f = weight.shape
        if ".lora_A." in key and len(shape) == 2 and shape[1] != in_f:
            raise AdapterError(
                f"adapter {str(adapter_dir)!r} was made for another base model (made for {made_for!r}): "
                f"module {path!r} takes {in_f} inputs here, the adapter expects {shape[1]}"
            )
        if ".lora_B." in key and len(shape) == 2 and shape[0] != out_f:
            raise AdapterError(
                f"adapter {str(adapter_dir)!r} was made for another base model (made for {made_for!r}): "
                f"module {path!r} gives {out_f} outputs here, the adapter expects {shape[0]}"
            )
    return config


def _resolve_dtype(dtype):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {dtype!r}")
    return names[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_name_or_path: str, adapter: str | None = None, *, device=None, dtype="auto",
               merge: bool = True):
    """Loads a causal LM and its tokenizer, then the LoRA adapter (checked first with
    ``check_adapter``), merged into the weights for faster generation unless ``merge=False``.
    The tokenizer comes from the adapter folder when training saved one there, else from the
    base model. Returns (model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_source = model_name_or_path
    if adapter is not None:
        config = read_adapter_config(adapter)  # a missing adapter fails before the base model is loaded
        made_for = config.get("base_model_name_or_path")
        if made_for and Path(str(made_for)).name != Path(str(model_name_or_path)).name:
            # Same shapes, other weights (e.g. base vs instruct) cannot be detected; say so.
            log.warning("adapter %s was trained on %r; loading it onto %r", adapter, made_for, model_name_or_path)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_source = str(adapter)  # the tokenizer training used (pad token, chat template)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=_resolve_dtype(dtype))
    if adapter is not None:
        from peft import PeftModel

        check_adapter(model, adapter)
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    model.to(torch.device(device) if device is not None else default_device())
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------ generation
def eos_ids_of(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's plus the model's generation config's (chat models
    often end turns with a token other than the tokenizer's eos)."""
    ids: list[int] = []
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _check_common(max_new_tokens, batch_size, do_sample) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__} {do_sample!r}")


@torch.no_grad()
def generate_from_ids(model, tokenizer, ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                      batch_size: int = 8, do_sample: bool = False, desc: str = "generating",
                      progress: bool = True, **sampling) -> list[list[int]]:
    """Generates from already-tokenised inputs; returns the new token ids of each row, cut before
    the first end-of-sequence token. Rows are batched by length (less padding) and left padded;
    the output keeps the input order."""
    _check_common(max_new_tokens, batch_size, do_sample)
    if any(len(x) == 0 for x in ids):
        raise ValueError("every input must have at least one token")
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    eos = eos_ids_of(model, tokenizer)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[list[int] | None] = [None] * len(ids)
    if do_sample:
        gen_kwargs = {"do_sample": True, **sampling}
    else:  # override sampling defaults a generation config may carry (they would only warn)
        gen_kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    bar = tqdm(total=len(ids), desc=desc, unit="seq", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            n = len(ids[i])
            input_ids[row, width - n:] = torch.as_tensor(list(ids[i]), dtype=torch.long)
            mask[row, width - n:] = 1
        result = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens, pad_token_id=pad_id,
            eos_token_id=eos or None, **gen_kwargs,
        )
        new = result[:, width:].tolist()
        for row, i in enumerate(chunk):
            tokens = new[row]
            cut = next((t for t, tok in enumerate(tokens) if tok in eos), len(tokens))
            out[i] = tokens[:cut]
        bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 512, batch_size: int = 8,
             do_sample: bool = False, progress: bool = True, desc: str = "generating", **sampling) -> list[str]:
    """Responses to ``prompts`` (rendered as in training), greedy unless ``do_sample=True``."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    new = generate_from_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            do_sample=do_sample, progress=progress, desc=desc, **sampling)
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]


# ---------------------------------------------------------------------------------- saved output
def save_generations(path, prompts: Sequence[str], responses: Sequence[str], extra: Sequence[dict] | None = None) -> None:
    """Writes (prompt, response) rows as JSON Lines (atomically), so judging can be rerun
    without generating again. ``extra``: per-row fields to keep (gold answers, ...)."""
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses differ in length: {len(prompts)} vs {len(responses)}")
    rows = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        rows.append({**(extra[i] if extra else {}), "prompt": p, "response": r})
    write_jsonl_atomic(path, rows)


def load_generations(path) -> list[dict]:
    """Rows written by ``save_generations``; each must have string ``prompt`` and ``response``."""
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise ValueError(f"{path}: row {lineno} needs string fields 'prompt' and 'response'")
    return rows
