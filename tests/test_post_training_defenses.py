"""The post-fine-tuning defenses (Safety at One Shot, Antidote, Panacea) against plain-torch
references on a tiny Llama: the example Safety at One Shot picks and the patch it trains,
the weights Antidote prunes, Panacea's gradient and its perturbation's norm bound."""

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.defenses import DefenseData, make_defense
from spard.defenses.antidote import lora_linears, pruned_count
from test_defenses import batch_of, context, hf_mean_loss, params_of
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import safe_rows, task_rows, tiny_lora_model, tiny_tokenizer


def varied_pool(n=6):
    """Pool rows whose refusals and harmful answers differ from row to row."""
    refusals = ["sorry i cannot help with that .", "i cannot help with that .", "sorry here i cannot .",
                "sorry i cannot tell me .", "i cannot make that .", "sorry that i cannot help ."]
    harmful = ["sure here how to make a cake .", "here how to bake a cake .", "sure tell me about cats .",
               "sure here cats and dogs .", "here is the answer .", "sure how to make that ."]
    return [{"prompt": r["prompt"], "safe": refusals[i % 6], "unsafe": harmful[(i + 1) % 6]}
            for i, r in enumerate(safe_rows(n))]


# ----------------------------------------------------------------------------------------------
# Safety at One Shot
# ----------------------------------------------------------------------------------------------
def reference_patch(model, tok, row, *, steps, lr, max_grad_norm=1.0):
    params = params_of(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = batch_of(tok, [row])
    for _ in range(steps):
        hf_mean_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_oneshot_picks_the_first_order_best_row_and_trains_on_it_alone():
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    ref = copy.deepcopy(model)
    data = DefenseData(user=task_rows(), safety_pool=varied_pool(), seed=2, max_length=64)
    d = make_defense("oneshot", steps=3, lr=1e-2, candidates=4)
    d.after_training(model, tok, data, context(tok, micro=3))
    # reference selection: per-row gradients against their token-mean gradient, by hand
    cand = d.candidate_rows(data)
    assert len(cand) == 4
    rows = [data.alignment[i] for i in cand]
    rp = params_of(ref)
    g_bar = torch.autograd.grad(hf_mean_loss(ref, batch_of(tok, rows)), rp)
    scores = []
    for r in rows:
        g = torch.autograd.grad(hf_mean_loss(ref, batch_of(tok, [r])), rp)
        scores.append(float(sum((a.double() * b.double()).sum() for a, b in zip(g, g_bar))))
    best = cand[max(range(4), key=lambda i: scores[i])]
    assert d.patch["row"] == best
    torch.testing.assert_close(torch.tensor(d.patch["scores"]), torch.tensor(scores), rtol=1e-4, atol=1e-7)
    reference_patch(ref, tok, data.alignment[best], steps=3, lr=1e-2)
    for a, b in zip(params_of(model), params_of(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert d.summary()["patch_steps"] == 3 and d.patch["losses"][-1] < d.patch["losses"][0]


def test_oneshot_with_a_fixed_row_ignores_every_other_row():
    tok = tiny_tokenizer()
    pool = varied_pool()
    other = [dict(r, safe="here is the answer .") if i != 2 else r for i, r in enumerate(pool)]
    outs = []
    for rows in (pool, other):
        model = tiny_lora_model()
        d = make_defense("oneshot", steps=2, lr=1e-2, index=2)
        d.after_training(model, tok, DefenseData(user=task_rows(), safety_pool=rows, max_length=64), context(tok))
        outs.append([p.detach().clone() for p in params_of(model)])
    before = params_of(tiny_lora_model())
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(outs[0], before))  # the patch moved the adapter


def test_oneshot_settings_and_data_are_checked():
    with pytest.raises(ValueError, match="oneshot steps"):
        make_defense("oneshot", steps=0)
    with pytest.raises(ValueError, match="oneshot lr"):
        make_defense("oneshot", lr=-1.0)
    tok = tiny_tokenizer()
    data = DefenseData(user=task_rows(), safety_pool=varied_pool(), max_length=64)
    with pytest.raises(ValueError, match="oneshot index: 9 is beyond the 6 alignment rows"):
        make_defense("oneshot", index=9, lr=1e-2).after_training(tiny_lora_model(), tok, data, context(tok))
    with pytest.raises(ValueError, match="oneshot lr: give it"):
        make_defense("oneshot").after_training(tiny_lora_model(), tok, data, context(tok))
    with pytest.raises(ValueError, match="needs alignment data"):
        make_defense("oneshot", lr=1e-2).after_training(tiny_lora_model(), tok, DefenseData(user=task_rows()),
                                                        context(tok))


# ----------------------------------------------------------------------------------------------
# Antidote
# ----------------------------------------------------------------------------------------------
def reference_input_norms(model, tok, rows):
    """||X_j|| per LoRA layer, one unpadded row at a time."""
    layers = lora_linears(model)
    sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in layers.items()}

    def record(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().double()
            sq[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    model.eval()
    with torch.no_grad():
        for r in rows:
            b = batch_of(tok, [r])
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return {n: v.sqrt() for n, v in sq.items()}


@pytest.mark.parametrize("ratio", [0.1, 0.3])
def test_antidote_prunes_the_configured_share_of_the_most_salient_lora_weights(ratio):
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = DefenseData(user=task_rows(), safety_pool=varied_pool(), seed=1, max_length=64)
    d = make_defense("antidote", mask_ratio=ratio, calibration_rows=4)
    d.after_training(model, tok, data, context(tok, micro=3))
    norms = reference_input_norms(tiny_lora_model(), tok, d.calibration(data))
    layers = lora_linears(model)
    assert layers and len(d.calibration(data)) == 4
    pruned_total = 0
    for name, m in layers.items():
        w0 = before[f"{name}.weight"]
        w = m.weight.detach()
        k = pruned_count(m.in_features, ratio)
        assert k == math.ceil(round(m.in_features * ratio, 9))
        zeroed = (w == 0) & (w0 != 0)
        assert (zeroed.sum(1) == k).all(), name  # exactly k per output row
        score = w0.abs().double() * norms[name].reshape(1, -1)
        kth = score.topk(k, dim=1).values[:, -1:]
        kept = torch.where(zeroed, torch.full_like(score, -1.0), score)
        assert (kept < kth).all(), name  # the k most salient of each row, no other
        assert torch.equal(w[~zeroed], w0[~zeroed])  # the rest untouched
        pruned_total += int(zeroed.sum())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n  # the base weights untouched
    assert d.summary()["pruned_weights"] == pruned_total
    # the share of every row, rounded up per row as the released code does
    assert pruned_total == sum(m.out_features * math.ceil(round(m.in_features * ratio, 9)) for m in layers.values())


def test_antidote_needs_harmful_answers_and_checks_its_ratio():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="mask_ratio must be a number in"):
        make_defense("antidote", mask_ratio=1.0)
    refusals_only = [{"prompt": r["prompt"], "safe": r["response"]} for r in safe_rows()]
    d = make_defense("antidote")
    assert d.needs_harmful_answers()
    with pytest.raises(ValueError, match="'unsafe' field"):
        d.after_training(tiny_lora_model(), tok, DefenseData(user=task_rows(), safety_pool=refusals_only),
                         context(tok))


# ----------------------------------------------------------------------------------------------
# Panacea
# ----------------------------------------------------------------------------------------------
def test_panacea_gradient_perturbation_and_its_norm_bound():
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    ref = copy.deepcopy(model)
    data = DefenseData(user=task_rows(), safety_pool=varied_pool(), seed=4, max_length=64)
    d = make_defense("panacea", rho=0.5, lam=0.3, harmful_batch_size=3)
    d.setup(model, tok, data, None, context(tok, micro=2))
    state = d.harm.order.state_dict()
    idx = d.harm.order.take(3)
    d.harm.order.load_state_dict(state)
    torch.manual_seed(0)
    u = [torch.randn_like(p) * 1e-2 for p in d.params]
    for p, ui in zip(d.params, u):
        p.grad = ui.clone()
    before = [p.detach().clone() for p in d.params]
    logs = d.after_backward()
    for p, b in zip(d.params, before):
        assert torch.equal(p, b)  # w restored bit for bit
    # reference: ∇h(w), ε = ρ ∇h/||∇h||, ∇h(w + ε) on a copy
    harm = batch_of(tok, [data.harmful[i] for i in idx])
    rp = params_of(ref)
    gh = torch.autograd.grad(hf_mean_loss(ref, harm), rp)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in gh))
    eps = [g * (0.5 / (norm + 1e-7)).float() for g in gh]
    with torch.no_grad():
        for p, e in zip(rp, eps):
            p.add_(e)
    gh2 = torch.autograd.grad(hf_mean_loss(ref, harm), rp)
    for p, ui, a, b in zip(d.params, u, gh, gh2):
        torch.testing.assert_close(p.grad, ui - 0.3 * (b - a), rtol=1e-4, atol=1e-6)
    for e, er in zip(d.epsilon, eps):
        torch.testing.assert_close(e, er, rtol=1e-5, atol=1e-7)
    assert d.epsilon_norm() == pytest.approx(0.5, rel=1e-5)  # ||ε|| = ρ
    assert float(logs["harmful_loss_perturbed"]) > float(logs["harmful_loss"])  # ε raises h
    # after fine-tuning: w + ε, once
    d.after_training(model, tok, data, context(tok))
    d.after_training(model, tok, data, context(tok))
    for p, b, e in zip(d.params, before, eps):
        torch.testing.assert_close(p.detach(), b + e, rtol=0, atol=1e-7)
    # the state carries ε and whether it was added
    state = d.state_dict()
    fresh = make_defense("panacea", rho=0.5, lam=0.3, harmful_batch_size=3)
    fresh.setup(tiny_lora_model(), tok, data, None, context(tok, micro=2))
    fresh.load_state_dict(state)
    assert fresh.applied and all(torch.equal(a, b) for a, b in zip(fresh.epsilon, d.epsilon))


