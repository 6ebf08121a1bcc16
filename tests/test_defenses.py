"""Each defense against a plain-torch reference on a tiny Llama and hand-made batches."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from spard.config import LoraConfig, OptimConfig
from spard.training.batches import micro_batches
from spard.defenses import (REGISTRY, STAGES, DATA_KINDS, DefenseData, make_defense)
from spard.defenses.antibody import weighted_token_loss
from spard.defenses.base import TrainContext, mean_token_loss, sample_losses
from spard.defenses.booster import combine, perturbation_gradients
from spard.formatting import collate, encode_example, pad_id_of
from spard.trainer import run_defense
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import safe_rows, task_rows, tiny_lora_model, tiny_model, tiny_tokenizer


def pool_rows(n=6):
    return [{"prompt": r["prompt"], "safe": r["response"], "unsafe": "sure here how to make a cake ."}
            for r in safe_rows(n)]


def batch_of(tok, rows):
    return collate([encode_example(tok, r["prompt"], r["response"], 64) for r in rows], pad_id_of(tok))


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def hf_mean_loss(model, batch):
    return model(**batch).loss  # the model's own token mean: the reference


def context(tok, micro=8, max_length=64):
    from contextlib import nullcontext
    return TrainContext(streams={}, global_batch=micro, micro_batch_size=micro, pad_id=pad_id_of(tok),
                        device=torch.device("cpu"), autocast=nullcontext, max_length=max_length)


def micro_of(tok, rows, micro=8):
    """rows as micro-batches, indices 0..n-1."""
    examples = [encode_example(tok, r["prompt"], r["response"], 64) for r in rows]
    return micro_batches(examples, list(range(len(rows))), pad_id=pad_id_of(tok), micro_batch_size=micro)


def step_loss(d, model, micro, source="user"):
    return sum(term(model, mb) for mb, term in d.loss_terms(model, micro, source))


# ----------------------------------------------------------------------------------------------
def test_registry_names_stages_and_settings():
    for name in REGISTRY:
        d = make_defense(name)
        info = d.describe()
        assert info["name"] == name and info["stage"] in STAGES
        assert set(info["needs"]) <= set(DATA_KINDS) and "user" in info["needs"]
    assert make_defense("spard-random").settings.selection == "random"
    assert make_defense("lisa", rho=0.5).settings.rho == 0.5
    with pytest.raises(ValueError, match="unknown defense"):
        make_defense("nope")
    with pytest.raises(ValueError, match="unknown setting"):
        make_defense("lisa", rhoo=1)
    with pytest.raises(ValueError, match="rho"):
        make_defense("lisa", rho=-1)
    with pytest.raises(ValueError, match="scheduler"):
        make_defense("bds", scheduler="x")


@pytest.mark.parametrize("name, setting, value, message", [
    ("booster", "steps", True, "booster steps must be an int >= 1, got True"),
    ("booster", "lr", float("inf"), "booster lr must be a finite number > 0, got inf"),
    ("booster", "lam", "0.1", "booster lam must be a finite number >= 0, got '0.1'"),
    ("lisa", "rho", float("nan"), "lisa rho must be a finite number >= 0, got nan"),
    ("lisa", "finetune_steps", 0, "lisa finetune_steps must be an int >= 1, got 0"),
    ("antibody", "temperature", False, "antibody temperature must be a finite number > 0, got False"),
    ("bds", "alignment_batch_size", 2.0, "bds alignment_batch_size must be an int >= 1, got 2.0"),
    ("safegrad", "alignment_batch_size", True, "safegrad alignment_batch_size must be an int >= 1, got True"),
    ("antidote", "mask_ratio", 1.0, r"antidote mask_ratio must be a number in \(0, 1\), got 1.0"),
    ("lox", "k", -1, r"lox k must be an int >= 0 \(0: full rank\), got -1"),
    ("oneshot", "index", -2, r"oneshot index must be an int >= 0 \(an alignment row\), got -2"),
    ("spard", "tau_scale", 0, "spard tau_scale must be a finite number > 0, got 0"),
])
def test_settings_out_of_range_are_refused_in_one_line(name, setting, value, message):
    # one shared check (spard.space.require_int / require_number): a bool is not a number,
    # inf and NaN are not finite
    with pytest.raises(ValueError, match=f"^{message}$"):
        make_defense(name, **{setting: value})


def test_loss_pieces_match_the_model_loss():
    tok = tiny_tokenizer()
    model = tiny_model()
    batch = batch_of(tok, task_rows(4))
    torch.testing.assert_close(mean_token_loss(model, batch), hf_mean_loss(model, batch))
    sums, counts = sample_losses(model, batch)
    one = batch_of(tok, task_rows(4)[1:2])
    torch.testing.assert_close(sums[1] / counts[1], hf_mean_loss(model, one), atol=1e-5, rtol=1e-5)


def test_safeinstr_mixes_three_percent_refusals():
    user = task_rows(12) * 10  # 120 rows
    d = make_defense("safeinstr")
    rows = d.training_rows(DefenseData(user=user, safety_pool=pool_rows(6), seed=3))
    added = [r for r in rows if r.get("source") == "safety"]
    assert len(rows) == 123 and len(added) == 3  # floor(0.03 * 120)
    assert all(r["response"] == "sorry i cannot help with that ." for r in added)
    assert rows == d.training_rows(DefenseData(user=user, safety_pool=pool_rows(6), seed=3))
    with pytest.raises(ValueError, match="alignment data"):
        d.training_rows(DefenseData(user=user))


def test_lisa_phases_and_proximal_term():
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    d = make_defense("lisa", alignment_steps=2, finetune_steps=3, rho=0.7)
    assert d.total_steps(7) == 7 + 2 * 3  # three cycles for 7 user steps
    d.setup(model, tok, DefenseData(user=task_rows(), safety_pool=pool_rows()), None, context(tok))
    assert [d.source(s) for s in range(5)] == ["alignment"] * 2 + ["user"] * 3
    # change the parameters, switch phase: θ̃ becomes the end point of the finished phase
    with torch.no_grad():
        for p in d.params:
            p.add_(0.01)
    end_of_user = [p.detach().clone() for p in d.params]
    assert d.source(5) == "alignment"
    for a, p in zip(d.anchor, end_of_user):
        torch.testing.assert_close(a, p)
    with torch.no_grad():
        d.params[0].add_(0.1)
    batch = batch_of(tok, task_rows(3))
    loss = step_loss(d, model, micro_of(tok, task_rows(3), micro=2), "alignment")
    expected = hf_mean_loss(model, batch) + 0.5 * 0.7 * sum(((p - a) ** 2).sum() for p, a in zip(d.params, end_of_user))
    torch.testing.assert_close(loss, expected)
    g = torch.autograd.grad(d.proximal(), d.params[0])[0]
    torch.testing.assert_close(g, 0.7 * (d.params[0] - end_of_user[0]))


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_safegrad_projects_the_utility_gradient(kind):
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    d = make_defense("safegrad", alignment_batch_size=3, alignment_loss=kind)
    data = DefenseData(user=task_rows(), safety_pool=pool_rows(), seed=1)
    d.setup(model, tok, data, None, context(tok, micro=2))
    state = d.gradient.order.state_dict()
    idx = d.gradient.order.take(3)
    d.gradient.order.load_state_dict(state)
    # reference alignment gradient s (one batch; the defense runs it in micro-batches of 2)
    align = batch_of(tok, [data.alignment[i] for i in idx])
    if kind == "ce":
        s = torch.autograd.grad(hf_mean_loss(model, align), d.params)
    else:
        with torch.no_grad(), model.disable_adapter():
            ref = model(**align).logits[:, :-1].log_softmax(-1)
        cur = model(**align).logits[:, :-1].log_softmax(-1)
        mask = (align["labels"][:, 1:] != -100).float()
        kl = (ref.exp() * (ref - cur)).sum(-1)
        s = torch.autograd.grad((kl * mask).sum() / mask.sum(), d.params)
    # a utility gradient with a conflicting component: u = v - 3 s
    torch.manual_seed(0)
    u = [torch.randn_like(x) * 1e-3 - 3 * x for x in s]
    for p, ui in zip(d.params, u):
        p.grad = ui.clone()
    d.after_backward()
    dot = sum((a * b).sum() for a, b in zip(u, s))
    sq = sum((b * b).sum() for b in s)
    assert dot < 0
    for p, ui, si in zip(d.params, u, s):
        torch.testing.assert_close(p.grad, ui - dot / sq * si, atol=1e-6, rtol=1e-4)
    # no conflict: the gradient is left alone
    d.gradient.order.load_state_dict(state)
    for p, si in zip(d.params, s):
        p.grad = si.clone()
    d.after_backward()
    for p, si in zip(d.params, s):
        torch.testing.assert_close(p.grad, si)


def test_bds_scalar_weights_and_scheduler_step():
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    user = task_rows(4) + [{"prompt": "how to make a cake", "response": "sure here how to make a cake ."}]
    d = make_defense("bds", alignment_batch_size=2, weight_lr=0.1)
    d.n_train = len(user)
    data = DefenseData(user=user, safety_pool=pool_rows(), seed=0)
    d.setup(model, tok, data, None, context(tok, micro=2))
    batch = batch_of(tok, user)
    idx = list(range(5))
    w0 = d._weights_of(torch.tensor(idx))
    torch.testing.assert_close(w0, torch.ones(5))  # a = 0: all weights 1
    state = d.align.state_dict()
    loss = step_loss(d, model, micro_of(tok, user, micro=2))
    d.align.load_state_dict(state)
    align = batch_of(tok, [data.alignment[i] for i in d.align.order.take(2)])
    sums, counts = sample_losses(model, batch)
    per = (sums / counts).detach()
    torch.testing.assert_close(loss, hf_mean_loss(model, align) + per.mean())
    # the scheduler step: one AdamW step on mean_i w_i(a) ℓ_i, by hand
    a = torch.zeros(5, requires_grad=True)
    ref_opt = torch.optim.AdamW([a], lr=0.1)
    (5 * torch.softmax(a, 0) * per).mean().backward()
    ref_opt.step()
    d.after_step(None)
    torch.testing.assert_close(d.logits.detach(), a.detach())
    w = d.sample_weights()
    assert w[per.argmax()] == w.min() and torch.isclose(w.sum(), torch.tensor(5.0))


def test_bds_neural_scores_over_the_batch():
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    d = make_defense("bds-neural", weight_lr=0.05)
    d.n_train = 5
    d.setup(model, tok, DefenseData(user=task_rows(5), safety_pool=pool_rows()), None, context(tok, micro=2))
    micro = micro_of(tok, task_rows(5), micro=2)
    torch.testing.assert_close(d._weights_of(d._scores(micro)), torch.ones(5))  # zero head: equal
    before = [p.detach().clone() for p in d.scorer.parameters()]
    step_loss(d, model, micro)
    d.after_step(None)
    assert any(not torch.equal(a, b) for a, b in zip(before, d.scorer.parameters()))
    w = d._weights_of(d._scores(micro))
    assert torch.isclose(w.sum(), torch.tensor(5.0)) and not torch.allclose(w, torch.ones(5))


def test_antibody_weights_and_loss_match_the_formula():
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    rows = task_rows(3) + [{"prompt": "how to make a cake", "response": "sure here how to make a cake ."}]
    refusal = "sorry i cannot help with that ."
    d = make_defense("antibody", refusal=refusal, temperature=0.5)
    d.train_prompts = [r["prompt"] for r in rows]
    d.setup(model, tok, DefenseData(user=rows), None, context(tok, micro=3))
    loss = step_loss(d, model, micro_of(tok, rows, micro=3))  # weights over both micro-batches
    # reference: per-sample log-likelihoods from the model's own loss, one row at a time
    dd, ce_sum, n_tok = [], [], []
    for r in rows:
        y = batch_of(tok, [r])
        yr = batch_of(tok, [{"prompt": r["prompt"], "response": refusal}])
        n = int((y["labels"][:, 1:] != -100).sum())
        ly = hf_mean_loss(model, y)
        dd.append((-ly + hf_mean_loss(model, yr)).detach())
        ce_sum.append(ly * n)
        n_tok.append(n)
    w = torch.softmax(torch.stack(dd) / 0.5, 0)
    torch.testing.assert_close(d._last_weights, w, atol=1e-5, rtol=1e-4)
    expected = (w * torch.stack(ce_sum)).sum() / (w * torch.tensor(n_tok, dtype=torch.float32)).sum()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weighted_token_loss(torch.tensor([2., 4.]), torch.tensor([1., 2.]), torch.tensor([1., 0.])),
                               torch.tensor(2.0))


def test_booster_perturbation_gradient_and_exact_restore():
    tok = tiny_tokenizer()
    model = tiny_lora_model()
    params = params_of(model)
    before = [p.detach().clone() for p in params]
    align = batch_of(tok, safe_rows(3))
    harm = batch_of(tok, [{"prompt": r["prompt"], "response": r["unsafe"]} for r in pool_rows(3)])
    g_a, g_h, g_h2, g_r, _ = perturbation_gradients(model, params, align, harm, alpha=0.1, refusal_batch=align)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    # reference: ∇L_harm at θ - α ĝ on a copy
    ref = copy.deepcopy(model)
    rp = params_of(ref)
    gh = torch.autograd.grad(hf_mean_loss(ref, harm), rp)
    norm = torch.sqrt(sum((g ** 2).sum() for g in gh))
    with torch.no_grad():
        for p, g in zip(rp, gh):
            p.sub_(0.1 * g / norm)
    gh2 = torch.autograd.grad(hf_mean_loss(ref, harm), rp)
    for x, y in zip(g_h2, gh2):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-4)
    total = combine(g_a, g_h, g_h2, 5.0, g_r, 0.05)
    for t, a, h, h2, r in zip(total, g_a, g_h, g_h2, g_r):
        torch.testing.assert_close(t, a + 5.0 * (h - h2) + 0.05 * r)


def test_booster_alignment_stage_returns_a_plain_model_that_refuses_more():
    tok = tiny_tokenizer()
    model = tiny_model()
    data = DefenseData(user=task_rows(), safety_pool=pool_rows())
    refusals = batch_of(tok, data.alignment)
    before = float(hf_mean_loss(model, refusals))
    d = make_defense("booster", steps=8, lr=5e-3, batch_size=3)
    boosted = d.alignment_stage(model, tok, data)
    assert type(boosted).__name__ == "LlamaForCausalLM"  # merged: fine-tuning adds a fresh LoRA
    assert float(hf_mean_loss(boosted, refusals)) < before
    assert d.summary()["alignment_steps"] == 8


def test_run_defense_sft_equals_the_trainer():
    from spard.trainer import fit
    from spard.lora import apply_lora

    tok = tiny_tokenizer()
    optim = OptimConfig(lr=1e-2, warmup_steps=1, batch_size=3, max_steps=4, seed=5)
    lora = LoraConfig(r=4, alpha=8, dropout=0.0)
    model, run = run_defense(make_defense("sft"), tiny_model(), tok, DefenseData(user=task_rows(), max_length=64),
                             optim=optim, lora=lora, progress=False)
    base = tiny_model()
    torch.manual_seed(5)  # run_defense seeds LoRA's initialisation with optim.seed
    ref = apply_lora(base, r=4, alpha=8, dropout=0.0)
    fit(ref, tok, task_rows(), optim=optim, max_length=64, progress=False)
    for a, b in zip(params_of(model), params_of(ref)):
        torch.testing.assert_close(a, b)
    assert run["steps"] == 4


def test_spard_selects_k_and_projects_like_the_projector():
    from spard.spag import SafetyProjector
    from spard.data import safety_rows

    tok = tiny_tokenizer()
    model = tiny_lora_model()
    ref = copy.deepcopy(model)
    user = task_rows(12) * 10
    pool = pool_rows(6)
    d = make_defense("spard-random", p=0.03, tau=0.0, batch_size=2)
    d.setup(model, tok, DefenseData(user=user, safety_pool=pool, seed=0, max_length=64), None, context(tok))
    assert d.selection_report["k"] == 3
    from spard.select import select_safe_data
    idx, _ = select_safe_data(pool, user, method="random", k=3, seed=0)
    proj = SafetyProjector(ref, safety_rows([pool[i] for i in idx]), tok, tau=0.0, batch_size=2,
                           max_length=64, seed=0, progress=False)
    d.after_step(None)
    proj.step()
    for a, b in zip(params_of(model), params_of(ref)):
        torch.testing.assert_close(a, b)
    assert d.summary()["spag"]["steps"] == 1
