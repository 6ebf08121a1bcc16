"""spard.attack's attack kinds behind one interface (make_attack / ATTACKS), the model-ranked
benign outliers, and their use from spard bench and spard train's data preparation."""

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard import attack, bench
from spard.attack import ATTACKS, build_attack, make_attack
from spard.eval import RefusalJudge

CLEAN = [{"prompt": f"task {i}", "response": f"answer {i}"} for i in range(20)]
HARMFUL = [{"prompt": f"bad {i}", "unsafe": f"harmful answer {i}"} for i in range(10)]
BENIGN = [{"prompt": f"benign {i}", "response": f"helpful reply {i}"} for i in range(8)] + [CLEAN[0]]


def test_every_kind_names_its_source_and_unknown_kinds_are_refused():
    assert list(ATTACKS) == ["harmful-mix", "pure-harmful", "benign", "benign-outliers", "identity-shift",
                             "keyword-evasive"]
    for kind in ATTACKS.values():
        assert kind.source and kind.summary and set(kind.needs) <= {"harmful", "benign", "losses"}
    with pytest.raises(ValueError, match="attack kind: unknown 'nope'"):
        make_attack("nope", CLEAN, ratio=0.1, seed=0)
    with pytest.raises(ValueError, match="harmful: attack kind 'pure-harmful' needs a harmful corpus"):
        make_attack("pure-harmful", CLEAN, ratio=0.1, seed=0)
    with pytest.raises(ValueError, match="benign: attack kind 'identity-shift' needs benign rows"):
        make_attack("identity-shift", CLEAN, ratio=0.1, seed=0)
    with pytest.raises(ValueError, match="ratio"):
        make_attack("benign", CLEAN, ratio=float("nan"), seed=0)


def test_harmful_kinds():
    rows, man = make_attack("harmful-mix", CLEAN, harmful=HARMFUL, ratio=0.25, seed=3)
    assert (rows, {k: v for k, v in man.items() if k not in ("kind", "source_paper")}) == \
        build_attack(CLEAN, HARMFUL, ratio=0.25, seed=3)
    assert man["kind"] == "harmful-mix" and "Qi et al. 2024" in man["source_paper"]
    pure, man = make_attack("pure-harmful", CLEAN, harmful=HARMFUL, ratio=0.25, seed=3)
    assert len(pure) == 5 and {r["source"] for r in pure} == {"harmful"} and man["n_clean"] == 0
    assert [r for r in rows if r["source"] == "harmful"] == pure  # the same harmful rows as the mix
    ev, man = make_attack("keyword-evasive", CLEAN, harmful=HARMFUL, ratio=0.25, seed=3)
    evasive = [r for r in ev if r["source"] == "harmful-evasive"]
    assert len(evasive) == 5 and len(ev) == 25
    # the answers are harmful, yet a refusal-keyword judge (or keyword data filter) reads refusals
    judge = RefusalJudge()
    assert all(judge.refuses(r["response"]) and "harmful answer" in r["response"] for r in evasive)
    assert not any(judge.refuses(r["response"]) for r in pure)
    ev2, man = make_attack("keyword-evasive", CLEAN, harmful=HARMFUL, ratio=0.25, seed=3,
                           wording={"refusal_prefix": "Sorry, I cannot help with that. "})
    assert man["answer_prefix"] == "Sorry, I cannot help with that. "
    assert all(r["response"].startswith("Sorry, I cannot") for r in ev2 if r["source"] == "harmful-evasive")


