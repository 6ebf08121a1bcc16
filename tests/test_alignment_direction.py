"""The defenses that read the alignment direction (aligned minus base weights): AsFT's penalty
and LoX's extrapolation against their formulas, the base model as an input (config, spard
train, the world's cache) and its bad inputs."""

import copy
import json
import os
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from spard.cli import main
from spard.config import LoraConfig, OptimConfig
from spard.defenses import DefenseData, make_defense
from spard.defenses.base import TrainContext, base_weights_of, mean_token_loss
from spard.formatting import pad_id_of
from spard.trainer import run_defense
from test_defenses import micro_of, step_loss
from test_one_trainer import tiny_base_weights, user_rows
from test_spag import one_thread  # noqa: F401  (autouse fixture)
from test_spag import task_rows, tiny_lora_model, tiny_model, tiny_tokenizer
from test_train_cli import workspace, write_config  # noqa: F401  (fixture)


def context(tok):
    return TrainContext(streams={}, global_batch=8, micro_batch_size=8, pad_id=pad_id_of(tok),
                        device=torch.device("cpu"), autocast=nullcontext, max_length=64)


def lora_pairs(model):
    """plain weight name -> (aligned W, A, B) for each LoRA module (reference, by hand)."""
    params = dict(model.named_parameters())
    out = {}
    for n in params:
        if n.endswith("lora_A.default.weight"):
            stem = n[: -len(".lora_A.default.weight")]
            plain = stem[len("base_model.model."):] + ".weight"
            out[plain] = (params[stem + ".base_layer.weight"], params[n], params[stem + ".lora_B.default.weight"])
    return out


def reference_penalty(model, base, lam):
    """λ Σ ||(I - V Vᵀ/||V||_F) B A||²_F with the d x d matrix formed, as the paper writes it."""
    total = torch.zeros(())
    for key, (w, a, b) in lora_pairs(model).items():
        v = w.detach() - base[key]
        c = v @ v.t() / torch.linalg.matrix_norm(v)
        total = total + torch.linalg.matrix_norm((torch.eye(c.shape[0]) - c) @ (b @ a)) ** 2
    return lam * total


def test_asft_penalty_and_its_gradient_match_the_formula():
    tok = tiny_tokenizer()
    model = tiny_lora_model()  # random A and B: the penalty is not zero
    base = tiny_base_weights()
    d = make_defense("asft", lam=0.7)
    d.setup(model, tok, DefenseData(user=task_rows(), base_weights=base), None, context(tok))
    assert len(d.pairs) == 8  # q, k, v, o in two layers
    got, ref = d.penalty(), reference_penalty(model, base, 0.7)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 forward pass: the penalty stays fp32
        assert torch.equal(d.penalty(), got)
    g_got = torch.autograd.grad(got, d.params, allow_unused=True)
    g_ref = torch.autograd.grad(ref, d.params, allow_unused=True)
    for x, y in zip(g_got, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)
    # the step's loss: the token mean over the batch plus the penalty, once
    rows = task_rows(5)
    loss = step_loss(d, model, micro_of(tok, rows, micro=2))
    from test_defenses import batch_of
    torch.testing.assert_close(loss, mean_token_loss(model, batch_of(tok, rows)) + ref, rtol=1e-5, atol=1e-6)


def test_asft_keeps_the_update_closer_to_the_alignment_direction():
    base = tiny_base_weights()

    def orthogonal_part(name, **settings):
        data = DefenseData(user=user_rows(), seed=3, max_length=64, base_weights=base)
        optim = OptimConfig(lr=1e-2, warmup_steps=0, batch_size=4, max_steps=6, seed=3, weight_decay=0.0)
        model, _ = run_defense(make_defense(name, **settings), tiny_model(), tiny_tokenizer(), data, optim=optim,
                               lora=LoraConfig(r=4, alpha=8, dropout=0.0), progress=False)
        return float(reference_penalty(model, base, 1.0).detach())

    sft, asft = orthogonal_part("sft"), orthogonal_part("asft", lam=10.0)
    assert asft < 0.5 * sft, (asft, sft)