def test_panacea_without_a_step_or_harmful_rows_says_so():
    tok = tiny_tokenizer()
    data = DefenseData(user=task_rows(), safety_pool=varied_pool(), max_length=64)
    d = make_defense("panacea")
    d.setup(tiny_lora_model(), tok, data, None, context(tok))
    with pytest.raises(ValueError, match="no perturbation to add"):
        d.after_training(d.model, tok, data, context(tok))
    refusals_only = [{"prompt": r["prompt"], "safe": r["response"]} for r in safe_rows()]
    with pytest.raises(ValueError, match="'unsafe' field"):
        make_defense("panacea").setup(tiny_lora_model(), tok,
                                      DefenseData(user=task_rows(), safety_pool=refusals_only), None, context(tok))
    with pytest.raises(ValueError, match="panacea rho"):
        make_defense("panacea", rho=float("nan"))


# ----------------------------------------------------------------------------------------------
# Through the trainers: a run killed during the stage, the Hugging Face Trainer
# ----------------------------------------------------------------------------------------------
POST = ["oneshot", "antidote", "panacea"]


@pytest.mark.parametrize("name", POST)
def test_a_run_killed_during_the_stage_resumes_to_the_uninterrupted_model(name, tmp_path, monkeypatch):
    from test_one_trainer import train

    full, run = train(name, batch_size=2, grad_accum=2, ckpt=str(tmp_path / "a"), save_every=2)
    assert run["post_training_seconds"] > 0
    sft, _ = train("sft", batch_size=2, grad_accum=2)
    assert any(not torch.equal(full[k], sft[k]) for k in full)
    cls = type(make_defense(name))
    real = cls.after_training

    def killed(self, *args):
        real(self, *args)
        raise KeyboardInterrupt  # after the stage changed the weights, before its checkpoint

    monkeypatch.setattr(cls, "after_training", killed)
    with pytest.raises(KeyboardInterrupt):
        train(name, batch_size=2, grad_accum=2, ckpt=str(tmp_path / "b"), save_every=2)
    monkeypatch.setattr(cls, "after_training", real)
    resumed, run_b = train(name, batch_size=2, grad_accum=2, ckpt=str(tmp_path / "b"), save_every=2, resume=True)
    assert run_b["resumed_from"].endswith("checkpoint-4")
    for k in full:
        assert torch.equal(full[k], resumed[k]), f"{name}: {k} differs after resume"


