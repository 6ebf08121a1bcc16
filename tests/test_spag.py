"""SafetyProjector against plain-torch references, on tiny Llama / Qwen2 / GPT-2 models."""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.formatting import INSTRUCTION_TEMPLATE
from spard.lora import apply_lora
from spard.spag import SafetyProjector

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Tiny models and a local tokenizer (shared with the trainer tests)
# ----------------------------------------------------------------------------------------------
WORDS = ("what is one two three four five six seven eight nine ten plus minus the answer "
         "i cannot help with that sorry here how to make a cake bake tell me about cats dogs "
         "write poem sure step first then #### = + - . , ? !").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    template_words = INSTRUCTION_TEMPLATE.replace("{prompt}", "").split()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in template_words + WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_model(kind: str = "llama", vocab_size: int = 128, seed: int = 0, dtype=torch.float32):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype)


def tiny_lora_model(kind="llama", seed=0, dropout=0.0, dtype=torch.float32):
    model = apply_lora(tiny_model(kind, seed=seed, dtype=dtype), r=4, alpha=8, dropout=dropout)
    # peft starts B at zero (a zero adapter); give it values so gradients reach A as well.
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def safe_rows(n=6):
    prompts = ["how to make a cake", "tell me about cats", "write poem about dogs",
               "what is two plus three", "tell me about dogs", "how to bake"]
    return [{"prompt": prompts[i % len(prompts)], "response": "sorry i cannot help with that ."}
            for i in range(n)]


def task_rows(n=12):
    words = "one two three four five six seven eight nine".split()
    rows = []
    for i in range(n):
        a, b = words[i % 9], words[(i * 4 + 1) % 9]
        rows.append({"prompt": f"what is {a} plus {b} ?", "response": f"the answer is {words[(i + 2) % 9]} ."})
    return rows


# ----------------------------------------------------------------------------------------------
# Plain-torch reference
# ----------------------------------------------------------------------------------------------
def reference_loss_and_grads(model, projector, batch_indices):
    """ℓ = HF mean token loss over the whole safety batch; g by backward into fresh tensors."""
    from spard.formatting import collate

    batch = collate([projector.examples[i] for i in batch_indices], projector.pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads, params


def peek_indices(projector):
    state = projector.order.state_dict()
    idx = projector.order.take(projector.batch_size)
    projector.order.load_state_dict(state)
    return idx


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_paper_step_matches_reference(kind):
    tok = tiny_tokenizer()
    model = tiny_lora_model(kind)
    proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, batch_size=3, progress=False)
    idx = peek_indices(proj)
    loss, grads, params = reference_loss_and_grads(model, proj, idx)
    sq = sum(float((g.double() ** 2).sum()) for g in grads)
    alpha = max(float(loss) - 0.0, 0.0) / sq
    expected = [(p.detach().double() - alpha * g.double()).float() for p, g in zip(params, grads)]

    logs = proj.step()
    assert math.isclose(float(logs["safety_loss"]), float(loss), rel_tol=1e-5)
    assert math.isclose(float(logs["alpha"]), alpha, rel_tol=1e-4)
    assert float(logs["trigger"]) == 1.0
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-6)


def test_projection_lowers_safety_loss_towards_tau():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    proj = SafetyProjector(model, safe_rows(), tok, batch_size=6, measure_after=True, progress=False)
    before = proj.loss_of(proj._micro_batches(range(6)))
    proj.tau = float(before) - 0.05
    logs = proj.step()
    assert float(logs["safety_loss_after"]) < float(logs["safety_loss"])
    # The linearised constraint is met exactly; for a small gap the true loss lands near τ.
    assert abs(float(logs["safety_loss_after"]) - proj.tau) < 0.25 * (float(before) - proj.tau)