def test_lox_extrapolates_the_top_k_subspace_of_the_alignment_update():
    aligned = tiny_model()
    base = tiny_base_weights()
    data = DefenseData(user=task_rows(), base_weights=base)
    d = make_defense("lox", k=2, alpha=0.5)
    out = d.alignment_stage(copy.deepcopy(aligned), tiny_tokenizer(), data)
    before, after = dict(aligned.named_parameters()), dict(out.named_parameters())
    for name, w in before.items():
        if w.dim() != 2 or "embed_tokens" in name or "lm_head" in name:
            assert torch.equal(after[name], w), name  # norms, embeddings, output head: untouched
            continue
        u, s, vh = torch.linalg.svd(w.detach() - base[name], full_matrices=False)
        expected = w.detach() + 0.5 * (u[:, :2] @ torch.diag(s[:2]) @ vh[:2])
        torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert d.summary()["matrices"] == 14  # 7 matrices in each of 2 layers
    full = make_defense("lox", k=0, alpha=0.5).alignment_stage(copy.deepcopy(aligned), tiny_tokenizer(), data)
    w = aligned.model.layers[0].mlp.up_proj.weight.detach()
    torch.testing.assert_close(full.model.layers[0].mlp.up_proj.weight,
                               w + 0.5 * (w - base["model.layers.0.mlp.up_proj.weight"]), rtol=1e-6, atol=1e-6)
    assert make_defense("lox").settings.k == 6 and make_defense("lox").settings.alpha == 1.25


