"""Defenses against harmful fine-tuning behind one interface (`Defense`), and a registry.

    from spard.defenses import make_defense, DefenseData
    from spard.trainer import run_defense
    defense = make_defense("lisa", rho=1.0)
    model, run = run_defense(defense, model, tokenizer, DefenseData(user=rows, safety_pool=pool))

Each name maps to a class and preset settings (the paper's defaults unless the name says
otherwise); keyword arguments override them. See docs/bench.md.
"""

from __future__ import annotations

from .antibody import Antibody
from .asft import AsFT
from .antidote import Antidote
from .base import DATA_KINDS, STAGES, Defense, DefenseData
from .bds import BDS
from .booster import Booster
from .composed import JOIN, Composed, is_composition, split_settings
from .lisa import Lisa
from .lox import LoX
from .oneshot import OneShot
from .panacea import Panacea
from .safegrad import SafeGrad
from .safeinstr import SafeInstr
from .sft import SFT
from .spard import SELECTION_ABLATIONS, SPARD

REGISTRY: dict[str, tuple[type[Defense], dict]] = {
    "sft": (SFT, {}),
    "safeinstr": (SafeInstr, {}),
    "lisa": (Lisa, {}),
    "safegrad": (SafeGrad, {}),
    "bds": (BDS, {}),
    "bds-neural": (BDS, {"scheduler": "neural"}),
    "antibody": (Antibody, {}),
    "antibody-align": (Antibody, {"alignment_stage": True}),
    "booster": (Booster, {}),
    "asft": (AsFT, {}),
    "lox": (LoX, {}),
    "spard": (SPARD, {}),
    "spard-official": (SPARD, {"mode": "official", "tau": 0.2}),  # the released code's fixed τ
    # spard-random, spard-relevance, spard-dpp, spard-k-center, spard-behavior-aware
    **{name: (SPARD, preset) for name, preset in SELECTION_ABLATIONS.items()},
    "spard-lr-cap": (SPARD, {"max_step": "lr"}),
    "oneshot": (OneShot, {}),
    "antidote": (Antidote, {}),
    "panacea": (Panacea, {}),
}


def defense_names() -> list[str]:
    return list(REGISTRY)


def is_known_defense(name) -> bool:
    """A registered name, or a composition of registered names (whether it conflicts is
    make_defense's to say)."""
    return isinstance(name, str) and all(m in REGISTRY for m in name.split(JOIN))


def make_defense(name: str, **settings) -> Defense:
    """The defense registered as ``name`` with its preset settings, overridden by ``settings``.
    ``a+b`` composes registered defenses (spard.defenses.composed): settings per member, as
    ``{"b": {...}}`` or ``"b.key"``."""
    if is_composition(name):
        members = name.split(JOIN)
        bad = [m for m in members if m not in REGISTRY]
        if bad:
            raise ValueError(f"defense {name!r}: unknown member {bad[0]!r}; known: {', '.join(REGISTRY)}")
        routed = split_settings(name, members, settings)
        if len(set(members)) < len(members):
            twice = next(m for m in members if members.count(m) > 1)
            raise ValueError(f"defense {name!r}: member {twice!r} is named twice")
        return Composed([make_defense(m, **routed[m]) for m in members])
    if name not in REGISTRY:
        raise ValueError(f"unknown defense {name!r}; known: {', '.join(REGISTRY)}")
    cls, preset = REGISTRY[name]
    d = cls(**{**preset, **settings})
    d.NAME = name
    return d


__all__ = ["Antibody", "Antidote", "AsFT", "BDS", "Booster", "DATA_KINDS", "Defense", "DefenseData", "Lisa", "LoX",
           "OneShot",
           "Panacea", "REGISTRY", "SFT", "SPARD", "STAGES", "SafeGrad", "SafeInstr", "defense_names", "make_defense"]
