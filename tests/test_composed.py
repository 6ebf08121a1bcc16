"""Composed defenses (spard.defenses.composed): the composition rules (members, conflicts,
settings, the order of hooks) and an identity through the trainer. The tests every defense
passes (accumulation, resume, DDP/FSDP, the Hugging Face path) run the compositions of
test_one_trainer.DEFENSES."""

import os
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.config import ConfigError, load_config
from spard.defenses import DefenseData, make_defense
from spard.defenses.base import Defense, TrainContext
from spard.defenses.composed import Composed, owned_kinds
from test_one_trainer import DEFENSES, pool_rows, train, user_rows
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import tiny_lora_model, tiny_tokenizer


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ----------------------------------------------------------------------------------- members
def test_unknown_member_and_member_named_twice_are_refused():
    assert "unknown member 'nope'" in one_line_error(make_defense, "antibody+nope")
    assert "unknown member ''" in one_line_error(make_defense, "antibody+")
    assert "member 'spard' is named twice" in one_line_error(make_defense, "spard+antibody+spard")


@pytest.mark.parametrize("name, first, second, what", [
    ("antibody+bds", "antibody", "bds", "own the step's loss"),
    ("lisa+antibody", "lisa", "antibody", "own the step's loss"),
    ("bds-neural+lisa", "bds-neural", "lisa", "own the step's loss"),
    ("booster+antibody-align", "booster", "antibody-align", "replace the model in an alignment stage"),
    ("spard+spard-lr-cap", "spard", "spard-lr-cap", "edit the weights after the optimizer step"),
])
def test_conflicting_members_are_refused_in_one_line_naming_both(name, first, second, what):
    msg = one_line_error(make_defense, name)
    assert f"defense {name!r}: {first} and {second} conflict: both {what}" in msg


class Hooked(Defense):
    """A member that owns what its overrides say (the rules read the overrides)."""


def member(name, **hooks):
    cls = type(f"Hooked_{name}", (Hooked,), hooks)
    d = cls()
    d.NAME = name
    return d


@pytest.mark.parametrize("hook, kind", [
    ("after_backward", "edit the gradients after the backward pass"),
    ("training_rows", "change the training rows"),
    ("source", "change the step count or the batch source"),
    ("total_steps", "change the step count or the batch source"),
    ("after_training", "repair the model after fine-tuning"),
])
def test_every_kind_of_ownership_has_one_owner(hook, kind):
    a, b = member("a", **{hook: lambda self, *x: None}), member("b", **{hook: lambda self, *x: None})
    assert "conflict: both " + kind in one_line_error(Composed, [a, b])


def test_members_that_touch_different_hooks_compose():
    assert owned_kinds(make_defense("antibody")) == ["loss"]  # its stage is off: no alignment ownership
    assert owned_kinds(make_defense("bds")) == ["loss"]  # its after_step steps its own scheduler
    assert owned_kinds(make_defense("lisa")) == ["loss", "schedule"]
    assert owned_kinds(make_defense("spard")) == ["weights"]
    assert owned_kinds(make_defense("asft")) == ["loss"]  # its after_step logs the penalty: asft+spard composes
    d = make_defense("safeinstr+booster+safegrad+antibody+spard")
    assert {k: m.NAME for k, m in d.owner.items()} == {"rows": "safeinstr", "alignment": "booster",
                                                       "gradients": "safegrad", "loss": "antibody",
                                                       "weights": "spard"}
    # an after_step that edits the weights unless the member says otherwise
    assert owned_kinds(member("x", after_step=lambda self, o: {})) == ["weights"]
    assert owned_kinds(member("y", after_step=lambda self, o: {}, AFTER_STEP_EDITS_WEIGHTS=False)) == []


# ---------------------------------------------------------------------------------- settings
def test_settings_go_to_their_member():
    d = make_defense("antibody+spard-random", antibody={"temperature": 2.0}, **{"spard-random.p": 0.2})
    antibody, spard = d.members
    assert antibody.settings.temperature == 2.0 and spard.settings.p == 0.2
    assert spard.settings.selection == "random"  # the member's preset stays
    # a dotted key overrides the member's mapping for the same setting
    d = make_defense("antibody+spard", spard={"p": 0.1, "beta": 2.0}, **{"spard.p": 0.05})
    assert d.members[1].settings.p == 0.05 and d.members[1].settings.beta == 2.0
    assert d.flat_settings()["spard.p"] == 0.05 and d.flat_settings()["antibody.temperature"] == 1.0
    assert "settings for 'bds', which is not a member (members: antibody, spard)" in one_line_error(
        make_defense, "antibody+spard", bds={"weight_lr": 0.1})
    assert "settings for 'temperature', which is not a member" in one_line_error(
        make_defense, "antibody+spard", temperature=2.0)
    assert "settings of member 'spard' must be a mapping" in one_line_error(make_defense, "antibody+spard", spard=3)
    assert "defense 'spard': unknown setting(s) ['nope']" in one_line_error(
        make_defense, "antibody+spard", spard={"nope": 1})