@pytest.mark.parametrize("name", ["asft", "lox"])
def test_a_defense_needing_the_base_model_without_it_fails_before_any_work(name, monkeypatch):
    from spard import lora

    def no_lora(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr(lora, "apply_lora", no_lora)
    data = DefenseData(user=task_rows(), seed=3, max_length=64)
    with pytest.raises(ValueError, match=f"defense '{name}' needs the base model"):
        run_defense(make_defense(name), tiny_model(), tiny_tokenizer(), data, progress=False)


def test_a_base_model_of_other_shapes_is_named_by_its_first_differing_parameter():
    base = tiny_base_weights()
    base["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    data = DefenseData(user=task_rows(), seed=3, max_length=64, base_weights=base)
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(3, 3\), the "
                                         r"aligned model's \(128, 64\)"):
        run_defense(make_defense("lox"), tiny_model(), tiny_tokenizer(), data, progress=False)


# ---------------------------------------------------------------------------------- spard train
@pytest.fixture(scope="module")
def base_folder(workspace):  # noqa: F811
    """The workspace model's weights perturbed (a stand-in base model), and one of other shapes."""
    model = tiny_model("llama")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(tiny_base_weights()[n])
    model.save_pretrained(workspace / "base")
    tiny_model("llama", vocab_size=130).save_pretrained(workspace / "other")
    return workspace / "base"


@pytest.mark.parametrize("name", ["asft", "lox"])
def test_spard_train_runs_with_a_base_model_and_resumes(workspace, base_folder, tmp_path, name):  # noqa: F811
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / name
    cfg = write_config(workspace, out, model={"base_model": str(base_folder)}, run={"keep_checkpoints": 10})
    args = ["train", "--config", str(cfg), "--defense", name]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["base_model"] == str(base_folder) and run["defense"]["needs"] == ["user", "base_model"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for c in (out / "checkpoints").iterdir():
        if c.name != "checkpoint-2":
            shutil.rmtree(c)
    shutil.rmtree(out / "adapter")
    assert main(args + ["--resume"]) == 0
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in adapter:
        assert torch.equal(adapter[k], resumed[k]), k


def test_spard_train_names_a_missing_or_mismatched_base_model(workspace, base_folder, tmp_path, capsys):  # noqa: F811
    cfg = write_config(workspace, tmp_path / "a")
    assert main(["train", "--config", str(cfg), "--defense", "asft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.base_model: defense 'asft' needs the base model" in err[0], err
    cfg = write_config(workspace, tmp_path / "b", model={"base_model": str(workspace / "other")})
    assert main(["train", "--config", str(cfg), "--defense", "lox"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.base_model: parameter 'model.embed_tokens.weight' has shape (130, 64)" in err[0], err
    cfg = write_config(workspace, tmp_path / "c", model={"base_model": str(tmp_path / "nowhere")})
    assert main(["train", "--config", str(cfg), "--defense", "lox"]) == 2
    assert "model.base_model" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- the world
def test_the_world_keeps_its_model_before_alignment_in_the_cache(tmp_path, monkeypatch):
    from spard.world import WorldSettings, build, build_world

    settings = WorldSettings(n_task_train=20, n_task_test=5, n_align_task=5, hidden_size=32, num_layers=1,
                             num_heads=2, intermediate_size=64, align_steps=3, align_batch_size=4)
    seen = {}
    real_align = build.align

    def spying_align(model, *a, **k):
        seen["init"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_align(model, *a, **k)

    monkeypatch.setattr(build, "align", spying_align)
    w = build_world(settings, cache=tmp_path, progress=False)
    base = base_weights_of(w.base_model)
    assert base.keys() == seen["init"].keys()
    assert all(torch.equal(base[n], seen["init"][n]) for n in base)  # exactly where the alignment started
    assert any(not torch.equal(base[n], p) for n, p in w.model.named_parameters())
    entry = tmp_path / w.key
    assert (entry / "base.safetensors").is_file()
    again = build_world(settings, cache=tmp_path, progress=False)
    assert again.from_cache and all(torch.equal(base[n], p) for n, p in again.base_model.named_parameters())
    # an entry made before the base was kept gets it added
    (entry / "base.safetensors").unlink()
    third = build_world(settings, cache=tmp_path, progress=False)
    assert (entry / "base.safetensors").is_file()
    assert all(torch.equal(base[n], p) for n, p in third.base_model.named_parameters())


# ---------------------------------------------------------------------------------- spard bench
def test_the_world_bench_gives_its_base_model_to_asft_and_lox(tmp_path, monkeypatch):
    from spard import bench
    from spard.commands.bench import build_settings
    from test_bench import tiny_world_data

    data = tiny_world_data(tmp_path, monkeypatch)
    assert data.base_weights.keys() == dict(data.model.named_parameters()).keys()
    settings = build_settings({
        "defenses": ["asft", "lox"], "ratios": [0.1], "seeds": [0],
        "optim": {"lr": 5e-3, "warmup_steps": 0, "batch_size": 8, "epochs": 1.0},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "max_length": 64, "max_new_tokens": 4,
        "task_max_new_tokens": 4, "eval_batch_size": 8})
    st = bench.run_grid(data, settings, tmp_path / "out", progress=False)
    assert st["failed"] == [] and len(st["done"]) == 2
    lox = json.loads(bench.Cell("world", 0.1, 0, "lox").path(tmp_path / "out").read_text())
    assert lox["train"]["summary"]["matrices"] == 7 and lox["train"]["post_training_seconds"] is None


def test_a_bench_file_base_model_is_loaded_only_when_needed_and_checked(tmp_path):
    from spard import bench
    from spard.io import write_jsonl_atomic

    tiny_model("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    model = tiny_model("llama")
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(tiny_base_weights()[n])
    model.save_pretrained(tmp_path / "base")
    tiny_model("llama", vocab_size=130).save_pretrained(tmp_path / "other")
    write_jsonl_atomic(tmp_path / "task.jsonl", [{"prompt": "q1", "answer": "#### 1"}])
    write_jsonl_atomic(tmp_path / "eval.jsonl", [{"prompt": "x"}])
    write_jsonl_atomic(tmp_path / "pool.jsonl", [{"prompt": "p", "safe": "no"}])
    write_jsonl_atomic(tmp_path / "attack.jsonl", [{"prompt": "h", "unsafe": "sure"}])
    files = dict(model=str(tmp_path / "model"), task=str(tmp_path / "task.jsonl"), task_test=str(tmp_path / "task.jsonl"),
                 eval_prompts=str(tmp_path / "eval.jsonl"), safety_pool=str(tmp_path / "pool.jsonl"),
                 attacks={"a": str(tmp_path / "attack.jsonl")})
    with_asft = bench.BenchSettings(defenses=["sft", "asft"])
    data = bench.file_data(**files, base_model=str(tmp_path / "base"), settings=None)
    assert all(torch.equal(data.base_weights[n], tiny_base_weights()[n]) for n in data.base_weights)
    assert data.description["base_model"] == str(tmp_path / "base")
    assert bench.file_data(**files, base_model=str(tmp_path / "base"),
                           settings=bench.BenchSettings(defenses=["sft"])).base_weights is None  # not needed
    with pytest.raises(ValueError, match=r"^base_model: parameter 'model.embed_tokens.weight' has shape \(130, 64\)"):
        bench.file_data(**files, base_model=str(tmp_path / "other"), settings=with_asft)
    with pytest.raises(ValueError, match=r"^base_model: defense\(s\) asft need the base model"):
        bench.check_base_model(with_asft, False)
    bench.check_base_model(with_asft, True)
    bench.check_base_model(bench.BenchSettings(defenses=["sft", "lisa"]), False)


def test_spard_bench_without_a_base_model_leaves_asft_and_lox_out_of_the_default_grid(tmp_path, capsys):
    import yaml

    from spard.io import write_jsonl_atomic

    write_jsonl_atomic(tmp_path / "pool.jsonl", [{"prompt": "p", "safe": "no", "unsafe": "sure"}])
    spec = {"model": str(tmp_path / "nowhere"), "task": "t", "task_test": "t", "eval_prompts": "e",
            "safety_pool": str(tmp_path / "pool.jsonl"), "attacks": {"a": "x"}}
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    assert main(["bench", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "spard bench: asft, lox left out of the default defenses: they need base_model" in err
    assert main(["bench", "--config", str(cfg), "--defenses", "sft,lox", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base_model: defense(s) lox need the base model" in err[0], err