def test_no_trigger_leaves_parameters_untouched():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    proj = SafetyProjector(model, safe_rows(), tok, tau=1e6, progress=False)
    before = [p.detach().clone() for p in proj.params]
    logs = proj.step()
    assert float(logs["trigger"]) == 0.0 and float(logs["alpha"]) == 0.0
    for p, b in zip(proj.params, before):
        assert torch.equal(p, b)
    assert proj.summary()["trigger_rate"] == 0.0


def test_leaves_grads_optimizer_state_and_mode_as_found():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama", dropout=0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = __import__("spard.formatting", fromlist=["collate"]).collate(
        [__import__("spard.formatting", fromlist=["encode_example"]).encode_example(tok, r["prompt"], r["response"], 64)
         for r in task_rows(4)], 0)
    model(**batch).loss.backward()
    opt.step()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    opt_state = {k: {n: (t.clone() if torch.is_tensor(t) else t) for n, t in v.items()}
                 for k, v in opt.state.items()}
    for training in (True, False):
        model.train(training)
        SafetyProjector(model, safe_rows(), tok, tau=0.0, progress=False, use_eval_mode=True).step(opt)
        assert model.training is training
    for p, g in zip([p for p in model.parameters() if p.requires_grad], grads):
        assert torch.equal(p.grad, g)
    for k, v in opt.state.items():
        for n, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(opt_state[k][n]))


def test_micro_batching_gives_the_same_step():
    tok = tiny_tokenizer()
    results = []
    for micro in (4, 1, 3):
        model = tiny_lora_model("qwen2")
        proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, batch_size=4,
                               micro_batch_size=micro, progress=False)
        logs = proj.step()
        results.append((float(logs["safety_loss"]), [p.detach().clone() for p in proj.params]))
    for loss, params in results[1:]:
        assert math.isclose(loss, results[0][0], rel_tol=1e-5)
        for a, b in zip(params, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_max_step_caps_alpha_and_lr_option_reads_the_optimizer():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, max_step=1e-5, progress=False)
    assert float(proj.step()["alpha"]) == pytest.approx(1e-5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=3e-6)
    proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, max_step="lr", progress=False)
    assert float(proj.step(opt)["alpha"]) == pytest.approx(3e-6)
    with pytest.raises(ValueError, match="max_step='lr' needs the optimizer"):
        proj.step()


def test_official_mode_matches_reference():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.01)
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # utility grads, must come back unchanged
    proj = SafetyProjector(model, safe_rows(), tok, tau=0.1, batch_size=4, micro_batch_size=1,
                           mode="official", delta=0.1, max_grad_norm=1.0, progress=False)
    idx = peek_indices(proj)
    loss, grads, _ = reference_loss_and_grads(model, proj, idx)
    assert float(loss) > 0.2  # triggers
    # The released code's order: clip the raw safety gradient to 1.0 first, then scale per tensor.
    total = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    clip = min(1.0, 1.0 / (total + 1e-6))
    for rp, g in zip(ref_params, grads):
        g = g * clip
        rp.grad = g * min((float(loss) - 0.1) / (float(g.norm()) + 1e-8), 1.0)
    ref_opt.step()

    logs = proj.step(opt)
    assert float(logs["trigger"]) == 1.0
    for p, rp in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), rp.detach(), rtol=1e-4, atol=1e-6)
        assert torch.equal(p.grad, torch.full_like(p, 7.0))
    # Below τ + δ the optimizer is not stepped.
    proj.tau = 1e6
    before = [p.detach().clone() for p in params]
    assert float(proj.step(opt)["trigger"]) == 0.0
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def _official_update(clip_first: bool, grads, excess, alpha_max, max_norm):
    """The parameter change of one official step under SGD(lr=1): -(the grad fed to it)."""
    if clip_first:
        total = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        grads = [g * min(1.0, max_norm / (total + 1e-6)) for g in grads]
    fed = [g * min(excess / (float(g.norm()) + 1e-8), alpha_max) for g in grads]
    if not clip_first:
        total = float(torch.sqrt(sum(f.pow(2).sum() for f in fed)))
        fed = [f * min(1.0, max_norm / (total + 1e-6)) for f in fed]
    return [-f for f in fed]


