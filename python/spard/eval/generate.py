"""Model loading (base + LoRA adapter) and batched generation.

Prompts go through ``spard.formatting.prompt_ids``, so the model sees exactly the text it was
trained on (its chat template, else the instruction template). Batches are left padded, greedy
unless sampling is asked for, and every row is cut at its first end-of-sequence token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from spard.formatting import pad_id_of, prompt_ids
from spard.io import read_jsonl, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

__all__ = [
    "AdapterError",
    "BASE_FINGERPRINT_FILE",
    "LONG_PROMPTS",
    "base_model_fingerprint",
    "check_adapter",
    "context_length",
    "eos_ids_of",
    "fit_prompt_ids",
    "generate",
    "generate_from_ids",
    "load_generations",
    "load_model",
    "read_adapter_config",
    "save_generations",
    "weights_fingerprint",
    "write_base_fingerprint",
]


class AdapterError(ValueError):
    """The LoRA adapter is missing or does not fit the base model."""


# ------------------------------------------------------------------------ base-model fingerprint
BASE_FINGERPRINT_FILE = "base_model.json"
# The config.json fields that tell one model from another (sizes, positions, vocabulary, special
# tokens): a base and an instruct model of one family usually differ in their eos token at least.
# Names and paths, dtypes, attention kernels and cache switches are left out: they are about how a
# model is loaded, not which model it is.
FINGERPRINT_FIELDS = (
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "sliding_window", "rms_norm_eps", "layer_norm_eps",
    "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id", "eos_token_id", "n_embd", "n_layer",
    "n_head", "n_inner", "n_positions", "n_ctx", "activation_function",
)


def _base_of(model):
    """The plain transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_model_fingerprint(model_or_config) -> dict:
    """What identifies a base model: its architecture (the model class; None for a bare config)
    and a sha256 of config.json's identifying fields (``FINGERPRINT_FIELDS``),
    with the fields themselves so a mismatch can be named. Takes a model (peft-wrapped or not)
    or a transformers config."""
    config = getattr(_base_of(model_or_config), "config", model_or_config)
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    fields = {k: raw[k] for k in FINGERPRINT_FIELDS if raw.get(k) is not None}
    fields = json.loads(json.dumps(fields, sort_keys=True, default=str))  # plain JSON values
    # A model's class is its architecture; a bare config leaves it to its "architectures" field
    # (AutoModelForCausalLM may load another class than the one config.json names first).
    architecture = None if hasattr(model_or_config, "to_dict") else type(_base_of(model_or_config)).__name__
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()
    return {"architecture": architecture, "config_sha256": digest, "config_fields": fields}


def write_base_fingerprint(adapter_dir: str | os.PathLike, model) -> Path:
    """Records ``base_model_fingerprint(model)`` as ``base_model.json`` in the adapter's folder
    (call it where the adapter is saved), so `spard eval --adapter` can tell the base model the
    adapter was trained on from another one that merely has the same folder name."""
    path = Path(adapter_dir) / BASE_FINGERPRINT_FILE
    write_json_atomic(path, {"format": 1, **base_model_fingerprint(model)})
    return path


def _recorded_fingerprint(adapter_dir: Path) -> dict | None:
    path = adapter_dir / BASE_FINGERPRINT_FILE
    if not path.is_file():
        return None  # an older adapter, or one from another tool: architecture and shapes only
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: malformed JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config_fields"), dict):
        raise AdapterError(f"{path}: expected an object with 'config_fields'")
    return recorded


def _check_fingerprint(adapter_dir: Path, recorded: dict | None, model_or_config, base_name) -> None:
    """Refuses a base model whose architecture or identifying config fields differ from those
    recorded when the adapter was saved."""
    if recorded is None:
        return
    here = base_model_fingerprint(model_or_config)
    where = f"adapter {str(adapter_dir)!r} was trained on another base model than {str(base_name)!r}"
    if recorded.get("architecture") and here["architecture"] and recorded["architecture"] != here["architecture"]:
        raise AdapterError(f"{where}: architecture {recorded['architecture']}, this model is {here['architecture']}")
    if recorded.get("config_sha256") == here["config_sha256"]:
        return
    theirs, ours = recorded["config_fields"], here["config_fields"]
    # Fields present on one side only come from another transformers version's config layout.
    differ = [k for k in sorted(set(theirs) & set(ours)) if theirs[k] != ours[k]]
    if differ:
        k = differ[0]
        more = f" (and {len(differ) - 1} more field(s))" if len(differ) > 1 else ""
        raise AdapterError(f"{where}: config.json's {k} is {ours[k]!r} here, {theirs[k]!r} in the model the "
                           f"adapter was trained on{more}")


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
    """Checks that ``adapter`` (a PEFT LoRA folder) exists and belongs to ``model`` before any of
    its weights is loaded: the architecture and config fingerprint recorded when it was saved
    (``base_model.json``, see ``write_base_fingerprint``; adapters without one skip this), then
    module by module the names and shapes of the adapted modules. Returns the adapter's config as
    a dict. Raises AdapterError naming the first difference."""
    adapter_dir = Path(adapter)
    config = read_adapter_config(adapter_dir)
    made_for = config.get("base_model_name_or_path")
    _check_fingerprint(adapter_dir, _recorded_fingerprint(adapter_dir), model,
                       getattr(getattr(model, "config", None), "name_or_path", None) or made_for)
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
        recorded = _recorded_fingerprint(Path(adapter))
        if recorded is not None:  # the base's config.json, before its weights are loaded
            from transformers import AutoConfig

            _check_fingerprint(Path(adapter), recorded, AutoConfig.from_pretrained(model_name_or_path),
                               model_name_or_path)
        elif made_for and Path(str(made_for)).name != Path(str(model_name_or_path)).name:
            # No recorded fingerprint: shapes are checked, other weights of one shape cannot be.
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