def test_config_composes_from_a_list_or_a_name_with_settings_per_member():
    from spard.trainer import build_defense

    base = ["model.name_or_path=m", "data.task=t", "safety.pool=p", "run.output_dir=o", "spag.tau=0.3"]
    cfg = load_config(None, base + ["defense.spard.p=0.05", "defense.antibody.temperature=2.0"],
                      {"defense.name": "antibody+spard"})
    assert cfg.defense.settings == {"spard": {"p": 0.05}, "antibody": {"temperature": 2.0}}
    d = build_defense(cfg)
    assert d.NAME == "antibody+spard" and d.members[0].settings.temperature == 2.0
    assert d.members[1].settings.p == 0.05 and d.members[1].settings.tau == 0.3  # the spag section reaches it
    from spard.config import config_from_dict
    cfg = config_from_dict({"defenses": ["bds", "spard"], "defense": {"spard": {"p": 0.05}}})
    assert cfg.defense.name == "bds+spard" and cfg.defense.settings == {"spard": {"p": 0.05}}
    with pytest.raises(ConfigError, match=r"^defenses: \['bds', 'spard'\] conflicts with defense.name 'lisa'"):
        config_from_dict({"defenses": ["bds", "spard"], "defense": {"name": "lisa"}})
    with pytest.raises(ConfigError, match="^defense: defense 'antibody\\+bds': antibody and bds conflict"):
        load_config(None, base, {"defense.name": "antibody+bds"})
    with pytest.raises(ConfigError, match="^spag.enabled: false"):
        load_config(None, base + ["spag.enabled=false"], {"defense.name": "antibody+spard"})


def test_the_composition_says_what_its_members_need_and_are():
    d = make_defense("booster+spard")
    info = d.describe()
    assert info["name"] == "booster+spard" and info["stage"] == "both"
    assert info["needs"] == ["user", "alignment", "safety_pool"]
    assert [m["name"] for m in info["members"]] == ["booster", "spard"] and "p" in info["settings"]["spard"]
    assert d.needs_harmful_answers() and not make_defense("antibody+spard").needs_harmful_answers()
    assert make_defense("antibody+spard").STAGE == "fine-tuning"
    assert set(make_defense("antibody+spard").SEARCH_SPACE) == {"antibody.temperature", "spard.p", "spard.beta",
                                                               "spard.tau_scale", "spard.max_step"}
    no_unsafe = [{"prompt": r["prompt"], "safe": r["safe"]} for r in pool_rows()]
    msg = one_line_error(d.check_data, DefenseData(user=user_rows(), safety_pool=no_unsafe))
    assert msg.startswith("defense 'booster'")  # every member checks its own data
    msg = one_line_error(make_defense("bds+spard").check_data, DefenseData(user=user_rows()))
    assert msg.startswith("defense 'bds' needs alignment data")


# ---------------------------------------------------------------------------- order of hooks
class Recorder(Defense):
    AFTER_STEP_EDITS_WEIGHTS = False

    def __init__(self, name, calls, *, surgery=False):
        super().__init__()
        self.NAME, self.calls, self.surgery, self.steps = name, calls, surgery, 0

    def alignment_stage(self, model, tokenizer, data):
        self.calls.append((self.NAME, "alignment_stage"))
        return model

    def setup(self, model, tokenizer, data, optimizer, ctx):
        super().setup(model, tokenizer, data, optimizer, ctx)
        self.calls.append((self.NAME, "setup", ctx.resume_state))

    def after_step(self, optimizer):
        self.steps += 1
        self.calls.append((self.NAME, "after_step"))
        return {"steps": torch.tensor(float(self.steps))}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.calls.append((self.NAME, "load_state_dict", state))
        self.steps = state["steps"]

    def summary(self):
        return {"steps": self.steps}


class SurgeryRecorder(Recorder):
    def after_backward(self):
        self.calls.append((self.NAME, "after_backward"))
        return {"seen": torch.tensor(1.0)}

    def after_training(self, model, tokenizer, data, ctx):
        self.calls.append((self.NAME, "after_training"))
        return model