def test_official_mode_clips_the_raw_safety_gradient_first():
    """Released order: clip(g) to max_grad_norm, then per-tensor α_p; the update's direction
    differs from scale-then-clip whenever ||g|| > max_grad_norm and α_max caps some tensors."""
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama", seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, batch_size=4, mode="official", delta=0.0,
                           alpha_max=0.05, max_grad_norm=0.1, progress=False)
    idx = peek_indices(proj)
    loss, grads, _ = reference_loss_and_grads(model, proj, idx)
    assert float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) > 0.1  # clipping acts
    released = _official_update(True, grads, float(loss), 0.05, 0.1)
    other = _official_update(False, grads, float(loss), 0.05, 0.1)
    assert max(float((a - b).abs().max()) for a, b in zip(released, other)) > 1e-4  # the orders differ here
    before = [p.detach().clone() for p in params]
    proj.step(torch.optim.SGD(params, lr=1.0))
    for p, b, d in zip(params, before, released):
        torch.testing.assert_close(p.detach() - b, d, rtol=1e-4, atol=1e-7)


def test_official_mode_skips_a_nan_safety_loss():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, mode="official", progress=False)
    real = proj.loss_and_grads

    def nan_loss(batch):
        loss, grads = real(batch)
        return loss * float("nan"), [None if g is None else g * float("nan") for g in grads]

    proj.loss_and_grads = nan_loss
    before = [p.detach().clone() for p in params]
    logs = proj.step(torch.optim.AdamW(params, lr=1e-2))
    assert float(logs["trigger"]) == 0.0 and proj.summary()["nonfinite_skipped"] == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(ValueError, match="max_grad_norm"):
        SafetyProjector(model, safe_rows(), tok, tau=0.0, mode="official", max_grad_norm=-1.0, progress=False)


def test_calibrate_tau_is_the_mean_token_loss_over_the_safe_set():
    from spard.formatting import collate

    tok = tiny_tokenizer()
    model = tiny_lora_model("gpt2", dropout=0.1)
    model.train()
    proj = SafetyProjector(model, safe_rows(5), tok, batch_size=2, progress=False)
    model.eval()
    with torch.no_grad():
        expected = float(model(**collate(proj.examples, proj.pad_id)).loss)
    model.train()
    assert proj.calibrate_tau() == pytest.approx(expected, rel=1e-5)
    assert model.training


def test_bf16_model_steps_close_to_fp32():
    tok = tiny_tokenizer()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llama", dtype=dtype)
        for n, p in model.named_parameters():  # full fine-tuning of the last layer's MLP
            p.requires_grad_("layers.1.mlp" in n)
        proj = SafetyProjector(model, safe_rows(), tok, tau=0.0, progress=False)
        before = [p.detach().float().clone() for p in proj.params]
        logs = proj.step()
        out[dtype] = (float(logs["alpha"]), [p.detach().float() - b for p, b in zip(proj.params, before)])
        assert all(p.dtype == dtype for p in proj.params)
    a32, d32 = out[torch.float32]
    a16, d16 = out[torch.bfloat16]
    assert a16 == pytest.approx(a32, rel=0.1)
    num = sum(float((x - y).norm() ** 2) for x, y in zip(d16, d32)) ** 0.5
    den = sum(float(y.norm() ** 2) for y in d32) ** 0.5
    assert den > 0 and num / den < 0.2


def test_state_dict_round_trip_continues_the_same_batches():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    proj = SafetyProjector(model, safe_rows(), tok, tau=1e6, batch_size=4, seed=3, progress=False)
    proj.step()
    state = proj.state_dict()
    nxt = proj.order.take(8)
    other = SafetyProjector(model, safe_rows(), tok, batch_size=4, seed=0, progress=False)
    other.load_state_dict(state)
    assert other.tau == 1e6 and other.steps == 1
    assert other.order.take(8) == nxt