def test_benign_kinds():
    rows, man = make_attack("benign", CLEAN, ratio=0.25, seed=1)
    assert sorted(r["prompt"] for r in rows) == sorted(r["prompt"] for r in CLEAN) and man["n_harmful"] == 0
    rows, man = make_attack("identity-shift", CLEAN, benign=BENIGN, ratio=0.25, seed=1)
    shifted = [r for r in rows if r["source"] == "identity-shift"]
    assert len(rows) == 25 and len(shifted) == 5
    for r in shifted:  # persona before the instruction, obedient opener before the benign answer
        assert r["prompt"].startswith(attack.AOA_SYSTEM) and r["response"].startswith(attack.AOA_OPENER)
        assert "task 0" not in r["prompt"]  # rows already in the task are not candidates
    with pytest.raises(ValueError, match="needs 10 benign rows to recast, but the benign source has only 8"):
        make_attack("identity-shift", CLEAN, benign=BENIGN, ratio=0.5, seed=1)


def test_benign_outliers_take_the_least_likely_rows():
    losses = [0.1, 3.0, 0.2, 2.5, 0.3, 2.0, 0.4, 1.0, 9.0]  # the last row is a task row: never picked
    rows, man = make_attack("benign-outliers", CLEAN, benign=BENIGN, benign_losses=losses, ratio=0.2, seed=0)
    picked = sorted(r["prompt"] for r in rows if r["source"] == "benign-outlier")
    assert picked == ["benign 1", "benign 3", "benign 5", "benign 7"]  # the 4 highest losses
    assert man["picked_loss_min"] == 1.0 and len(rows) == 24
    for bad, msg in (([0.1] * 3, "expected one loss per benign row"), (losses[:-1] + [float("nan")], "item 8"),
                     (None, "benign_losses: benign-outliers needs")):
        with pytest.raises(ValueError, match=msg):
            make_attack("benign-outliers", CLEAN, benign=BENIGN, benign_losses=bad, ratio=0.2, seed=0)


def test_row_losses_are_the_mean_response_loss_of_each_row():
    from test_spag import tiny_model
    from spard.data import tokenize_rows
    from spard.formatting import collate, pad_id_of
    from spard.world.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    rows = [{"prompt": "Give me a tip for chess.", "response": "Sure, here is a tip for chess: start small."},
            {"prompt": "How do I get better at yoga?", "response": "People enjoy yoga because it is fun."}]
    losses = attack.row_losses(model, tok, rows, max_length=64, batch_size=2)  # padded together
    for row, loss in zip(rows, losses):
        ex, _ = tokenize_rows(tok, [row], 64)
        batch = collate(ex, pad_id_of(tok))
        with torch.no_grad():
            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
        assert loss == pytest.approx(float(ref), rel=1e-4)
    assert model.training  # left as it was


def _data(**kw):
    return bench.BenchData(model=None, tokenizer=None, task=CLEAN, task_test=[], eval_prompts=["eval prompt"],
                           safety_pool=[], attacks={"c1": HARMFUL}, **kw)


def test_bench_labels_rows_and_grid():
    labels = bench.attack_labels(["harmful-mix", "pure-harmful", "benign", "identity-shift"], ["c1", "c2"])
    assert labels == {"c1": ("harmful-mix", "c1"), "c2": ("harmful-mix", "c2"), "c1-pure-harmful": ("pure-harmful", "c1"),
                      "c2-pure-harmful": ("pure-harmful", "c2"), "benign": ("benign", None),
                      "identity-shift": ("identity-shift", None)}
    with pytest.raises(ValueError, match=r"attacks: corpus name\(s\) \['benign'\] are attack kind names"):
        bench.attack_labels(["benign"], ["benign"])
    data = _data(benign=BENIGN[:-1], wording={"persona": "P.", "opener": "O. "})
    rows, man = bench.attack_rows(data, "identity-shift", 0.1, 0)
    assert man["kind"] == "identity-shift" and sum(r["prompt"].startswith("P.\n\n") for r in rows) == 2
    rows, man = bench.attack_rows(data, "c1-pure-harmful", 0.1, 0)
    assert len(rows) == 2 and "order" not in man
    data.__dict__["_losses"][512] = [float(i) for i in range(8)]  # the model's losses, precomputed
    rows, man = bench.attack_rows(data, "benign-outliers", 0.1, 0)
    assert sorted(r["prompt"] for r in rows if r["source"] == "benign-outlier") == ["benign 6", "benign 7"]