def fit_recorded(members, tmp_path, steps=2, resume=False):
    from spard.config import OptimConfig
    from spard.trainer import fit

    d = Composed(members)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=4, max_steps=steps, seed=3, weight_decay=0.0)
    run = fit(tiny_lora_model("llama"), tiny_tokenizer(), user_rows(), defense=d, optim=optim, max_length=64,
              progress=False, log_every=1, checkpoint_dir=str(tmp_path), save_every=1, resume=resume)
    return d, run


@pytest.mark.parametrize("order", [("a", "b"), ("b", "a")])
def test_every_hook_calls_the_members_in_the_order_named(order, tmp_path):
    calls = []
    made = {"a": SurgeryRecorder("a", calls), "b": Recorder("b", calls)}
    d, run = fit_recorded([made[n] for n in order], tmp_path)
    first, second = order
    assert [c[:2] for c in calls if c[1] == "setup"] == [(first, "setup"), (second, "setup")]
    step = [c for c in calls if c[1] in ("after_backward", "after_step")][:3]
    # after_backward (a's only) for the step, then every member's after_step in order
    assert step == [("a", "after_backward"), (first, "after_step"), (second, "after_step")]
    assert [k for k in run["history"][0] if "." in k] == ["a.seen", f"{first}.steps", f"{second}.steps"]
    assert run["summary"]["defense"] == {first: {"steps": 2}, second: {"steps": 2}}
    assert d.state_dict() == {first: {"steps": 2}, second: {"steps": 2}}
    calls.clear()
    model = d.alignment_stage("model", None, None)
    assert model == "model" and calls == [(first, "alignment_stage"), (second, "alignment_stage")]
    calls.clear()
    assert d.after_training("model", None, None, None) == "model" and calls == [("a", "after_training")]


def test_each_member_resumes_from_its_own_part_of_the_checkpoint(tmp_path):
    calls = []
    fit_recorded([SurgeryRecorder("a", calls), Recorder("b", calls)], tmp_path, steps=1)
    calls.clear()
    d, run = fit_recorded([SurgeryRecorder("a", calls), Recorder("b", calls)], tmp_path, steps=1, resume=True)
    assert run["resumed_from"]
    assert [c for c in calls if c[1] == "setup"] == [("a", "setup", {"steps": 1}), ("b", "setup", {"steps": 1})]
    assert [c for c in calls if c[1] == "load_state_dict"] == [("a", "load_state_dict", {"steps": 1}),
                                                               ("b", "load_state_dict", {"steps": 1})]
    with pytest.raises(ValueError, match=r"checkpoint state of \['c'\], which are not members"):
        d.load_state_dict({"a": {"steps": 0}, "c": {}})


def test_a_member_may_not_replace_another_members_batch_stream():
    class Stream(Defense):
        def setup(self, model, tokenizer, data, optimizer, ctx):
            super().setup(model, tokenizer, data, optimizer, ctx)
            ctx.streams["alignment"] = object()

    s = Stream()
    s.NAME = "stream"
    d = Composed([make_defense("lisa"), s])
    tok = tiny_tokenizer()
    ctx = TrainContext(streams={"user": None}, global_batch=4, micro_batch_size=4, pad_id=0,
                       device=torch.device("cpu"), autocast=nullcontext, max_length=64)
    data = DefenseData(user=user_rows(), safety_pool=pool_rows(), seed=3, max_length=64)
    msg = one_line_error(d.setup, tiny_lora_model("llama"), tok, data, None, ctx)
    assert "stream replaces the batch stream 'alignment' another member uses" in msg


# --------------------------------------------------------------------------------- identities
def test_antibody_with_uniform_weights_plus_spard_equals_spard(monkeypatch):
    # T -> inf: every d_i / T rounds to 0, the weights are exactly 1/4 (a power of two) and
    # Σ(s_i/4) / Σ(n_i/4) = Σ s_i / Σ n_i bit for bit: Antibody's loss is then SFT's token mean.
    monkeypatch.setitem(DEFENSES, "antibody+spard", {"antibody": {"temperature": 1e30}, "spard": DEFENSES["spard"]})
    composed, run_c = train("antibody+spard", batch_size=4, grad_accum=1)
    alone, run_s = train("spard", batch_size=4, grad_accum=1)
    assert run_c["loss_curve"] == run_s["loss_curve"]
    for k in alone:
        assert torch.equal(composed[k], alone[k]), k
    assert run_c["summary"]["spard"] == run_s["summary"]  # the same selection, τ and projections