@pytest.mark.parametrize("name", POST)
def test_the_post_training_defenses_run_in_the_hf_trainer(tmp_path, name):
    from test_hf_defenses import hf_run, trainable

    sft, _ = hf_run(tmp_path / "sft", "sft")
    model, trainer = hf_run(tmp_path / "run", name)
    got, ref = trainable(model), trainable(sft)
    summary = trainer.state.log_history[-1]["defense"]
    if name == "antidote":  # the SFT adapter, pruned
        for layer_name, m in lora_linears(model).items():
            w = got[f"{layer_name}.weight"]
            k = pruned_count(m.in_features, 0.1)
            assert ((w == 0).sum(1) >= k).all() and summary["pruned_weights"] > 0
    elif name == "oneshot":
        assert summary["patch_steps"] == 2 and any(not torch.equal(got[k], ref[k]) for k in got)
    else:
        assert summary["epsilon_norm"] == pytest.approx(1.0, rel=1e-5) and summary["applied"]


def test_the_bench_docs_give_each_post_training_defense_its_defaults_and_our_reading():
    from pathlib import Path

    bench = (Path(__file__).resolve().parents[1] / "docs" / "bench.md").read_text(encoding="utf-8")
    rows = {n: next(line for line in bench.splitlines() if line.startswith(f"| `{n}` | post-fine-tuning |"))
            for n in POST}
    assert all("Our reading" in r for r in rows.values())
    one, anti, pan = (make_defense(n).settings for n in POST)
    assert f"`steps` ({one.steps})" in rows["oneshot"] and f"`candidates` ({one.candidates}" in rows["oneshot"]
    assert f"`mask_ratio`) {anti.mask_ratio}" in rows["antidote"] and "2,000" in rows["antidote"]
    assert anti.calibration_rows == 2000
    assert f"ρ {pan.rho:g}, λ {pan.lam:g}" in rows["panacea"]
    assert f"`harmful_batch_size` {pan.harmful_batch_size}" in rows["panacea"]
