"""Pick a small safety subset from a large pool: RD-DPP (relevant and diverse) and the baselines
it is measured against.

For pool item i with unit embedding ê_i, relevance to the user's fine-tuning set D_ft is
``q_i = max_z cos(ê_i, ê_z)``; quality ``r_i = clamp(q_i, 0)^β``; the kernel is
``L = F Fᵀ + ε I`` with ``F = diag(r) Ê`` (never built as an N x N matrix), and greedy MAP
inference (`spard_ext.dpp_greedy`) picks ``k = floor(p · |D_ft|)`` items. The other methods
(``random``, ``relevance``, ``dpp``, ``k-center``, ``behavior-aware``) live in
``spard.selectors``, one module each. Every pick is measured by ``spard.selection_quality``.
See docs/algorithms.md, "RD-DPP", and docs/data-and-selection.md.
"""

from __future__ import annotations

import math
import time
from fractions import Fraction
from typing import Optional, Sequence

import torch

from spard.data import prompt_text
from spard.selectors import METHODS as SELECTORS
from spard.selectors import Candidates
from spard.selectors.rd_dpp import EPS
from spard.selectors.rd_dpp import factor as dpp_factor

METHODS = tuple(SELECTORS)
METHOD_ALIASES = {**{name: name for name in METHODS}, "relevance-only": "relevance"}


def normalise_method(method: str) -> str:
    if method not in METHOD_ALIASES:
        raise ValueError(f"method: expected one of {', '.join(METHOD_ALIASES)}, got {method!r}")
    return METHOD_ALIASES[method]


def subset_size(p: float, n_reference: int) -> int:
    """k = floor(p · |D_ft|), exact for decimal p."""
    return math.floor(Fraction(repr(float(p))) * n_reference)


def unit_rows(emb: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(emb.to(torch.float32), dim=1)


def relevance(
    pool: torch.Tensor, reference: torch.Tensor, *, pool_block: int = 4096, reference_block: int = 16384
) -> torch.Tensor:
    """q_i = max_z <pool_i, reference_z> for unit-norm rows, computed in blocks so memory stays
    at pool_block x reference_block floats whatever the sizes (a million-row pool against a
    100k-row reference included)."""
    if pool.ndim != 2 or reference.ndim != 2 or pool.shape[1] != reference.shape[1]:
        raise ValueError(f"relevance: expected [n, d] and [m, d] embeddings, got {tuple(pool.shape)} and {tuple(reference.shape)}")
    if reference.shape[0] == 0:
        raise ValueError("reference: empty set")
    q = torch.full((pool.shape[0],), -math.inf, dtype=torch.float32, device=pool.device)
    for i in range(0, pool.shape[0], pool_block):
        block = pool[i : i + pool_block]
        best = q[i : i + pool_block]
        for j in range(0, reference.shape[0], reference_block):
            sims = block @ reference[j : j + reference_block].T
            torch.maximum(best, sims.amax(dim=1), out=best)
    return q


def subset_logdet(factor: torch.Tensor, indices: Sequence[int], eps: float = EPS) -> float:
    """log det of L_Y = F_Y F_Yᵀ + ε I (float64), the quantity greedy DPP maximises."""
    if len(indices) == 0:
        return 0.0
    f = factor[torch.as_tensor(list(indices), dtype=torch.long, device=factor.device)].double()
    kernel = f @ f.T + eps * torch.eye(f.shape[0], dtype=torch.float64, device=f.device)
    sign, logdet = torch.linalg.slogdet(kernel)
    return float(logdet) if float(sign) > 0 else -math.inf


def pick(method: str, candidates: Candidates, k: int) -> list[int]:
    """Indices of the k picked pool items (in pick order for the greedy methods)."""
    if k == 0:
        return []
    return SELECTORS[normalise_method(method)].pick(candidates, k)


def _stats(values: torch.Tensor) -> dict:
    if values.numel() == 0:
        return {"mean": None, "min": None, "max": None}
    v = values.double()
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}


def pool_labels(pool: Sequence[dict], category_field: Optional[str]) -> tuple[Optional[str], Optional[list]]:
    """The pool rows' harm-category labels: from ``category_field`` (an error when no row has
    it), or, when None, from ``category`` if any row has one; (field, None) when there are none."""
    field = category_field or "category"
    if not any(r.get(field) is not None for r in pool):
        if category_field is not None:
            raise ValueError(f"category_field: no pool row has a {category_field!r} field")
        return None, None
    from spard.selection_quality import label_set

    labels = [r.get(field) for r in pool]
    for i, value in enumerate(labels):
        try:
            label_set(value)
        except ValueError as e:
            raise ValueError(f"pool row {i}: {e}") from None
    return field, labels


