"""What a bench runs: the grid's settings (defenses, ratios, seeds, training, evaluation, judges)
and the checks of what its defenses need (a base model, harmful answers in the pool)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from ..config import LoraConfig, OptimConfig


@dataclass
class BenchSettings:
    defenses: list[str] = field(default_factory=lambda: ["sft", "spard"])
    ratios: list[float] = field(default_factory=lambda: [0.1])
    seeds: list[int] = field(default_factory=lambda: [0])
    defense_settings: dict = field(default_factory=dict)
    """defense name -> settings overriding its presets (e.g. {"lisa": {"rho": 1.0}})."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_length: int = 512
    max_new_tokens: int = 512
    task_max_new_tokens: int = 512
    eval_batch_size: int = 32
    attack_kinds: list[str] = field(default_factory=lambda: ["harmful-mix"])
    """spard.attack kinds in the grid (docs/attacks.md); the harmful kinds run once per attack
    corpus."""
    judge: str = "refusal"
    """refusal | moderation | guard | rubric (spard.eval.make_judge)."""
    judge_model: Optional[str] = None
    """The moderation/guard model, or the rubric judge's API model name."""
    extra_judges: list[str] = field(default_factory=list)
    """More judges on the same answers, "name" or "name=model" (the CLI's --judges after the
    first): each one's ASR and their pairwise Cohen's kappa next to ``judge``'s."""
    save_every: int = 50
    """A cell checkpoints every N optimizer steps; a killed cell resumes from its last one."""
    prompt_layout: str = "chat"
    """How the fine-tuning rows are laid out (spard.formatting.LAYOUTS): the attacker varies it."""
    on_overlap: str = "error"
    """Attack rows overlapping the evaluation items or the safety pool (prompt or harmful answer;
    `spard train`'s check and attack.on_overlap): "error" refuses the grid before its first cell,
    "drop" leaves them out of the candidates."""

    def validate(self) -> None:
        from ..defenses import REGISTRY, is_known_defense, make_defense
        from ..defenses.composed import is_composition
        if not self.defenses:
            raise ValueError("defenses: name at least one defense")
        unknown = [d for d in self.defenses if not is_composition(d) and not is_known_defense(d)]
        if unknown:
            raise ValueError(f"defenses: unknown {unknown}; known: {', '.join(REGISTRY)}, or members joined by '+'")
        for d in self.defenses:  # a composition's unknown member or conflict, before any cell runs
            if is_composition(d) and d not in self.defense_settings:
                try:
                    make_defense(d, **self.settings_of(d))
                except (TypeError, ValueError) as e:
                    raise ValueError(f"defenses: {e}") from None
        if not self.ratios or any(not (isinstance(r, (int, float)) and 0 <= r) for r in self.ratios):
            raise ValueError(f"ratios: expected numbers >= 0, got {self.ratios!r}")
        from ..attack import attack_names
        bad = [k for k in self.attack_kinds if k not in attack_names()] if isinstance(self.attack_kinds, list) else None
        if not self.attack_kinds or bad is None or bad:
            raise ValueError(f"attack_kinds: expected a list of {', '.join(attack_names())}, got {self.attack_kinds!r}")
        if not self.seeds or any(not isinstance(s, int) for s in self.seeds):
            raise ValueError(f"seeds: expected ints, got {self.seeds!r}")
        from ..eval import JUDGES
        if self.judge not in JUDGES:
            raise ValueError(f"judge: expected one of {', '.join(JUDGES)}, got {self.judge!r}")
        if self.judge != "refusal" and not self.judge_model:
            what = "the API's model name" if self.judge == "rubric" else "a model (a Hugging Face name or path)"
            raise ValueError(f"judge_model: the {self.judge} judge needs {what}; give judge_model")
        if not isinstance(self.extra_judges, list) or any(
                not isinstance(j, str) or j.partition("=")[0] not in JUDGES for j in self.extra_judges):
            raise ValueError(f"extra_judges: expected a list of 'name' or 'name=model' with names in "
                             f"{', '.join(JUDGES)}, got {self.extra_judges!r}")
        bare = [n for n, _, m in (j.partition("=") for j in self.extra_judges) if n != "refusal" and not m.strip()]
        if bare:
            raise ValueError(f"extra_judges: the {bare[0]} judge needs a model ({bare[0]}=MODEL)")
        self._validate_defense_settings()
        if self.on_overlap not in ("error", "drop"):
            raise ValueError(f"on_overlap: expected error | drop, got {self.on_overlap!r}")
        from ..formatting import LAYOUTS
        if self.prompt_layout not in LAYOUTS:
            raise ValueError(f"prompt_layout: expected one of {', '.join(LAYOUTS)}, got {self.prompt_layout!r}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every: expected an int >= 0 (0: checkpoint only at the end), got {self.save_every!r}")

    def _validate_defense_settings(self) -> None:
        """Each entry names a defense of the grid (or a member of a composition in it) and
        settings it has (checked by building it)."""
        from ..defenses import make_defense
        if not isinstance(self.defense_settings, dict):
            raise ValueError(f"defense_settings: expected a mapping defense -> settings, got {self.defense_settings!r}")
        members = {m for d in self.defenses for m in d.split("+")}
        for name, values in self.defense_settings.items():
            if name not in self.defenses and name not in members:
                raise ValueError(f"defense_settings: {name!r} is not a defense of the grid "
                                 f"({', '.join(self.defenses)})")
            if not isinstance(values, dict):
                raise ValueError(f"defense_settings.{name}: expected a mapping setting -> value, got {values!r}")
            try:
                make_defense(name, **self.settings_of(name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"defense_settings.{name}: {e}") from None

    def settings_of(self, name: str) -> dict:
        """The settings the grid runs defense ``name`` with. A composition's members take the
        grid's settings of the member on its own (the world's Lisa phases, say), then the
        composition's entry: per member (``{"spard": {"p": 0.05}}``) or dotted (``"spard.p"``,
        what tuning writes; spard.defenses.composed)."""
        from ..defenses.composed import JOIN, is_composition
        own = dict(self.defense_settings.get(name, {}))
        if not is_composition(name):
            return own
        out = {m: dict(self.defense_settings[m]) for m in name.split(JOIN) if isinstance(self.defense_settings.get(m), dict)}
        for k, v in own.items():
            out[k] = {**out[k], **v} if isinstance(v, dict) and k in out else v
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def defenses_needing_base(settings: BenchSettings) -> list[str]:
    """The grid's defenses that read the base model (AsFT, LoX)."""
    from ..defenses import make_defense
    from ..trainer import needs_base_model
    return [d for d in settings.defenses if needs_base_model(make_defense(d, **settings.settings_of(d)))]


def check_base_model(settings: BenchSettings, has_base_model: bool) -> None:
    """Refuses, before any model loads, a grid with defenses that need the base model when the
    bench has none."""
    need = [] if has_base_model else defenses_needing_base(settings)
    if need:
        raise ValueError(f"base_model: defense(s) {', '.join(need)} need the base model (the weights before safety "
                         "alignment); give base_model in the bench file or leave them out of --defenses")


def check_defense_data(settings: BenchSettings, safety_pool: list[dict]) -> None:
    """Refuses, before any cell runs, a grid whose defenses need data the bench lacks: harmful
    answers (the pool's ``unsafe`` field) for the defenses that train against them."""
    from ..defenses import make_defense
    if any(r.get("unsafe") for r in safety_pool):
        return
    need = [d for d in settings.defenses
            if make_defense(d, **settings.settings_of(d)).needs_harmful_answers()]
    if need:
        raise ValueError(f"safety_pool: defense(s) {', '.join(need)} train against harmful answers, and the pool "
                         "has no 'unsafe' field; give a pool with harmful answers or leave them out of --defenses")