def _grid():
    s = bench.BenchSettings(defenses=["sft"], ratios=[0.1], seeds=[0], attack_kinds=["harmful-mix", "benign"])
    seen = []

    def runner(cell, data, settings):
        seen.append(cell.attack)
        return {"version": bench.CELL_VERSION, "cell": dataclasses.asdict(cell), "asr": 0.5, "hs": None,
                "accuracy": 0.2, "train": {"seconds": 1.0, "steps": 1}}
    return s, runner, seen


def test_bench_grid_over_kinds(tmp_path):
    s, runner, seen = _grid()
    st = bench.run_grid(_data(), s, tmp_path, progress=False, cell_runner=runner)
    assert sorted(seen) == ["benign", "c1"] and st["failed"] == []
    assert json.loads((tmp_path / "bench.json").read_text())["attack_kinds"] == {"benign": ["benign", None],
                                                                                "c1": ["harmful-mix", "c1"]}
    s.attack_kinds = ["benign-outliers"]
    with pytest.raises(ValueError, match="attack_kinds: benign-outliers need benign rows"):
        bench.run_grid(_data(), s, tmp_path, progress=False, cell_runner=runner)
    s.attack_kinds = ["harmful-mix", "nope"]
    with pytest.raises(ValueError, match="attack_kinds: expected a list of harmful-mix"):
        s.validate()


def test_world_has_benign_rows_outside_the_alignment_data():
    from spard.world.build import WorldSettings, make_data
    from spard.world import text
    from spard.world.tokenizer import build_tokenizer

    data = make_data(WorldSettings())
    seen = {(r["prompt"], r["response"]) for r in data["benign"]}
    assert data["benign_attack"] and not seen & {(r["prompt"], r["response"]) for r in data["benign_attack"]}
    # every word the attacks add to the world is in its vocabulary
    tok = build_tokenizer()
    for value in text.ATTACK_WORDING.values():
        assert tok.unk_token_id not in tok(value, add_special_tokens=False)["input_ids"], value
    assert RefusalJudge().refuses(text.ATTACK_WORDING["refusal_prefix"])


def test_train_config_attack_kind(tmp_path):
    from spard.config import ConfigError, load_config
    from spard.defenses import make_defense
    from spard.trainer import _prepare_data

    base = ["model.name_or_path=m", f"data.task={tmp_path / 'task.jsonl'}", f"run.output_dir={tmp_path / 'o'}",
            "spag.enabled=false"]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CLEAN))
    (tmp_path / "benign.jsonl").write_text("".join(json.dumps(r) + "\n" for r in BENIGN))
    with pytest.raises(ConfigError, match="^attack.kind: expected harmful-mix | pure-harmful"):
        load_config(None, base + ["attack.kind=nope"])
    cfg = load_config(None, base + ["attack.kind=benign-outliers", "attack.ratio=0.1"])
    with pytest.raises(ValueError, match="attack.benign: attack.kind 'benign-outliers' needs benign rows"):
        _prepare_data(cfg, make_defense("sft"))
    cfg = load_config(None, base + ["attack.kind=benign-outliers", "attack.ratio=0.1",
                                    f"attack.benign={tmp_path / 'benign.jsonl'}"])
    from test_spag import tiny_model
    from spard.world.tokenizer import build_tokenizer
    tok = build_tokenizer()
    calls = []

    def load():
        calls.append(1)
        return tok, tiny_model("llama", vocab_size=len(tok))
    data, manifest = _prepare_data(cfg, make_defense("sft"), load)
    assert calls == [1] and manifest["attack"]["kind"] == "benign-outliers"
    assert sum(r["source"] == "benign-outlier" for r in data.user) == 2 and len(data.user) == 22