def select_safe_data(
    pool: Sequence[dict],
    reference: Optional[Sequence[dict]] = None,
    *,
    method: str = "rd-dpp",
    k: int | None = None,
    p: float = 0.03,
    beta: float = 4.0,
    embedder=None,
    seed: int = 0,
    cache_dir=None,
    device: str | torch.device | None = None,
    embedder_settings: dict | None = None,
    category_field: Optional[str] = None,
) -> tuple[list[int], dict]:
    """Picks ``k`` (default ``floor(p · |reference|)``) rows of ``pool`` for the safety set.

    ``pool`` and ``reference`` are rows with a ``prompt`` (the reference is the fine-tuning set
    as submitted, harmful rows included; the methods that do not use it, ``random``, ``dpp``,
    ``k-center`` and ``behavior-aware``, take ``reference=None`` with an explicit ``k``).
    ``embedder`` is a model name/path (the paper uses the base LLM; ``"minilm"`` is a light
    sentence encoder) or an object with ``.embed(texts)``; ``random`` needs none. Returns
    ``(indices into pool, report)``; the report holds k, method, relevance of the picked rows,
    the log det of their RD-DPP kernel, the pick's quality (``spard.selection_quality``:
    coverage, redundancy, task relevance, categories covered) and per-stage timings.
    ``category_field`` names the rows' harm-category field (default: ``category`` when the rows
    have one).
    """
    t_start = time.perf_counter()
    method = normalise_method(method)
    needs = SELECTORS[method].needs
    pool, reference = list(pool), list(reference or [])
    if not pool:
        raise ValueError("pool: empty set")
    if "reference" in needs and not reference:
        raise ValueError(f"reference: the {method} method needs the task rows (the user's fine-tuning set); none given")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta: expected a finite number >= 0, got {beta!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    k_from_p = k is None
    if k is None:
        if not reference:
            raise ValueError("k: give k (there are no task rows to derive it from p)")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p) or not math.isfinite(p):
            raise ValueError(f"p: expected a finite number >= 0, got {p!r}")
        k = subset_size(p, len(reference))
    elif isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected a non-negative int or None, got {k!r}")
    if k > len(pool):
        raise ValueError(f"k: {k} exceeds the pool size {len(pool)}")
    if k == 0:  # an empty safe set is never what a caller wants: say so instead of returning []
        how = f"k = floor(p · |reference|) = floor({p} · {len(reference)}) = 0" if k_from_p else "k = 0"
        raise ValueError(f"k: the selection would be empty ({how}); give k >= 1 or a larger p")
    if embedder is None and "embeddings" in needs:
        raise ValueError(
            f"embedder: required for {method}; pass the base model's name or path "
            "(the paper's choice), 'minilm', or an object with .embed(texts)"
        )
    field, labels = pool_labels(pool, category_field)

    timings: dict[str, float] = {}
    report: dict = {
        "method": method,
        "k": k,
        "p": p,
        "beta": beta,
        "seed": seed,
        "n_pool": len(pool),
        "n_reference": len(reference),
    }
    pool_texts = [prompt_text(r) for r in pool]
    ref_texts = [prompt_text(r) for r in reference]
    candidates = Candidates(n=len(pool), seed=seed, beta=beta, refusals=[r.get("safe") or "" for r in pool],
                            categories=labels)
    q = factor = ref_unit = None
    if embedder is not None:
        from spard.embed import default_device, embed_texts, resolve_embedder

        t = time.perf_counter()
        emb = resolve_embedder(embedder, **(embedder_settings or {}))
        timings["load_embedder"] = time.perf_counter() - t
        report["embedder"] = getattr(emb, "name", type(emb).__name__)
        if callable(getattr(emb, "settings", None)):
            report["embedder_settings"] = emb.settings()

        t = time.perf_counter()
        pool_emb, hit_pool = embed_texts(emb, pool_texts, cache_dir=cache_dir)
        timings["embed_pool"] = time.perf_counter() - t
        report["cache_hits"] = {"pool": hit_pool}
        if reference:
            t = time.perf_counter()
            ref_emb, hit_ref = embed_texts(emb, ref_texts, cache_dir=cache_dir)
            timings["embed_reference"] = time.perf_counter() - t
            report["cache_hits"]["reference"] = hit_ref

        dev = torch.device(device) if device is not None else default_device()
        t = time.perf_counter()
        candidates.unit = unit_rows(pool_emb.to(dev))
        if reference:
            ref_unit = unit_rows(ref_emb.to(dev))
            q = candidates.q = relevance(candidates.unit, ref_unit)
            factor = dpp_factor(candidates.unit, q, beta)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)  # so the timing covers the work, not just its launch
        timings["relevance"] = time.perf_counter() - t

    t = time.perf_counter()
    indices = pick(method, candidates, k)
    timings["select"] = time.perf_counter() - t

    if q is not None:
        picked = torch.as_tensor(indices, dtype=torch.long, device=q.device)
        report["relevance"] = _stats(q[picked])
        report["pool_relevance"] = _stats(q)
        report["logdet"] = subset_logdet(factor, indices)
    from spard.selection_quality import selection_quality

    t = time.perf_counter()
    report["quality"] = selection_quality(candidates.unit, indices, reference_unit=ref_unit, labels=labels)
    if field is not None:
        report["quality"]["category_field"] = field
    timings["quality"] = time.perf_counter() - t
    report["k_selected"] = len(indices)
    timings["total"] = time.perf_counter() - t_start
    report["timings_s"] = {name: round(v, 4) for name, v in timings.items()}
    return indices, report