LONG_PROMPTS = ("truncate", "error")
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


def context_length(model) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` or its equivalents in the
    config); None when the config names none."""
    config = getattr(model, "config", None)
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def fit_prompt_ids(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                   long_prompts: str = "truncate", what: str = "prompt",
                   new_tokens_name: str = "max_new_tokens") -> tuple[list[list[int]], list[int]]:
    """Rendered prompt ids (``spard.formatting.prompt_ids``) that leave room for
    ``max_new_tokens`` in the model's context. A longer prompt is left-truncated: its beginning
    is dropped and its end kept, inside the template (the chat template or the instruction
    template stays whole); with ``long_prompts="error"`` it is refused instead (ValueError).
    Returns (ids per prompt, indices of the truncated prompts). Errors name the option both
    ways (``long_prompts`` / ``--long-prompts``; ``new_tokens_name`` and its flag)."""
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts must be one of {', '.join(LONG_PROMPTS)}, got {long_prompts!r}")
    context = context_length(model)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    if context is None:
        return ids, []
    limit = context - max_new_tokens
    if limit < 1:
        flag = "--" + new_tokens_name.replace("_", "-")
        raise ValueError(f"{flag} ({new_tokens_name}): {max_new_tokens} new tokens leave no room for a prompt in "
                         f"the model's context of {context} tokens")
    truncated = []
    for i, row in enumerate(ids):
        if len(row) <= limit:
            continue
        if long_prompts == "error":
            raise ValueError(f"--long-prompts error (long_prompts='error'): {what} {i} is {len(row)} tokens long, "
                             f"beyond the {limit} the model's context leaves it ({context} tokens less "
                             f"{max_new_tokens} new ones); 'truncate' keeps its end")
        ids[i] = _left_truncate(tokenizer, prompts[i], limit)
        truncated.append(i)
    return ids, truncated


def _left_truncate(tokenizer, prompt: str, limit: int) -> list[int]:
    """The rendered ids of the longest end of ``prompt`` that fits in ``limit`` tokens."""
    text_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = limit - len(prompt_ids(tokenizer, ""))  # what the template leaves for the prompt
    while keep > 0:
        ids = prompt_ids(tokenizer, tokenizer.decode(text_ids[-keep:]))
        if len(ids) <= limit:
            return ids
        keep -= max(1, len(ids) - limit)  # decoding and re-encoding may merge tokens differently
    return prompt_ids(tokenizer, prompt)[-limit:]  # the template alone is too long: keep its end


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """A sha256 over the model's class, its config's identifying fields (``FINGERPRINT_FIELDS``)
    and every parameter's name, shape, dtype and sum (one pass over the weights, one host read
    per tensor): tells two models apart, a merged adapter included, without hashing every byte."""
    base = _base_of(model)
    config = base_model_fingerprint(base)["config_sha256"] if hasattr(base, "config") else None
    sums, meta = [], []
    for name, p in base.named_parameters():
        meta.append([name, list(p.shape), str(p.dtype)])
        sums.append(p.detach().sum(dtype=torch.float32).cpu() if p.numel() else torch.zeros(()))
    values = torch.stack(sums).tolist() if sums else []
    blob = json.dumps([type(base).__name__, config, meta, [repr(v) for v in values]])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


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
                      progress: bool = True,
                      on_batch: Callable[[list[int], list[list[int]]], None] | None = None,
                      **sampling) -> list[list[int]]:
    """Generates from already-tokenised inputs; returns the new token ids of each row, cut before
    the first end-of-sequence token. Rows are batched by length (less padding) and left padded;
    the output keeps the input order. ``on_batch(indices, tokens)`` is called after each batch
    with the rows it generated (to keep them as they come)."""
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
        if on_batch is not None:
            on_batch(list(chunk), [out[i] for i in chunk])
        bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]


def decode_response(tokenizer, tokens: Sequence[int]) -> str:
    """A response's text from its new token ids."""
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def check_prompts(prompts) -> None:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 512, batch_size: int = 8,
             do_sample: bool = False, progress: bool = True, desc: str = "generating",
             long_prompts: str = "truncate", **sampling) -> list[str]:
    """Responses to ``prompts`` (rendered as in training), greedy unless ``do_sample=True``.
    Prompts beyond the model's context less ``max_new_tokens`` are left-truncated, or refused
    with ``long_prompts="error"`` (``fit_prompt_ids``)."""
    check_prompts(prompts)
    _check_common(max_new_tokens, batch_size, do_sample)
    ids, _ = fit_prompt_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, long_prompts=long_prompts)
    new = generate_from_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            do_sample=do_sample, progress=progress, desc=desc, **sampling)
    return [decode_response(tokenizer, t) for t in new]


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