def test_safeinstr_plus_antibody_is_antibody_on_safeinstrs_rows():
    from spard.config import LoraConfig, OptimConfig
    from spard.trainer import run_defense
    from test_spag import tiny_model

    def adapter(name, settings, user):
        data = DefenseData(user=user, safety_pool=pool_rows(), seed=3, max_length=64)
        optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=4, max_steps=4, seed=3, weight_decay=0.0)
        model, _ = run_defense(make_defense(name, **settings), tiny_model(), tiny_tokenizer(), data, optim=optim,
                               lora=LoraConfig(r=4, alpha=8, dropout=0.0), progress=False)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    # (Antibody alone on these rows: batch 4 x 1 and 2 x 2 differ by 2.2e-5 in one element, Adam
    # magnifying rounding where a gradient is near 0; so this pair is checked by this identity.)
    rows = make_defense("safeinstr", share=0.2).training_rows(
        DefenseData(user=user_rows(), safety_pool=pool_rows(), seed=3, max_length=64))
    composed = adapter("safeinstr+antibody", {"safeinstr": {"share": 0.2}, "antibody": {"temperature": 0.5}},
                       user_rows())
    alone = adapter("antibody", {"temperature": 0.5}, rows)
    for k in alone:
        assert torch.equal(composed[k], alone[k]), k


def test_bench_routes_the_grids_member_settings_into_a_composition():
    from spard.bench import BenchSettings
    from spard.tuning import base_settings, defense_space

    s = BenchSettings(defenses=["lisa+spard", "spard"], defense_settings={
        "lisa": {"alignment_steps": 8, "finetune_steps": 72}, "lisa+spard": {"spard": {"p": 0.05}, "lisa.rho": 0.5}})
    s.validate()
    assert s.settings_of("lisa+spard") == {"lisa": {"alignment_steps": 8, "finetune_steps": 72},
                                            "spard": {"p": 0.05}, "lisa.rho": 0.5}
    d = make_defense("lisa+spard", **s.settings_of("lisa+spard"))
    assert d.members[0].settings.alignment_steps == 8 and d.members[0].settings.rho == 0.5
    assert base_settings("lisa+spard", s)["lisa.alignment_steps"] == 8
    assert set(defense_space("lisa+spard")) == {"lisa.rho", "lisa.alignment_steps", "spard.p", "spard.beta",
                                               "spard.tau_scale", "spard.max_step"}
    from spard.stats import comparison_pairs
    assert ("lisa+spard", "spard") in comparison_pairs(["sft", "spard", "lisa+spard"])
    with pytest.raises(ValueError, match="^defenses: defense 'lisa\\+bds': lisa and bds conflict"):
        BenchSettings(defenses=["lisa+bds"]).validate()


def test_tune_defenses_tunes_a_composition_over_its_members_spaces(tmp_path):
    pytest.importorskip("optuna", reason="optional dependency of the tuning")
    from spard import tuning
    from spard.bench import BenchSettings
    from test_verdicts import _data

    seen = []

    def runner(cell, data, settings):  # the settings the cell would really build, member by member
        if cell.defense == "sft":
            return {"asr": 0.9, "accuracy": 0.40}
        safeinstr, spard = make_defense(cell.defense, **settings.settings_of(cell.defense)).members
        seen.append((safeinstr.settings.share, spard.settings.p))
        return {"asr": 0.6 - 5 * safeinstr.settings.share - spard.settings.p,
                "accuracy": 0.40 - (safeinstr.settings.share - 0.01)}

    settings = BenchSettings(defenses=["sft", "safeinstr+spard"], ratios=[0.1],
                             defense_settings={"safeinstr+spard": {"spard": {"beta": 2.0}}})
    tuned = tuning.tune_defenses(_data(), settings, tmp_path, defenses=["sft", "safeinstr+spard"], trials=6,
                                 startup_trials=3, cell_runner=runner, progress=False)["safeinstr+spard"]
    assert seen[0] == (0.03, 0.03)  # the first trial: the members' current settings
    assert set(tuned) == {"safeinstr.share", "spard.p", "spard.beta", "spard.tau_scale", "spard.max_step"}
    assert (tmp_path / "tuned" / "safeinstr+spard.json").is_file()
    tuning.apply_tuned(settings, {"safeinstr+spard": tuned})
    d = make_defense("safeinstr+spard", **settings.settings_of("safeinstr+spard"))
    assert d.members[0].settings.share == tuned["safeinstr.share"] and d.members[1].settings.p == tuned["spard.p"]


def test_a_composition_has_a_post_fine_tuning_stage_only_through_a_member():
    from spard.defenses.base import has_post_training

    assert not has_post_training(make_defense("antibody+spard"))
    repair = member("repair", after_training=lambda self, model, *a: model)
    assert has_post_training(Composed([make_defense("spard"), repair]))