def test_bad_input_is_rejected_before_training():
    tok = tiny_tokenizer()
    model = tiny_lora_model("llama")
    with pytest.raises(ValueError, match="tau must be"):
        SafetyProjector(model, safe_rows(), tok, tau=-0.1)
    with pytest.raises(ValueError, match="safe_rows is empty"):
        SafetyProjector(model, [], tok)
    with pytest.raises(ValueError, match="mode must be"):
        SafetyProjector(model, safe_rows(), tok, mode="fast")
    with pytest.raises(ValueError, match="max_step must be"):
        SafetyProjector(model, safe_rows(), tok, max_step=-1.0)
    with pytest.raises(ValueError, match=r"safe_rows\[0\]: no 'response'"):
        SafetyProjector(model, [{"prompt": "x"}], tok)
    long = [{"prompt": "what is one plus two " * 20, "response": "three"}]
    with pytest.raises(ValueError, match="beyond max_length=32"):
        SafetyProjector(model, long, tok, max_length=32)
    assert SafetyProjector(model, long + safe_rows(2), tok, max_length=32).dropped == 1
    frozen = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        SafetyProjector(frozen, safe_rows(), tok)
    with pytest.raises(ValueError, match="official"):
        SafetyProjector(model, safe_rows(), tok, tau=0.0, mode="official").step()


def test_lora_defaults_target_attention_projections():
    from spard.lora import attention_targets

    assert attention_targets(tiny_model("llama")) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert attention_targets(tiny_model("gpt2")) == ["c_attn", "attn.c_proj"]
    model = apply_lora(tiny_model("qwen2"))
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (32, 8, 0.05)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("o_proj" in n for n in trainable) and not any("mlp" in n for n in trainable)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class TinyLM(torch.nn.Module):
    """Embedding + linear head: a causal LM interface without importing transformers (cheap to
    start in spawned processes)."""

    def __init__(self, vocab=64, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.head = torch.nn.Embedding(vocab, width), torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        return _Out(self.head(torch.tanh(self.emb(input_ids))))


class WordTok:
    """Whitespace tokenizer over a growing vocabulary (ids < 64), no chat template."""
    bos_token_id, eos_token_id, pad_token_id, chat_template, bos_token, add_bos_token = 1, 2, 0, None, "<s>", True

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + sum(map(ord, w)) % 61 for w in text.split()]}


def _distributed_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        proj = SafetyProjector(TinyLM(), safe_rows(), WordTok(), tau=0.0, batch_size=2, micro_batch_size=1,
                               process_group=dist.group.WORLD, progress=False)
        indices = peek_indices(proj)
        logs = proj.step()
        torch.save({"indices": indices, "loss": logs["safety_loss"], "alpha": logs["alpha"],
                    "params": [p.detach() for p in proj.params]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_projection_equals_one_process_over_all_ranks_batches(tmp_path):
    """Two gloo ranks, each with its own safety samples, apply the projection one process
    computes over the union of their batches (token-weighted loss, summed gradients)."""
    import torch.multiprocessing as mp
    from spard.formatting import collate

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["indices"] != r1["indices"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # every rank applied the same step

    model = TinyLM()
    proj = SafetyProjector(model, safe_rows(), WordTok(), tau=0.0, batch_size=4, progress=False)
    batch = collate([proj.examples[i] for i in r0["indices"] + r1["indices"]], proj.pad_id)
    logits = model(batch["input_ids"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)
    assert float(r0["loss"]) == pytest.approx(float(loss), rel=1e-5)
    alpha = float(loss) / sum(float((g.double() ** 2).sum()) for g in grads)
    assert float(r0["alpha"]) == pytest.approx(alpha, rel=1e-4)
    for p, g, got in zip(params, grads, r0["params"]):
        torch.testing.assert_close(got, (p.detach().double() - alpha * g.double()).float(), rtol=1e-4, atol=1e-6)
