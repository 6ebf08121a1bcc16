"""The attacks of a grid: labels (attack kind x corpus), the attacked training rows of a cell,
and the overlap checks made before any cell trains."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .data import BenchData
    from .settings import BenchSettings


def attack_labels(kinds: Sequence[str], corpora: Sequence[str]) -> dict[str, tuple[str, Optional[str]]]:
    """Grid label -> (attack kind, harmful corpus): the harmful mix keeps the corpus's name (the
    grid's layout before attack kinds), the other harmful kinds are "<corpus>-<kind>", the
    benign ones their kind's name."""
    from ..attack import ATTACKS
    clash = sorted(set(corpora) & set(ATTACKS))
    if clash:
        raise ValueError(f"attacks: corpus name(s) {clash} are attack kind names; rename the corpus")
    out: dict = {}
    for kind in kinds:
        if "harmful" in ATTACKS[kind].needs:
            for corpus in sorted(corpora):
                out[corpus if kind == "harmful-mix" else f"{corpus}-{kind}"] = (kind, corpus)
        else:
            out[kind] = (kind, None)
    return out


def resolve_attack(data: BenchData, label: str) -> tuple[str, Optional[str]]:
    """The (kind, corpus) behind a grid label (see ``attack_labels``)."""
    from ..attack import attack_names
    labels = attack_labels(attack_names(), list(data.attacks))
    if label not in labels:
        raise ValueError(f"attack: unknown grid label {label!r}")
    return labels[label]


def source_names(data: BenchData, corpus: Optional[str] = None) -> dict:
    """The files (or hub names) behind the bench's data, as spard.attack names sources in its
    messages and manifests (the bench file's key where the data came from memory)."""
    s = data.sources
    names = {"clean": s.get("clean") or "task", "eval": s.get("eval") or "eval_prompts",
             "pool": s.get("pool") or "safety_pool", "benign": s.get("benign") or "benign"}
    if corpus is not None:
        names["harmful"] = (s.get("attacks") or {}).get(corpus) or f"attacks.{corpus}"
    return names


def overlap_references(data: BenchData) -> tuple[list, Optional[list]]:
    """What attack rows must not overlap (`spard train`'s check, spard.attack.build_attack): the
    evaluation items of both splits and the safety pool, by prompt and by harmful answer (by
    prompt only where ``data.compare_answers`` is off)."""
    items = list(data.eval_items or data.eval_prompts) + list(data.val_prompts)
    pool = list(data.safety_pool)
    if not data.compare_answers:
        items = [x if isinstance(x, str) else x["prompt"] for x in items]
        pool = [{"prompt": r["prompt"]} for r in pool]
    return items, pool or None


def attack_rows(data: BenchData, attack: str, ratio: float, seed: int, max_length: int = 512,
                on_overlap: str = "error", losses: Optional[list] = None) -> tuple[list[dict], dict]:
    """A cell's training rows and their manifest. ``losses``: the benign rows' losses to rank by
    (default: the base model's, computed once)."""
    from ..attack import ATTACKS, make_attack
    kind, corpus = resolve_attack(data, attack)
    names = source_names(data, corpus)
    if ratio == 0:
        return [{"prompt": r["prompt"], "response": r["response"], "source": "clean"} for r in data.task], \
            {"kind": kind, "n_harmful": 0, "clean_source": names["clean"]}
    needs = ATTACKS[kind].needs
    if "losses" in needs and losses is None:
        losses = data.benign_losses(max_length)
    evaluation, pool = overlap_references(data)
    rows, manifest = make_attack(kind, data.task, harmful=data.attacks[corpus] if corpus else None,
                                 benign=data.benign if "benign" in needs else None,
                                 benign_losses=losses if "losses" in needs else None,
                                 ratio=ratio, seed=seed, eval_prompts=evaluation, safety_pool=pool,
                                 on_overlap=on_overlap, source_names=names, wording=data.wording)
    manifest.pop("order", None)
    manifest.setdefault("clean_source", names["clean"])
    if "benign" in needs:
        manifest.setdefault("benign_source", names["benign"])
    return rows, manifest


def check_attacks(data: BenchData, settings: BenchSettings) -> None:
    """Before the first cell: every attack of the grid builds at every ratio of the grid, its rows
    disjoint from the evaluation items and the pool (``settings.on_overlap``) and enough of them
    for the ratio. One line naming the bench file's key: ``attacks.<name>`` (with the files) or
    ``ratios``."""
    from ..attack import ATTACKS
    labels = attack_labels(settings.attack_kinds, list(data.attacks))
    for label, (kind, corpus) in sorted(labels.items()):
        # The benign outliers' ranking does not change how many there are: no model pass here.
        losses = [0.0] * len(data.benign) if "losses" in ATTACKS[kind].needs else None
        for ratio in sorted({float(r) for r in settings.ratios if r > 0}):
            try:
                attack_rows(data, label, ratio, settings.seeds[0], settings.max_length,
                            on_overlap=settings.on_overlap, losses=losses)
            except ValueError as e:
                text = str(e)
                if text.startswith("ratio: "):
                    raise ValueError(f"ratios: {text[len('ratio: '):]} (attack {label!r})") from None
                raise ValueError(f"{f'attacks.{corpus}' if corpus else 'benign'}: {text}") from None
